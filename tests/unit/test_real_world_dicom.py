"""Robustness against DICOM files nobody here wrote: pydicom's test files and pydicom-data.

Every file is either ingested (it yields decoded slices) or reported with a reason; nothing
raises. Each file is scanned on its own, so that every decoder runs on every file, and all
of them together, as one messy hospital export.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import data_store
import pydicom.data
import pytest

from fedscan.common.data.dicom import list_files, read_series, scan_site
from fedscan.common.data.labels import index_masks

ROOTS = [
    Path(pydicom.data.__file__).parent / "test_files",
    Path(data_store.__file__).parent / "data",
]
FILES = [f for root in ROOTS for f in list_files(root)]


def _ingest(images: Path) -> tuple[set[Path], dict[Path, list[str]]]:
    """(files that gave decoded slices, {file: reasons}) for one folder."""
    scan = scan_site(images)
    used: set[Path] = set()
    reasons: dict[Path, list[str]] = {}
    for s in scan.skipped:
        reasons.setdefault(s.path.resolve(), []).append(s.reason)
    for hdr in scan.series:
        _, ok, failed = read_series(hdr)
        for f in failed:
            reasons.setdefault(f.path.resolve(), []).append(f.reason)
        used.update(p.resolve() for p, good in zip(hdr.files, ok, strict=True) if good)
    for p in index_masks(images / "no-labels", scan).problems:
        reasons.setdefault(p.path.resolve(), []).append(p.reason)
    return used, reasons


def test_the_corpus_is_there() -> None:
    assert len(FILES) >= 200, [str(r) for r in ROOTS]


def test_every_file_alone_is_ingested_or_reported(tmp_path: Path) -> None:
    outcomes: Counter[str] = Counter()
    reasons_seen: Counter[str] = Counter()
    ingested: set[str] = set()
    for i, src in enumerate(FILES):
        images = tmp_path / f"f{i}" / "images"
        images.mkdir(parents=True)
        link = images / src.name
        link.symlink_to(src)
        used, reasons = _ingest(images)
        assert used or reasons, f"{src.name}: neither ingested nor reported"
        if used:
            outcomes["ingested"] += 1
            ingested.add(src.name)
        else:
            outcomes["reported"] += 1
            for r in reasons[link.resolve()]:
                assert r and "Traceback" not in r
                reasons_seen[r.split(":")[0]] += 1
    print(f"\n{len(FILES)} files: {dict(outcomes)}; reasons: {dict(reasons_seen)}")
    assert outcomes["ingested"] + outcomes["reported"] == len(FILES)
    assert outcomes["ingested"] >= 70 and outcomes["reported"] >= 120
    # greyscale images in every transfer syntax the plugins decode, multi-frame and MONOCHROME1
    for name in (
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "693_J2KR.dcm",
        "693_J2KI.dcm",
        "JPEG-LL.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "eCT_Supplemental.dcm",
        "MR2_J2KR.dcm",
        "RG1_J2KR.dcm",
    ):
        assert name in ingested, name
    for name in ("DICOMDIR", "rtplan.dcm", "test-SR.dcm", "SC_rgb.dcm", "JPEG-lossy.dcm"):
        assert name not in ingested, name
    for reason in (
        "not a DICOM file",
        "a DICOMDIR (a media index, not an image)",
        "not an image (no pixel data)",
        "colour image (RGB)",
        "not an image to train on",
        "pixel data could not be decoded",
        "DICOM SEG for a series that is not among the images",
    ):
        assert reasons_seen[reason.split(":")[0]] > 0, reason


def test_the_whole_corpus_as_one_export(tmp_path: Path) -> None:
    images = tmp_path / "site" / "images"
    for i, src in enumerate(FILES):
        # nested folders, and no extension on half of the files
        dest = images / f"dir{i % 7}" / (src.name if i % 2 else src.stem)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest = dest.with_name(f"{dest.name}-{i}")
        dest.symlink_to(src)
    used, reasons = _ingest(images)
    every = {p.resolve() for p in list_files(images)}
    assert every == used | set(reasons), "some files are neither ingested nor reported"
    assert len(used) >= 30
    # the same image in several encodings is one instance: one copy is used, the others reported
    dups = [p for p, rs in reasons.items() if any("same image (SOPInstanceUID)" in r for r in rs)]
    assert len(dups) >= 10


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_lossless_syntaxes_decode_to_the_same_values(tmp_path: Path, name: str) -> None:
    def values(fname: str) -> object:
        images = tmp_path / fname / "images"
        images.mkdir(parents=True)
        (images / fname).symlink_to(next(f for f in FILES if f.name == fname))
        series = scan_site(images).series
        assert len(series) == 1
        pixels, ok, _ = read_series(series[0])
        assert ok.all()
        return pixels

    assert (
        values(name) == values("MR_small_implicit.dcm" if name == "MR_small.dcm" else "MR_small.dcm")
    ).all()


def test_direct_reads_of_uncompressed_files_match_pydicom(tmp_path: Path) -> None:
    """Uncompressed single-frame files are read straight from disk; the values must be exactly
    what pydicom decodes (stored bits masked or sign-extended, then rescaled)."""
    import numpy as np
    import pydicom as pd
    from pydicom.pixels import apply_modality_lut

    checked = 0
    for i, src in enumerate(FILES):
        images = tmp_path / f"f{i}" / "images"
        images.mkdir(parents=True)
        (images / src.name).symlink_to(src)
        for hdr in scan_site(images).series:
            if not hdr.native or hdr.native[0] is None or hdr.lut.any():
                continue
            pixels, ok, _ = read_series(hdr)
            if not ok.all():
                continue
            ds = pd.dcmread(hdr.files[0])
            expected = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
            if hdr.invert[0]:
                lo, hi = hdr.value_range[0]
                expected = np.float32(lo + hi) - expected
            np.testing.assert_array_equal(pixels[0], expected, err_msg=src.name)
            checked += 1
    assert checked >= 25
