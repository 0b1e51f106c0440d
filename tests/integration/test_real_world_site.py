"""`fedscan simulate --data-root` on sites built from real-world DICOM (pydicom's test files).

Two hospitals from CT images nobody here wrote, in their original encodings (uncompressed,
JPEG 2000, JPEG lossless, an enhanced multi-frame CT). The masks are the body outline,
derived by thresholding HU: NIfTI files at one site, DICOM SEG objects at the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import data_store
import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from test_simulate import run_cli

from fedscan.common.data.dicom import SeriesHeader, read_series, scan_site

CORPUS = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
SITES = {
    # NIfTI masks (two of these lack the FrameOfReferenceUID a DICOM SEG needs, one a SliceThickness)
    "alpha": ["explicit_VR-UN.dcm", "693_UNCR.dcm", "bad_sequence.dcm"],
    "beta": ["J2K_pixelrep_mismatch.dcm", "CT_small.dcm", "eCT_Supplemental.dcm"],  # DICOM SEG
}
BODY_HU = -300.0


def _find(name: str) -> Path:
    return next(p for root in CORPUS for p in root.rglob(name))


def _nifti_affine(hdr: SeriesHeader) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm, as a DICOM-to-NIfTI converter writes it."""
    step = hdr.normal * (hdr.slice_spacing or hdr.thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = hdr.row_dir * hdr.spacing[1]
    lps[:3, 1] = hdr.col_dir * hdr.spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = hdr.positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def build_real_world_sites(root: Path) -> dict[str, int]:
    """Write the two sites; return the number of slices per site."""
    slices = {}
    for site, names in SITES.items():
        images = root / site / "images"
        labels = root / site / "labels"
        images.mkdir(parents=True)
        labels.mkdir()
        for name in names:
            shutil.copy(_find(name), images / name.removesuffix(".dcm"))  # no extension, like many exports
        scan = scan_site(images)
        assert len(scan.series) == len(names), [s.reason for s in scan.skipped]
        slices[site] = sum(len(h) for h in scan.series)
        for hdr in scan.series:
            hu, ok, _ = read_series(hdr)
            assert ok.all()
            body = (hu > BODY_HU).astype(np.uint8)
            if site == "alpha":
                nib.save(
                    nib.Nifti1Image(body.transpose(2, 1, 0), _nifti_affine(hdr)),
                    str(labels / f"{hdr.series_uid}.nii.gz"),
                )
                continue
            sources = [pydicom.dcmread(p) for p in dict.fromkeys(hdr.files)]
            if len(sources) == 1 and hdr.frames[0] is not None:  # multi-frame: frames in file order
                order = np.argsort([f for f in hdr.frames])
                frames = body[order]
            else:  # one file per slice: in the order of the source list (= header order here)
                frames = body
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=frames.astype(bool),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[
                    hd.seg.SegmentDescription(
                        segment_number=1,
                        segment_label="body",
                        segmented_property_category=codes.SCT.Tissue,
                        segmented_property_type=codes.SCT.Tissue,
                        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                    )
                ],
                series_instance_uid=generate_uid(),
                series_number=900,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer="fedscan tests",
                manufacturer_model_name="threshold",
                software_versions="1",
                device_serial_number="1",
            )
            seg.save_as(images / f"seg-{hdr.series_uid[-6:]}.dcm")
    return slices


@pytest.mark.integration
def test_simulate_on_real_world_dicom(tmp_path: Path) -> None:
    root = tmp_path / "sites"
    slices = build_real_world_sites(root)
    assert slices == {"alpha": 3, "beta": 4}

    check = run_cli("site", "check", "--data", str(root / "beta"), "--json", str(tmp_path / "beta.json"))
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads((tmp_path / "beta.json").read_text())
    assert report["inventory"]["dicom_seg_objects"] == 3 and report["inventory"]["labelled_series"] == 3
    assert {p["label_source"] for p in report["series"]} == {"dicom-seg"}
    assert len(report["inventory"]["transfer_syntaxes"]) >= 2

    out = tmp_path / "out"
    res = run_cli(
        "simulate",
        "--data-root",
        str(root),
        "--rounds",
        "2",
        "--out",
        str(out),
        "--image-size",
        "64",
        "--local-epochs",
        "10",
        "--seed",
        "0",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((out / "report.json").read_text())
    assert result["status"] == "complete" and result["sites"] == ["alpha", "beta"]
    for row in result["final"]["per_site"].values():
        assert row["num_examples"] >= 1
        assert 0.0 <= row["dice"] <= 1.0
    print({s: r["dice"] for s, r in result["final"]["per_site"].items()})
    assert result["final"]["mean"]["dice"] > 0.5  # the body outline is easy: the model did learn
