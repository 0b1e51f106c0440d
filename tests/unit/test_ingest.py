"""Ingestion details: pixel value transforms, inconsistent series, odd files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from fedscan.common.data.dicom import read_series, scan_site

SERIES = generate_uid()


def write_slice(
    path: Path,
    pixels: np.ndarray,
    z: float,
    *,
    series: str = SERIES,
    slope: float = 1.0,
    intercept: float = 0.0,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    preamble: bool = True,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta  # a raw dataset: no preamble, no file meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return ds


def test_per_slice_rescale_signed_and_monochrome1(tmp_path: Path) -> None:
    images = tmp_path / "images"
    hu = np.array([[-1000, 0], [40, 1200]], dtype=np.float32)
    # the same HU stored three ways: unsigned with intercept, another slope, signed
    write_slice(images / "a", ((hu + 1024) / 1).astype(np.uint16), 0.0, intercept=-1024)
    write_slice(images / "b", ((hu + 2048) / 2).astype(np.uint16), 1.0, slope=2, intercept=-2048)
    write_slice(images / "c", hu.astype(np.int16), 2.0, signed=True)
    series = scan_site(images).series[0]
    pixels, ok, _ = read_series(series)
    assert ok.all()
    for k in range(3):
        np.testing.assert_array_equal(pixels[k], hu)
    # MONOCHROME1: high stored values are dark; after inversion bright means dense again
    mono1 = tmp_path / "mono1" / "images"
    stored = np.array([[0, 100], [1000, 4095]], dtype=np.uint16)
    write_slice(mono1 / "x", stored, 0.0, photometric="MONOCHROME1", series=generate_uid())
    s1 = scan_site(mono1).series[0]
    inv, ok, _ = read_series(s1)
    assert s1.invert.all()
    np.testing.assert_array_equal(inv[0], 65535.0 - stored)  # BitsStored 16: range 0..65535
    assert inv[0, 0, 0] > inv[0, 1, 1]


def test_files_without_extension_or_preamble_and_compressed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    img = np.arange(64, dtype=np.uint16).reshape(8, 8) * 10
    write_slice(images / "deep" / "er" / "IM0001", img, 0.0)
    write_slice(images / "raw", img + 1, 1.0, preamble=False)
    ds = write_slice(images / "rle.dcm", img + 2, 2.0)
    ds.compress(RLELossless)
    ds.save_as(images / "rle.dcm", enforce_file_format=True)
    (images / "notes.txt").write_text("exported by PACS")
    scan = scan_site(images)
    assert [s.reason for s in scan.skipped] == ["not a DICOM file"]
    series = scan.series[0]
    assert len(series) == 3 and "RLE Lossless" in series.transfer_syntaxes
    pixels, ok, _ = read_series(series)
    assert ok.all()
    for k in range(3):
        np.testing.assert_array_equal(pixels[k], img + k)


def test_inconsistent_series_are_reported(tmp_path: Path) -> None:
    img = np.ones((8, 8), dtype=np.uint16)
    # mixed sizes: the odd slice is reported, the rest kept
    mixed = tmp_path / "mixed"
    for k in range(4):
        write_slice(mixed / f"{k}", img, float(k))
    write_slice(mixed / "odd", np.ones((6, 8), dtype=np.uint16), 4.0)
    scan = scan_site(mixed)
    assert len(scan.series[0]) == 4
    assert [(s.path.name, s.reason) for s in scan.skipped] == [
        ("odd", "inconsistent series: slice size differs from the rest of its series")
    ]
    # duplicate positions (two acquisitions in one series): the series is not used, every file says why
    dup = tmp_path / "dup"
    series = generate_uid()
    for k in range(3):
        write_slice(dup / f"a{k}", img, float(k), series=series)
        write_slice(dup / f"b{k}", img * 2, float(k), series=series)
    scan = scan_site(dup)
    assert scan.series == [] and len(scan.skipped) == 6
    assert all("3 slice position(s) hold more than one image" in s.reason for s in scan.skipped)
    # a gap: kept, with a warning naming it
    gap = tmp_path / "gap"
    series = generate_uid()
    for z in (0.0, 1.0, 2.0, 5.0, 6.0):
        write_slice(gap / f"{z}", img, z, series=series)
    scan = scan_site(gap)
    assert len(scan.series[0]) == 5
    assert scan.series[0].warnings == [
        "gap: 1 place(s) where slices are up to 3.0 mm apart (median spacing 1.0 mm); slices may be missing"
    ]


def test_undecodable_slice_is_dropped_not_fatal(tmp_path: Path) -> None:
    images = tmp_path / "images"
    img = np.ones((8, 8), dtype=np.uint16)
    for k in range(3):
        write_slice(images / f"{k}", img * k, float(k))
    victim = images / "1"
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:10]  # truncated pixel data
    ds.save_as(victim, enforce_file_format=True)
    series = scan_site(images).series[0]
    pixels, ok, failed = read_series(series)
    assert ok.tolist() == [True, False, True]
    assert [(f.path.name, f.reason) for f in failed] == [("1", "pixel data could not be decoded")]
    np.testing.assert_array_equal(pixels[2], img * 2)


def test_meta_that_lies_about_the_encoding_and_empty_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    img = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 31) % 4000
    ds = write_slice(images / "implicit-body", img, 0.0, preamble=False)
    # a preamble and a meta that claims Explicit VR, in front of an implicit VR body
    meta = Dataset()
    meta.file_meta = FileMetaDataset()
    meta.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.file_meta.MediaStorageSOPClassUID = CTImageStorage
    meta.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    body = (images / "implicit-body").read_bytes()
    pydicom.filewriter.write_file_meta_info(buf := pydicom.filebase.DicomBytesIO(), meta.file_meta)
    (images / "implicit-body").write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    write_slice(images / "empty", np.zeros((0, 0), dtype=np.uint16), 1.0, series=generate_uid())
    scan = scan_site(images)
    assert [(s.path.name, s.reason) for s in scan.skipped] == [("empty", "image with no rows or columns")]
    pixels, ok, _ = read_series(scan.series[0])
    assert ok.all()
    np.testing.assert_array_equal(pixels[0], img)


def test_list_files_skips_hidden_entries_and_linked_folders(tmp_path: Path) -> None:
    import os

    from fedscan.common.data.dicom import list_files

    root, outside = tmp_path / "images", tmp_path / "outside"
    for d in ["a/b", "a-b", ".hidden/x", "c/.git", "c/d/e", "outside/sub"]:
        (root / d if not d.startswith("outside") else tmp_path / d).mkdir(parents=True)
    for f in ["a/b/1", "a-b/2", "a/3", ".hidden/x/4", "c/.git/5", "c/.6", "c/d/e/7", "top"]:
        (root / f).write_text("x")
    (outside / "z").write_text("z")
    (outside / "sub" / "y").write_text("y")
    os.symlink(outside / "z", root / "c" / "linked-file")
    os.symlink(outside / "sub", root / "c" / "linked-folder")
    os.symlink(outside / "missing", root / "c" / "broken-link")
    os.mkfifo(root / "fifo")
    listed = [p.relative_to(root).as_posix() for p in list_files(root)]
    # sorted as paths (a/3 and a/b/1 before a-b/2), files behind links kept, linked folders not entered
    assert listed == ["a/3", "a/b/1", "a-b/2", "c/d/e/7", "c/linked-file", "top"]
    assert list_files(tmp_path / "nowhere") == []
