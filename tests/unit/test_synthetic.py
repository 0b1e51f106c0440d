"""The synthetic generator writes valid DICOM, aligned masks, heterogeneous sites, reproducibly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage

from fedscan.common.data.dicom import list_files, read_pixels, scan_site
from fedscan.common.data.labels import load_mask, mask_path
from fedscan.common.data.synthetic import make_profiles, read_manifest, synthesize, write_site

# every true HU value of the phantom's normal anatomy (lesions take other values)
TISSUE_HU = {-1000, -900, -100, 20, 40, 50, 60, 150, 180, 600}


def test_files_are_valid_ct_dicom(synth_root: Path) -> None:
    files = list_files(synth_root / "hospital-a" / "images")
    assert len(files) == 3 * 12
    for f in files[:12]:
        ds = pydicom.dcmread(f)  # no force: must be a proper Part 10 file
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.SOPClassUID == CTImageStorage
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert UID(uid).is_valid
        assert ds.Modality == "CT"
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        for tag in (
            "RescaleSlope",
            "RescaleIntercept",
            "PixelSpacing",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "SliceThickness",
            "PatientName",
            "PatientID",
            "Manufacturer",
        ):
            assert tag in ds, tag


def test_sites_differ_like_hospitals(synth_root: Path) -> None:
    manifest = read_manifest(synth_root)
    assert manifest is not None and [s.name for s in manifest.sites] == ["hospital-a", "hospital-b"]
    a, b = manifest.sites
    assert b.n_patients >= 5 * a.n_patients
    for field in (
        "noise_hu",
        "blur_sigma_px",
        "hu_offset",
        "slice_thickness_mm",
        "manufacturer",
        "lesion_prevalence",
        "rescale_intercept",
    ):
        assert getattr(a, field) != getattr(b, field), field
    assert [p.label_noise > 0 for p in make_profiles(4, 0)].count(True) == 1
    ds_a = pydicom.dcmread(list_files(synth_root / "hospital-a" / "images")[0])
    ds_b = pydicom.dcmread(list_files(synth_root / "hospital-b" / "images")[0])
    assert ds_a.Manufacturer != ds_b.Manufacturer
    assert float(ds_a.SliceThickness) != float(ds_b.SliceThickness)


def test_masks_align_with_lesions(tmp_path: Path) -> None:
    """With noise, blur and calibration off, the mask is exactly the lesion pixels."""
    prof = make_profiles(3, 0)[0].model_copy(
        update={
            "noise_hu": 0.0,
            "blur_sigma_px": 0.0,
            "hu_scale": 1.0,
            "hu_offset": 0.0,
            "label_noise": 0.0,
            "lesion_prevalence": 1.0,
            "n_patients": 2,
        }
    )
    write_site(tmp_path, prof, seed=3, site_index=0)
    site = tmp_path / prof.name
    scan = scan_site(site / "images")
    assert len(scan.series) == 2 and not scan.skipped
    lesion_pixels = 0
    for series in scan.series:
        hu = np.rint(read_pixels(series)).astype(int)
        mask = load_mask(mask_path(site / "labels", series.series_uid), series)
        assert mask.shape == hu.shape
        not_tissue = ~np.isin(hu, list(TISSUE_HU))
        np.testing.assert_array_equal(mask.astype(bool), not_tissue)
        lesion_pixels += int(mask.sum())
    assert lesion_pixels > 0


def test_mask_found_by_geometry_not_disk_order(tmp_path: Path) -> None:
    """Flipping the NIfTI's slice axis on disk (and its affine) must not move the mask."""
    prof = make_profiles(1, 0)[0].model_copy(update={"n_patients": 1, "lesion_prevalence": 1.0})
    write_site(tmp_path, prof, seed=1, site_index=0)
    site = tmp_path / prof.name
    series = scan_site(site / "images").series[0]
    path = mask_path(site / "labels", series.series_uid)
    before = load_mask(path, series)
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)[:, ::-1, ::-1]  # rows and slices reversed on disk
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, data.shape[1] - 1
    flip[2, 2], flip[2, 3] = -1, data.shape[2] - 1
    nib.save(nib.Nifti1Image(data, img.affine @ flip), str(path))
    np.testing.assert_array_equal(load_mask(path, series), before)
    assert before.sum() > 0


def test_slices_ordered_by_geometry(synth_root: Path) -> None:
    for series in scan_site(synth_root / "hospital-a" / "images").series:
        z = series.positions[:, 2]
        assert np.all(np.diff(z) > 0)
        numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in series.files]
        assert numbers == sorted(numbers)  # file names are random; geometry gives the order


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files(tmp_path: Path) -> None:
    synthesize(tmp_path / "one", 2, seed=11)
    synthesize(tmp_path / "two", 2, seed=11)
    synthesize(tmp_path / "other", 2, seed=12)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    assert _digest(tmp_path / "one") != _digest(tmp_path / "other")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    from fedscan.common.errors import FedscanError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FedscanError, match="not empty"):
        synthesize(tmp_path / "x", 1, 0)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
