"""``fedscan site predict``: DICOM SEG and CSV outputs, the inverse of the model grid, and the errors.

The models are small and untrained: a U-Net whose head bias is shifted so that a few percent of the
pixels come out as foreground (predictions that are neither empty nor full, found without training),
an image classifier and an exam classifier. The expected label maps are computed here from the model,
``model_input`` and ``unfit_probabilities``, never from the SEG writer.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from flwr.app import ArrayRecord

from fedscan.client import predict as predict_mod
from fedscan.client.model_file import load_model_file
from fedscan.client.predict import BATCH_IMAGES, PredictSummary, predict_site
from fedscan.common.config import RunConfig
from fedscan.common.data.dicom import SeriesHeader, scan_site
from fedscan.common.data.labels import load_seg
from fedscan.common.data.layout import SiteDir
from fedscan.common.data.preprocess import fit_labels, unfit_probabilities
from fedscan.common.data.seg_writer import build_seg, write_seg
from fedscan.common.data.site_arrays import model_input
from fedscan.common.data.site_reader import SiteReader
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.server.checkpoint import save_round

FOREGROUND_SHARE = 0.03  # of the pixels the calibrated U-Net calls foreground


# --- helpers -------------------------------------------------------------------------------------


def _dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy's report on ``path`` that are errors; skips without dciodvfy."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("FEDSCAN_REQUIRE_DICOM3TOOLS") == "1":
            pytest.fail(
                "dciodvfy (dicom3tools) is required (FEDSCAN_REQUIRE_DICOM3TOOLS=1) but not installed"
            )
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    res = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _probabilities(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Softmax of the model over (n, H, W) images, batched as predict batches them (same numerics)."""
    out = []
    with torch.no_grad():
        for lo in range(0, images.shape[0], BATCH_IMAGES):
            x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + BATCH_IMAGES], dtype=np.float32))[
                :, None
            ]
            out.append(torch.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out)


def _expected_masks(site_path: Path, model_file: Path) -> dict[str, tuple[SeriesHeader, np.ndarray]]:
    """Per SeriesInstanceUID: the decoded slices and the label map the model gives on the source grid."""
    sm = load_model_file(model_file, device="cpu")
    cfg = sm.cfg
    site = SiteDir(site_path.name, site_path)
    out = {}
    for rec in SiteReader(site).records():
        decoded = rec.read_pixels()
        if decoded is None:
            continue
        used, pixels = decoded
        images, _ = model_input(used, pixels, cfg)
        labels = np.concatenate(
            [
                unfit_probabilities(
                    p[None], used.shape, used.spacing, cfg.image_size, cfg.pixel_spacing
                ).argmax(1)
                for p in _probabilities(sm.model, images)
            ]
        ).astype(np.uint8)
        out[used.series_uid] = (used, labels)
    return out


def _save_model(out_dir: Path, model: torch.nn.Module, cfg: RunConfig) -> Path:
    save_round(out_dir, 1, ArrayRecord(model.state_dict()), cfg)
    return out_dir / "global_model.pt"


def _copy_site(src: Path, dst_root: Path) -> Path:
    dst = dst_root / src.name
    shutil.copytree(src, dst)
    return dst


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _uids_of_files(images: Path) -> dict[str, tuple[str, str]]:
    """SOPInstanceUID -> (StudyInstanceUID, SeriesInstanceUID), read straight from the files."""
    out = {}
    for path in images.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    return out


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_model_file(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net whose foreground logit is raised so that ~3% of hospital-a's pixels are foreground."""
    cfg = RunConfig(
        task="segmentation", model="unet", image_size=64, base_channels=8, unet_depth=2, device="cpu"
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    site = SiteDir("hospital-a", synth_root / "hospital-a")
    margins = []
    with torch.no_grad():
        for rec in SiteReader(site).records():
            decoded = rec.read_pixels()
            assert decoded is not None
            used, pixels = decoded
            images, _ = model_input(used, pixels, cfg)
            logits = model(torch.from_numpy(images)[:, None])
            margins.append((logits[:, 1] - logits[:, 0]).flatten().numpy())
        threshold = float(np.quantile(np.concatenate(margins), 1.0 - FOREGROUND_SHARE))
        model.head.bias[1] -= threshold
    return _save_model(tmp_path_factory.mktemp("seg-run"), model, cfg)


@pytest.fixture(scope="module")
def seg_prediction(
    synth_root: Path,
    seg_model_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, PredictSummary, list[tuple[int, int]]]:
    out = tmp_path_factory.mktemp("pred") / "out"
    calls: list[tuple[int, int]] = []
    summary = predict_site(
        synth_root / "hospital-a",
        seg_model_file,
        out,
        cache_root=out.parent / "cache",
        device="cpu",
        on_series=lambda done, total: calls.append((done, total)),
    )
    return out, summary, calls


# --- unfit_probabilities --------------------------------------------------------------------------


def _shapes(rows: int, cols: int) -> np.ndarray:
    """Two slices of three classes: a disc (1) and a rectangle (2), on a non-square grid."""
    yy, xx = np.mgrid[:rows, :cols]
    lab = np.zeros((2, rows, cols), dtype=np.uint8)
    lab[0][(yy - 40) ** 2 + (xx - 55) ** 2 < 22**2] = 1
    lab[0][(np.abs(yy - 30) < 9) & (np.abs(xx - 105) < 12)] = 2
    lab[1][(yy - 50) ** 2 + ((xx - 70) / 1.5) ** 2 < 25**2] = 2
    return lab


def _away_from_boundaries(lab: np.ndarray, margin: int) -> np.ndarray:
    """Pixels whose (2 margin + 1)-square neighbourhood holds a single class."""
    from scipy import ndimage

    same = np.ones(lab.shape, dtype=bool)
    for c in np.unique(lab):
        inside = lab == c
        grown = ndimage.binary_dilation(inside, np.ones((1, 2 * margin + 1, 2 * margin + 1)))
        same &= ~(grown & ~inside)
    return same


@pytest.mark.parametrize("target_spacing", [None, 1.0])
def test_unfit_probabilities_inverts_fit(target_spacing: float | None) -> None:
    rows, cols, spacing, size = 90, 130, (0.8, 0.8), 64
    lab = _shapes(rows, cols)
    fitted = fit_labels(lab, spacing, size, target_spacing)
    onehot = np.eye(3, dtype=np.float32)[fitted].transpose(0, 3, 1, 2)
    probs = unfit_probabilities(onehot, (rows, cols), spacing, size, target_spacing)
    assert probs.shape == (2, 3, rows, cols) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    back = probs.argmax(axis=1)
    inner = _away_from_boundaries(lab, 3)
    if target_spacing is not None:
        # 90 x 130 px of 0.8 mm are 72 x 104 px of 1 mm: the model saw the central 64 x 64 only
        seen_r, seen_c = int(64 * 1.0 / 0.8), int(64 * 1.0 / 0.8)
        r0, c0 = (rows - seen_r) // 2, (cols - seen_c) // 2
        fov = np.zeros((rows, cols), dtype=bool)
        fov[r0 + 3 : r0 + seen_r - 3, c0 + 3 : c0 + seen_c - 3] = True
        outside = np.ones((rows, cols), dtype=bool)
        outside[r0 - 2 : r0 + seen_r + 2, c0 - 2 : c0 + seen_c + 2] = False
        assert (back[:, outside] == 0).all()  # never seen: background
        assert lab[:, outside].any()  # ... though the source holds foreground there
        inner &= fov[None]
    assert inner.sum() > 0.5 * inner.size if target_spacing is None else inner.sum() > 0.3 * inner.size
    np.testing.assert_array_equal(back[inner], lab[inner])
    for c in (1, 2):  # every class survives the round trip
        assert (back[inner] == c).sum() == (lab[inner] == c).sum() > 0


def _model_coordinate(
    n: int,
    resampled: int,
    size: int,
    target_spacing: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Where the centres of an axis' ``n`` source pixels lie on the model grid (in model pixels), and
    which of them are interior: away from the edges of the model grid and of the resampled grid."""
    src = np.arange(n, dtype=np.float64)
    if target_spacing is None:  # padded to a square of side ``resampled``, then resized to ``size``
        model = (src + (resampled - n) // 2 + 0.5) * size / resampled - 0.5
        return model, (model >= 2) & (model <= size - 3)
    coord = (
        src + 0.5
    ) * resampled / n - 0.5  # resampled to ``resampled`` pixels, then centre-cropped or padded
    model = coord - (resampled - size) // 2 if resampled >= size else coord + (size - resampled) // 2
    interior = (model >= 2) & (model <= size - 3) & (coord >= 2) & (coord <= resampled - 3)
    return model, interior


@pytest.mark.parametrize(("target_spacing", "atol"), [(None, 2e-4), (0.5, 1.5e-3), (1.0, 2e-4), (2.0, 2e-4)])
def test_unfit_probabilities_puts_each_value_where_fit_took_it_from(
    target_spacing: float | None, atol: float
) -> None:
    """A linear ramp on the model grid comes back as the same ramp at the source pixels' model coordinates:
    bilinear resizing keeps linear functions (exactly when it upsamples; to within a small wobble when its
    antialiasing kernel downsamples, here 0.5 mm back to 0.8 x 0.6 mm), so a shift of even one source pixel
    (0.005 or more here) or a wrong scale shows."""
    rows, cols, spacing, size = 90, 130, (0.8, 0.6), 64
    i, j = np.mgrid[:size, :size].astype(np.float32)
    ramp = (i + 2 * j) / (3 * size)
    probs = np.stack([1 - ramp, ramp])[None]
    out = unfit_probabilities(probs, (rows, cols), spacing, size, target_spacing)
    if target_spacing is None:
        hr = hc = max(rows, cols)
    else:
        hr, hc = round(rows * spacing[0] / target_spacing), round(cols * spacing[1] / target_spacing)
    mi, ok_i = _model_coordinate(rows, hr, size, target_spacing)
    mj, ok_j = _model_coordinate(cols, hc, size, target_spacing)
    assert ok_i.sum() > 10 and ok_j.sum() > 10
    expected = (mi[:, None] + 2 * mj[None, :]) / (3 * size)
    np.testing.assert_allclose(out[0, 1][np.ix_(ok_i, ok_j)], expected[np.ix_(ok_i, ok_j)], atol=atol)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    if target_spacing == 0.5:  # the model saw the middle only: the rest is background
        far_i, far_j = (mi < -2) | (mi > size + 1), (mj < -2) | (mj > size + 1)
        assert far_i.any() and far_j.any()
        np.testing.assert_allclose(out[0, 0][far_i], 1.0, atol=1e-5)
        np.testing.assert_allclose(out[0, 0][:, far_j], 1.0, atol=1e-5)


def test_unfit_probabilities_rejects_a_wrong_grid() -> None:
    with pytest.raises(ValueError, match="not"):
        unfit_probabilities(np.zeros((1, 2, 32, 32), np.float32), (50, 60), (1.0, 1.0), 64, None)


# --- segmentation: DICOM SEG ----------------------------------------------------------------------


def test_seg_holds_what_the_model_predicts(
    synth_root: Path,
    seg_model_file: Path,
    seg_prediction: tuple[Path, PredictSummary, list[tuple[int, int]]],
) -> None:
    out, summary, calls = seg_prediction
    expected = _expected_masks(synth_root / "hospital-a", seg_model_file)
    assert len(expected) == summary.series_found == summary.series_predicted == 3
    assert summary.images_predicted == sum(len(h) for h, _ in expected.values())
    assert summary.skipped_series == [] and summary.skipped_files == []
    assert (summary.task, summary.model, summary.server_round, summary.kind) == (
        "segmentation",
        "unet",
        1,
        "global",
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert sorted(summary.files_written) == sorted(f"seg/{uid}.dcm" for uid in expected)
    fg_slices = 0
    for uid, (hdr, labels) in expected.items():
        path = out / "seg" / f"{uid}.dcm"
        assert 0 < labels.mean() < 0.2  # neither empty nor full
        seg = hd.seg.segread(path)
        got = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=hdr.sop_uids, combine_segments=True, assert_missing_frames_are_empty=True
        )
        np.testing.assert_array_equal(got, labels)  # per source SOPInstanceUID, exactly the prediction
        np.testing.assert_array_equal(load_seg(path, hdr), labels)  # fedscan can read it back as labels
        fg_slices += int(labels.reshape(len(hdr), -1).any(axis=1).sum())
        src = pydicom.dcmread(hdr.files[0], stop_before_pixels=True)
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
        assert ds.StudyInstanceUID == hdr.study_uid == src.StudyInstanceUID
        assert [r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence] == [uid]
        assert {
            r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        } == set(hdr.sop_uids)
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
        assert ds.SeriesInstanceUID != uid and ds.Manufacturer == "fedscan"
        assert ds.SeriesDescription == "fedscan unet prediction"
        (segment,) = ds.SegmentSequence
        assert segment.SegmentNumber == 1 and segment.SegmentLabel == "lesion"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "fedscan unet" and algo.AlgorithmVersion == summary.fedscan_version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert fg_slices > 0


def test_predict_json_and_no_temporary_files(
    seg_prediction: tuple[Path, PredictSummary, list[tuple[int, int]]],
) -> None:
    out, summary, _ = seg_prediction
    written = json.loads((out / "predict.json").read_text())
    assert written == summary.model_dump(mode="json")
    assert written["kind"] == "global" and written["fedscan_version"] and written["server_round"] == 1
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([*summary.files_written, "predict.json"])  # no leftover temporary names
    assert not (out / "predictions.csv").exists()


def test_seg_passes_dciodvfy(seg_prediction: tuple[Path, PredictSummary, list[tuple[int, int]]]) -> None:
    out, summary, _ = seg_prediction
    for name in summary.files_written:
        assert _dciodvfy_errors(out / name) == [], name


def test_seg_writer_multiclass_empty_frames_and_an_empty_map(synth_root: Path, tmp_path: Path) -> None:
    """Three classes, empty slices (omitted frames), and a map with nothing at all: all read back exactly."""
    hdr = scan_site(synth_root / "hospital-a" / "images").series[0]
    n, (rows, cols) = len(hdr), hdr.shape
    labels = np.zeros((n, rows, cols), dtype=np.uint8)
    labels[1, 10:40, 20:90] = 1
    labels[1, 30:60, 80:120] = 2
    labels[n - 1, rows - 5 :, :7] = 2  # a corner: rows and columns are not swapped
    seg = build_seg(hdr, labels, num_classes=3, model="segnet")
    assert int(seg.NumberOfFrames) == 3  # slices 1 (two segments) and n-1 (one); the empty ones are omitted
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["class 1", "class 2"]
    path = tmp_path / "multi.dcm"
    write_seg(path, hdr, labels, num_classes=3, model="segnet")
    np.testing.assert_array_equal(load_seg(path, hdr), labels)
    assert _dciodvfy_errors(path) == []

    empty = tmp_path / "empty.dcm"
    write_seg(empty, hdr, np.zeros_like(labels), num_classes=2, model="unet")
    assert int(pydicom.dcmread(empty).NumberOfFrames) == n  # nothing found: said for every image
    assert not load_seg(empty, hdr).any()
    assert _dciodvfy_errors(empty) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.dcm", "multi.dcm"]

    with pytest.raises(ValueError, match="class 2"):
        build_seg(hdr, labels, num_classes=2, model="unet")
    with pytest.raises(ValueError, match="does not match"):
        build_seg(hdr, labels[:-1], num_classes=3, model="unet")


def test_seg_writer_multiframe_source(tmp_path: Path) -> None:
    """An enhanced CT (two frames, stored in reverse geometric order): the SEG labels the right frames."""
    data_store = pytest.importorskip("data_store")
    src = Path(data_store.__file__).parent / "data" / "eCT_Supplemental.dcm"
    if not src.is_file():
        pytest.skip("pydicom-data's eCT_Supplemental.dcm is not installed")
    (tmp_path / "images").mkdir()
    shutil.copy(src, tmp_path / "images" / "ct")
    (hdr,) = scan_site(tmp_path / "images").series
    assert len(set(hdr.files)) == 1 and len(hdr) == 2 and hdr.frames == [1, 0]
    labels = np.zeros((2, *hdr.shape), dtype=np.uint8)
    labels[0, 10:20, 30:50] = 1  # the first slice in geometric order: frame 2 of the file
    path = tmp_path / "seg.dcm"
    write_seg(path, hdr, labels, num_classes=2, model="unet")
    np.testing.assert_array_equal(load_seg(path, hdr), labels)
    seg = hd.seg.segread(path)
    by_frame = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=hdr.sop_uids[0],
        source_frame_numbers=[1, 2],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(by_frame, labels[::-1])
    assert _dciodvfy_errors(path) == []


def test_corrupt_files_are_reported_and_the_rest_predicted(
    synth_root: Path,
    seg_model_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = _copy_site(synth_root / "hospital-a", tmp_path / "sites")
    series = scan_site(site / "images").series
    partly, broken, intact = series
    truncated = partly.files[4]
    truncated.write_bytes(truncated.read_bytes()[:2000])  # header intact, pixel data cut short
    for f in broken.files:  # every image of this series: nothing left to predict
        f.write_bytes(f.read_bytes()[:2000])
    garbage = site / "images" / "not-dicom.dcm"
    garbage.write_bytes(b"\x00garbage" * 64)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = predict_site(site, seg_model_file, out, cache_root=tmp_path / "cache", device="cpu")

    assert summary.series_found == 3 and summary.series_predicted == 2
    assert summary.images_predicted == len(partly) - 1 + len(intact)
    assert [(s.series_uid, s.images) for s in summary.skipped_series] == [(broken.series_uid, len(broken))]
    assert "decoded" in summary.skipped_series[0].reason
    skipped = {s.path: s.reason for s in summary.skipped_files}

    def rel(path: Path) -> str:
        return path.relative_to(site).as_posix()

    assert set(skipped) == {rel(truncated), rel(garbage), *(rel(f) for f in broken.files)}
    assert skipped[rel(truncated)] == "pixel data could not be decoded"
    assert "DICOM" in skipped[rel(garbage)]
    assert broken.series_uid in caplog.text and "not predicted" in caplog.text
    assert str(truncated) in caplog.text and str(garbage) in caplog.text

    assert sorted(summary.files_written) == sorted(f"seg/{s.series_uid}.dcm" for s in (partly, intact))
    expected = _expected_masks(site, seg_model_file)
    hdr, labels = expected[partly.series_uid]
    assert len(hdr) == len(partly) - 1 and partly.sop_uids[4] not in hdr.sop_uids
    path = out / "seg" / f"{partly.series_uid}.dcm"
    ds = pydicom.dcmread(path)
    refs = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(hdr.sop_uids)  # the SEG references the images it labels, not the broken one
    np.testing.assert_array_equal(load_seg(path, hdr), labels)
    assert (
        json.loads((out / "predict.json").read_text())["skipped_series"][0]["series_uid"] == broken.series_uid
    )


def test_a_series_that_fails_to_predict_does_not_stop_the_others(
    synth_root: Path,
    seg_model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = scan_site(synth_root / "hospital-a" / "images").series[0].series_uid
    real = predict_mod.write_seg

    def failing(path: Path, hdr: SeriesHeader, labels: np.ndarray, **kw: object) -> None:
        if hdr.series_uid == first:
            raise RuntimeError("disk on fire")
        real(path, hdr, labels, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(predict_mod, "write_seg", failing)
    with caplog.at_level(logging.WARNING):
        summary = predict_site(
            synth_root / "hospital-a",
            seg_model_file,
            tmp_path / "out",
            cache_root=tmp_path / "cache",
            device="cpu",
        )
    assert summary.series_predicted == 2 and len(summary.files_written) == 2
    assert [s.series_uid for s in summary.skipped_series] == [first]
    assert "disk on fire" in summary.skipped_series[0].reason and "disk on fire" in caplog.text
    assert not (tmp_path / "out" / "seg" / f"{first}.dcm").exists()


# --- classification: CSV --------------------------------------------------------------------------


def _check_probabilities(rows: list[dict[str, str]], num_classes: int) -> None:
    for row in rows:
        probs = [row[f"prob_class{c}"] for c in range(num_classes)]
        assert all(re.fullmatch(r"[01]\.\d{4}", p) for p in probs), probs
        values = np.array([float(p) for p in probs])
        assert abs(values.sum() - 1.0) <= 1e-3
        assert values[int(row["predicted_class"])] == values.max()  # the argmax (a tie may round either way)


def test_image_classifier_writes_one_row_per_image(image_root: Path, tmp_path: Path) -> None:
    cfg = RunConfig(task="classification", model="resnet18", image_size=32, device="cpu")
    torch.manual_seed(0)
    model_file = _save_model(tmp_path / "run", build_model(cfg), cfg)
    site = image_root / "hospital-a"
    out = tmp_path / "out"
    summary = predict_site(site, model_file, out, cache_root=tmp_path / "cache", device="cpu")
    truth = _uids_of_files(site / "images")
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0]) == [
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameNumber",
        "predicted_class",
        "prob_class0",
        "prob_class1",
    ]
    assert len(rows) == len(truth) == summary.images_predicted
    assert {r["SOPInstanceUID"] for r in rows} == set(truth)
    for r in rows:
        assert (r["StudyInstanceUID"], r["SeriesInstanceUID"]) == truth[r["SOPInstanceUID"]]
        assert r["FrameNumber"] == ""
    _check_probabilities(rows, 2)
    assert len({r["prob_class1"] for r in rows}) > 1  # the images get their own predictions
    assert summary.files_written == ["predictions.csv"]
    assert summary.series_predicted == summary.series_found == len({s for _, s in truth.values()})


def test_exam_classifier_writes_one_row_per_series(exam_root: Path, tmp_path: Path) -> None:
    cfg = RunConfig(task="classification", model="mil", image_size=32, base_channels=4, device="cpu")
    torch.manual_seed(0)
    model_file = _save_model(tmp_path / "run", build_model(cfg), cfg)
    site = exam_root / "hospital-a"
    summary = predict_site(site, model_file, tmp_path / "out", cache_root=tmp_path / "cache", device="cpu")
    truth = _uids_of_files(site / "images")
    series = {s: st for st, s in truth.values()}
    rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == len(series) == summary.series_predicted
    assert {r["SeriesInstanceUID"]: r["StudyInstanceUID"] for r in rows} == series
    assert all(r["SOPInstanceUID"] == "" and r["FrameNumber"] == "" for r in rows)
    _check_probabilities(rows, 2)
    assert summary.images_predicted == len(truth)


# --- errors ---------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_missing_data_folder(seg_model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FedscanError, match="data folder not found") as err:
        predict_site(tmp_path / "nowhere", seg_model_file, out, cache_root=tmp_path / "cache", device="cpu")
    assert "nowhere" in str(err.value) and err.value.hint
    assert not out.exists()


def test_data_folder_without_images(seg_model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    with pytest.raises(FedscanError, match="no images/ folder"):
        predict_site(
            tmp_path / "site", seg_model_file, tmp_path / "out", cache_root=tmp_path / "c", device="cpu"
        )
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_model_file(synth_root: Path, seg_model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FedscanError, match="model file not found") as err:
        predict_site(synth_root / "hospital-a", tmp_path / "global_model.pt", out, cache_root=tmp_path / "c")
    assert err.value.hint
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(seg_model_file.read_bytes()[:5000])
    with pytest.raises(FedscanError, match="cannot read the model file"):
        predict_site(synth_root / "hospital-a", corrupt, out, cache_root=tmp_path / "c")
    assert not out.exists()


def test_non_empty_out_needs_overwrite(synth_root: Path, seg_model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "seg").mkdir(parents=True)
    (out / "notes.txt").write_text("the radiologist's notes")
    (out / "seg" / "1.2.3.dcm").write_bytes(b"an earlier prediction")
    before = _snapshot(out)
    with pytest.raises(FedscanError, match="not empty") as err:
        predict_site(synth_root / "hospital-a", seg_model_file, out, cache_root=tmp_path / "c", device="cpu")
    assert "--overwrite" in (err.value.hint or "")
    assert _snapshot(out) == before  # untouched

    summary = predict_site(
        synth_root / "hospital-a",
        seg_model_file,
        out,
        cache_root=tmp_path / "c",
        device="cpu",
        overwrite=True,
    )
    after = _snapshot(out)
    assert after["notes.txt"] == b"the radiologist's notes"  # not fedscan's: kept
    assert "seg/1.2.3.dcm" not in after  # the earlier prediction's SEG: replaced
    assert sorted(after) == sorted([*summary.files_written, "predict.json", "notes.txt"])


def test_unknown_device(synth_root: Path, seg_model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FedscanError, match="unknown device 'tpu'"):
        predict_site(
            synth_root / "hospital-a",
            seg_model_file,
            tmp_path / "out",
            cache_root=tmp_path / "c",
            device="tpu",
        )
    assert not (tmp_path / "out").exists()


def test_out_inside_the_sites_images_is_refused(
    synth_root: Path, seg_model_file: Path, tmp_path: Path
) -> None:
    site = tmp_path / "hospital-a"
    shutil.copytree(synth_root / "hospital-a" / "images", site / "images")
    with pytest.raises(FedscanError, match="inside the site's images/"):
        predict_site(site, seg_model_file, site / "images" / "pred", cache_root=tmp_path / "c", device="cpu")
    assert not (site / "images" / "pred").exists()


def test_fedbn_model_needs_the_sites_layers_or_global(synth_root: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        task="segmentation",
        model="unet",
        image_size=32,
        base_channels=4,
        unet_depth=1,
        strategy="fedbn",
        device="cpu",
    )
    model_file = _save_model(tmp_path / "run", build_model(cfg), cfg)
    out = tmp_path / "out"
    with pytest.raises(FedscanError, match="normalization layers") as err:
        predict_site(synth_root / "hospital-a", model_file, out, cache_root=tmp_path / "cache", device="cpu")
    assert "--site" in (err.value.hint or "") and "--cache" in (err.value.hint or "")
    assert not out.exists()
    summary = predict_site(
        synth_root / "hospital-a",
        model_file,
        out,
        cache_root=tmp_path / "cache",
        device="cpu",
        use_global=True,
    )
    assert summary.kind == "global" and summary.series_predicted == 3
    # the layers the site stored while training, under the run's settings on its machine (its own data
    # folder, cache and device: not part of the run's key), are found from the model file
    from fedscan.common.tasks.fedbn_layers import LocalLayers

    trained = cfg.model_copy(
        update={
            "data_root": tmp_path / "elsewhere",
            "cache_dir": tmp_path / "cache",
            "device": "auto",
            "rounds": 7,
        }
    )
    LocalLayers(tmp_path / "cache", trained, "site-7").save(1, build_model(cfg))
    personal = predict_site(
        synth_root / "hospital-a",
        model_file,
        tmp_path / "out2",
        cache_root=tmp_path / "cache",
        device="cpu",
        site_name="site-7",
    )
    assert personal.kind == "personalized" and personal.site == "site-7"
