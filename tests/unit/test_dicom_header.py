"""fedscan's fast header reader gives the header scan exactly what pydicom gives it.

``scan_file`` reads a file's header with ``dicom_header.read_raw_header`` first and leaves to
pydicom whatever that reader does not handle; with ``fast=False`` it reads through pydicom
only. Both must classify every file the same way, down to the last float: pydicom's test files
and pydicom-data (some 240 files nobody here wrote), and files written here to hit the
reader's own paths (implicit VR, sequences of undefined length, a meta that lies, truncation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import data_store
import numpy as np
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from fedscan.common.data.dicom import _scan_header, list_files, read_series, scan_file, scan_site
from fedscan.common.data.dicom_header import NotFast, read_raw_header

ROOTS = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]


def _same(a: Any, b: Any) -> bool:
    """Equal in value and type, arrays element by element (NaN equal to NaN)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        names = [f.name for f in dataclasses.fields(a)]
        return type(a) is type(b) and all(_same(getattr(a, n), getattr(b, n)) for n in names)
    if isinstance(a, np.ndarray):
        nan = a.dtype.kind == "f"
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=nan)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a):
        return bool(np.isnan(b))
    return type(a) is type(b) and a == b


def _fast_path_taken(path: Path) -> bool:
    raw = read_raw_header(path)
    if raw is None:
        return False
    try:
        _scan_header(path, raw)
    except NotFast:
        return False
    return True


def test_fast_and_pydicom_scans_agree_on_every_real_world_file() -> None:
    files = [f for root in ROOTS for f in list_files(root)]
    assert len(files) >= 200
    fast = 0
    for f in files:
        assert _same(scan_file(f), scan_file(f, fast=False)), f.name
        fast += _fast_path_taken(f)
    # most of the corpus goes the fast way (183 of 244 when written); the rest is pydicom's
    assert fast >= 150, fast


def _ct(path: Path, syntax: str, *, sequence_undefined: bool = False, manufacturer: str = "ACME") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.Manufacturer = "P1", "CT", manufacturer
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "T-D0050", "SRT"
    ds.AnatomicRegionSequence = Sequence([item])
    if sequence_undefined:
        ds["AnatomicRegionSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10.5, 3, 7.25], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], "2.5"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_fast_reader_handles_implicit_vr_and_undefined_length_sequences(tmp_path: Path) -> None:
    files = [
        _ct(tmp_path / "implicit.dcm", ImplicitVRLittleEndian),
        _ct(tmp_path / "explicit.dcm", ExplicitVRLittleEndian),
        _ct(tmp_path / "undefined.dcm", ExplicitVRLittleEndian, sequence_undefined=True),
        _ct(tmp_path / "implicit-undefined.dcm", ImplicitVRLittleEndian, sequence_undefined=True),
    ]
    for f in files:
        assert _fast_path_taken(f), f.name
        fast, slow = scan_file(f), scan_file(f, fast=False)
        assert _same(fast, slow), f.name
        assert fast.slices is not None and fast.slices[0].native is not None
        assert fast.slices[0].native[0] == read_raw_header(f).fedscan_pixel_offset  # type: ignore[union-attr]


def test_what_the_fast_reader_leaves_to_pydicom_comes_out_the_same(tmp_path: Path) -> None:
    accented = _ct(tmp_path / "accented.dcm", ExplicitVRLittleEndian, manufacturer="Siemens Médical")
    lying = _ct(tmp_path / "lying.dcm", ImplicitVRLittleEndian)
    implicit = lying.read_bytes()
    body = implicit[144 + int.from_bytes(implicit[140:144], "little") :]  # after the meta group
    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    write_file_meta_info(buf := DicomBytesIO(), meta)  # a meta saying explicit VR, an implicit body
    lying.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    whole = _ct(tmp_path / "whole.dcm", ExplicitVRLittleEndian).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole[: whole.index(b"\x28\x00\x10\x00") + 5])  # inside the Rows element
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    for f in (accented, lying, truncated, garbage):
        assert not _fast_path_taken(f), f.name
        assert _same(scan_file(f), scan_file(f, fast=False)), f.name
    assert scan_file(accented).series is not None
    assert scan_file(accented).series.manufacturer == "Siemens Médical"  # type: ignore[union-attr]
    assert scan_file(truncated).skipped is not None


def test_compressed_pixels_handed_to_the_decoder_match_a_full_pydicom_read(tmp_path: Path) -> None:
    """Single-frame compressed files are decoded from the bytes at the offset the header scan
    found (``EncodedPixels``); the values must be what the full read gives, to the last bit."""
    checked = 0
    for i, src in enumerate(f for root in ROOTS for f in list_files(root)):
        images = tmp_path / f"f{i}" / "images"
        images.mkdir(parents=True)
        (images / src.name).symlink_to(src)
        for hdr in scan_site(images).series:
            if not any(e is not None for e in hdr.encoded):
                continue
            fast, ok_fast, failed_fast = read_series(hdr)
            slow, ok_slow, failed_slow = read_series(dataclasses.replace(hdr, encoded=[]))
            assert ok_fast.tolist() == ok_slow.tolist(), src.name
            assert [f.reason for f in failed_fast] == [f.reason for f in failed_slow], src.name
            np.testing.assert_array_equal(fast, slow, err_msg=src.name)
            checked += int(ok_fast.sum())
    assert checked >= 12, checked  # RLE, JPEG, JPEG-LS and JPEG 2000 files of the corpus: 15 when written
