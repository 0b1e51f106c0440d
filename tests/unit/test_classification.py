"""Classification end to end without Flower: synthetic exams, labels.csv, samples, train and evaluate."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedscan.common.config import RunConfig
from fedscan.common.data.dicom import scan_site
from fedscan.common.data.labels import read_class_labels
from fedscan.common.data.layout import discover_sites
from fedscan.common.data.site_arrays import prepare_site
from fedscan.common.data.synthetic import EXAM_SLICES, make_profiles
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.common.tasks import classification
from fedscan.common.tasks.local_training import LocalSite, open_site
from fedscan.common.tasks.precision import choose_precision

CFG = RunConfig(task="classification", image_size=32, batch_size=2)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_synthetic_exams_and_labels(exam_root: Path, image_root: Path) -> None:
    profiles = make_profiles(3, 0, "classification")
    assert len({p.lesion_prevalence for p in profiles}) == 3  # prevalence differs between sites
    assert [p.n_patients for p in profiles] == sorted(p.n_patients for p in profiles)
    site = exam_root / "hospital-b"
    rows = _rows(site / "labels" / "labels.csv")
    assert list(rows[0]) == ["SeriesInstanceUID", "label"] and len(rows) == 12
    series = {s.series_uid: s for s in scan_site(site / "images").series}
    assert {r["SeriesInstanceUID"] for r in rows} == set(series)
    lengths = {len(s.files) for s in series.values()}
    assert len(lengths) > 1 and min(lengths) >= EXAM_SLICES[0] and max(lengths) <= EXAM_SLICES[1]
    # an exam is positive exactly when one of its images shows the lesion (no label noise at site a)
    site_a = exam_root / "hospital-a"
    exam_label = {r["SeriesInstanceUID"]: int(r["label"]) for r in _rows(site_a / "labels" / "labels.csv")}
    image_label = {
        r["SOPInstanceUID"]: int(r["label"])
        for r in _rows(image_root / "hospital-a" / "labels" / "labels.csv")
    }
    for s in scan_site(site_a / "images").series:
        assert exam_label[s.series_uid] == max(image_label[u] for u in s.sop_uids)
    assert 0 < sum(exam_label.values()) < len(exam_label)


def test_exam_samples_keep_slices_in_geometric_order(exam_root: Path, tmp_path: Path) -> None:
    site = discover_sites(exam_root)[0]
    data = prepare_site(site, CFG, tmp_path)
    headers = sorted(scan_site(site.images).series, key=lambda s: s.series_uid)
    assert data.n_samples == 8 and len(data) == sum(len(h.files) for h in headers)
    assert sorted(len(ix) for ix in data.slices_of()) == sorted(len(h.files) for h in headers)
    for ix in data.slices_of():
        assert np.all(np.diff(ix) == 1) and np.unique(data.series[ix]).size == 1
    cached = prepare_site(site, CFG, tmp_path)  # the cache round-trips the sample arrays
    np.testing.assert_array_equal(cached.sample, data.sample)
    np.testing.assert_array_equal(cached.target, data.target)


def test_study_and_image_keys(exam_root: Path, image_root: Path, tmp_path: Path) -> None:
    site = tmp_path / "h"
    shutil.copytree(exam_root / "hospital-a", site)
    headers = scan_site(site / "images").series
    exam = {r["SeriesInstanceUID"]: r["label"] for r in _rows(site / "labels" / "labels.csv")}
    lines = ["StudyInstanceUID,label"] + [f"{h.study_uid},{exam[h.series_uid]}" for h in headers]
    (site / "labels" / "labels.csv").write_text("\n".join(lines) + "\n")
    data = prepare_site(discover_sites(tmp_path)[0], CFG, None)
    assert data.n_samples == len(headers)
    # image labels: every image is its own sample; mil takes them as exams of one image
    data = prepare_site(discover_sites(image_root)[0], CFG, None)
    assert data.n_samples == len(data) and all(len(ix) == 1 for ix in data.slices_of())


BAD_CSV = [
    ("uid,label\n1.2.3,0\n", "exactly one of SOPInstanceUID"),
    ("SeriesInstanceUID,StudyInstanceUID,label\n1.2,1.3,0\n", "exactly one of"),
    ("SeriesInstanceUID,label\n1.2.3,yes\n", "line 2: the label is not a class index 0..1"),
    ("SeriesInstanceUID,label\n1.2.3,2\n", "line 2: class 2 is outside 0..1"),
    (
        "SeriesInstanceUID,label\n1.2.3,0\n1.2.3,1\n",
        "line 3: SeriesInstanceUID listed again with another label",
    ),
    ("SeriesInstanceUID,label\n", "holds no label rows"),
    ("SeriesInstanceUID,label\n,1\n", "line 2: empty SeriesInstanceUID"),
]


@pytest.mark.parametrize("text,message", BAD_CSV)
def test_labels_csv_errors_name_the_line(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(FedscanError, match=message):
        read_class_labels(path, num_classes=2)


def test_unknown_and_missing_labels_are_reported(exam_root: Path, tmp_path: Path, caplog) -> None:
    site = tmp_path / "h"
    shutil.copytree(exam_root / "hospital-a", site)
    rows = _rows(site / "labels" / "labels.csv")
    kept = rows[2:]  # two exams lose their label
    lines = ["SeriesInstanceUID,label", "1.2.999.1,1"] + [
        f"{r['SeriesInstanceUID']},{r['label']}" for r in kept
    ]
    (site / "labels" / "labels.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        data = prepare_site(discover_sites(tmp_path)[0], CFG, None)
    assert data.n_samples == 6
    assert "1 row(s) of labels.csv match no image SeriesInstanceUID" in caplog.text
    assert "2 of 8 series have no label and are not used" in caplog.text
    assert "1.2.999.1" not in caplog.text  # counts, not identifiers


def test_image_model_rejects_exam_labels(exam_root: Path) -> None:
    cfg = RunConfig(task="classification", model="resnet18", image_size=32)
    with pytest.raises(FedscanError, match="classifies single images.*whole exams"):
        open_site(discover_sites(exam_root)[0], cfg, None)


def test_balanced_class_weights() -> None:
    cfg = RunConfig(task="classification", class_weights="balanced", num_classes=3)
    w = classification.loss_weights(cfg, np.array([0, 0, 0, 1]))
    # n / (present classes * n_c): 4 / (2 * 3) and 4 / (2 * 1); an absent class keeps 1
    np.testing.assert_allclose(w.numpy(), [4 / 6, 2.0, 1.0], rtol=1e-6)
    assert classification.loss_weights(CFG, np.array([0, 1])) is None
    fixed = RunConfig(task="classification", class_weights=[1.0, 3.0])
    assert classification.loss_weights(fixed, np.array([0])).tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="class_weights has 3 values but num_classes is 2"):
        RunConfig(task="classification", class_weights=[1.0, 1.0, 1.0])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One CPU thread for this test only (later tests keep the machine's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["mil", "resnet18"])
def test_train_and_evaluate_are_deterministic(
    model: str, exam_root: Path, image_root: Path, tmp_path: Path, one_thread: None
) -> None:
    root = exam_root if model == "mil" else image_root
    cfg = RunConfig(task="classification", model=model, image_size=32, batch_size=4, class_weights="balanced")
    site = open_site(discover_sites(root)[1], cfg, tmp_path)
    precision = choose_precision(torch.device("cpu"))
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_model(cfg)
        m = classification.train(
            net, site.data, site.train_idx, cfg, epochs=1, lr=1e-3, batch_size=4, seed=7, precision=precision
        )
        weights.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)
    n_train = site.data.samples_of(site.train_idx).size
    assert m["num-examples"] == n_train and math.isfinite(m["train_loss"])
    ev = classification.evaluate(net, site.data, site.val_idx, cfg, precision=precision)
    n_val = site.data.samples_of(site.val_idx).size
    assert ev["num-examples"] == n_val and n_train + n_val == site.data.n_samples
    assert set(classification.METRICS) <= set(ev) and 0.0 <= ev["balanced_accuracy"] <= 1.0
    assert ev["loss"] > 0


def test_precision_choice() -> None:
    cpu = choose_precision(torch.device("cpu"), amp=True, channels_last=True)
    assert cpu.amp_dtype is None and not cpu.channels_last and not cpu.pin_memory  # CPU stays fp32
    bf16 = choose_precision(torch.device("cuda"), bf16_supported=True)
    assert bf16.amp_dtype == torch.bfloat16 and bf16.channels_last and bf16.pin_memory
    fp16 = choose_precision(torch.device("cuda"), bf16_supported=False, channels_last=False)
    assert fp16.amp_dtype == torch.float16 and not fp16.channels_last
    off = choose_precision(torch.device("cuda"), amp=False)
    assert off.amp_dtype is None and off.channels_last
    x = torch.zeros(2, 1, 8, 8)
    assert cpu.place(x).is_contiguous()


def test_site_description_holds_no_identifiers(exam_root: Path) -> None:
    site: LocalSite = open_site(discover_sites(exam_root)[0], CFG, None)
    text = site.describe()
    assert "8 exams, per class" in text and "1.2." not in text


def test_exam_spanning_two_patients_is_refused(exam_root: Path, tmp_path: Path) -> None:
    import pydicom

    site = tmp_path / "h"
    shutil.copytree(exam_root / "hospital-a", site)
    first, second = scan_site(site / "images").series[:2]
    for path in second.files:  # the second patient's series filed under the first one's study
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = first.study_uid
        ds.save_as(path)
    (site / "labels" / "labels.csv").write_text(f"StudyInstanceUID,label\n{first.study_uid},1\n")
    with pytest.raises(FedscanError, match="1 labelled exam\\(s\\) hold images of more than one PatientID"):
        prepare_site(discover_sites(tmp_path)[0], CFG, None)


def test_non_finite_loss_stops_training() -> None:
    from fedscan.common.tasks.loops import fit

    model = torch.nn.Linear(3, 2)
    batches = [(torch.ones(2, 3), torch.tensor([0, 1]))]
    nan_loss = lambda out, y: out.sum() * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="not finite"):
        fit(
            model,
            lambda: batches,
            nan_loss,
            epochs=1,
            lr=1e-3,
            precision=choose_precision(torch.device("cpu")),
        )
    ok = fit(
        torch.nn.Linear(3, 2),
        lambda: batches,
        torch.nn.CrossEntropyLoss(),
        epochs=2,
        lr=1e-3,
        precision=choose_precision(torch.device("cpu")),
    )
    assert ok["steps"] == 2.0 and math.isfinite(ok["train_loss"])
