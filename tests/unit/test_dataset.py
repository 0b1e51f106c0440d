"""Site preparation: patient-level split, cache, and the errors a hospital would hit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedscan.common.config import RunConfig
from fedscan.common.data.layout import SiteDir, check_site, discover_sites
from fedscan.common.data.site_arrays import prepare_site, split_patients
from fedscan.common.errors import FedscanError


def test_split_keeps_each_patient_on_one_side() -> None:
    patient = np.repeat(np.arange(10), 12)
    train, val = split_patients(patient, 0.25, seed=0)
    assert set(patient[train]).isdisjoint(set(patient[val]))
    assert len(train) + len(val) == patient.size
    assert len(set(patient[val])) == 2  # round(0.25 * 10) = 2 patients held out
    again = split_patients(patient, 0.25, seed=0)
    np.testing.assert_array_equal(val, again[1])
    other = split_patients(patient, 0.25, seed=1)[1]
    assert not np.array_equal(val, other)


def test_split_always_leaves_both_sides_and_needs_two_patients() -> None:
    train, val = split_patients(np.array([0, 0, 1, 1]), 0.9, seed=0)
    assert len(train) == 2 and len(val) == 2
    with pytest.raises(FedscanError, match="at least 2 patients"):
        split_patients(np.zeros(5, dtype=int), 0.25, seed=0)


def test_prepare_site_and_cache(synth_root: Path, tmp_path: Path) -> None:
    cfg = RunConfig(image_size=64)
    site = discover_sites(synth_root)[0]
    data = prepare_site(site, cfg, tmp_path)
    assert data.images.shape == (36, 64, 64) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert data.masks.shape == (36, 64, 64) and data.masks.max() == 1
    assert data.n_patients == 3
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and (entries[0] / "complete").is_file()
    again = prepare_site(site, cfg, tmp_path)  # served from the cache, memory-mapped
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images, data.images)
    prepare_site(site, RunConfig(image_size=32), tmp_path)  # new settings, new entry
    assert len(list(tmp_path.iterdir())) == 2


def test_cache_invalidated_when_files_change(synth_root: Path, tmp_path: Path) -> None:
    site_path = tmp_path / "hospital-a"
    shutil.copytree(synth_root / "hospital-a", site_path)
    site = SiteDir("hospital-a", site_path)
    cfg = RunConfig(image_size=32)
    cache = tmp_path / "cache"
    prepare_site(site, cfg, cache)
    victim = sorted(site.labels.glob("*.nii.gz"))[0]
    victim.unlink()  # one series loses its mask
    data = prepare_site(site, cfg, cache)
    assert len(list(cache.iterdir())) == 2
    assert len(data) == 24


def test_missing_root_and_missing_dicom(tmp_path: Path) -> None:
    with pytest.raises(FedscanError, match="does not exist"):
        discover_sites(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedscanError, match="no site folders"):
        discover_sites(tmp_path / "empty")
    site = tmp_path / "root" / "h1"
    (site / "images").mkdir(parents=True)
    (site / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(FedscanError, match="no DICOM among the 1 files"):
        check_site(discover_sites(tmp_path / "root")[0], "segmentation")


def test_site_without_labels(synth_root: Path, tmp_path: Path) -> None:
    shutil.copytree(synth_root / "hospital-a" / "images", tmp_path / "h" / "images")
    with pytest.raises(FedscanError, match="'h' has images but no labels"):
        check_site(SiteDir("h", tmp_path / "h"), "segmentation")


def test_mask_on_wrong_geometry_is_counted(synth_root: Path, tmp_path: Path, caplog) -> None:
    import nibabel as nib

    site_path = tmp_path / "hospital-a"
    shutil.copytree(synth_root / "hospital-a", site_path)
    victim = sorted((site_path / "labels").glob("*.nii.gz"))[0]
    img = nib.load(str(victim))
    small = np.asanyarray(img.dataobj)[:, :, :5]  # covers only 5 of 12 slices
    nib.save(nib.Nifti1Image(small, img.affine), str(victim))
    data = prepare_site(SiteDir("hospital-a", site_path), RunConfig(image_size=32), None)
    assert len(data) == 24  # the other two series still train
    assert f"mask {victim.name} does not cover slice 6" in caplog.text
    assert (
        "0 series without a mask, 1 mask(s) not matching their series, 0 mask(s) for no series" in caplog.text
    )


def test_non_dicom_files_are_reported_not_fatal(synth_root: Path, tmp_path: Path, caplog) -> None:
    site_path = tmp_path / "hospital-a"
    shutil.copytree(synth_root / "hospital-a", site_path)
    (site_path / "images" / "README.txt").write_text("exported by PACS")
    data = prepare_site(SiteDir("hospital-a", site_path), RunConfig(image_size=32), None)
    assert len(data) == 36
    assert "1 of 37 file(s) not used" in caplog.text and "README.txt: not a DICOM file" in caplog.text


def test_multi_class_masks_and_num_classes(synth_root: Path, tmp_path: Path) -> None:
    import nibabel as nib

    shutil.copytree(synth_root / "hospital-a", tmp_path / "h")
    for path in sorted((tmp_path / "h" / "labels").glob("*.nii.gz")):
        img = nib.load(path)
        mask = np.asarray(img.dataobj).astype(np.uint8)
        mask[mask > 0] = 2  # the lesions become class 2 of 3
        nib.save(nib.Nifti1Image(mask, img.affine, img.header), path)
    site = discover_sites(tmp_path)[0]
    with pytest.raises(
        FedscanError, match=r"holds class 2, but the run has num_classes = 2 \(classes 0..1\)"
    ):
        prepare_site(site, RunConfig(image_size=32), None)
    data = prepare_site(site, RunConfig(image_size=32, num_classes=3), None)
    assert set(np.unique(data.masks)) == {0, 2}
