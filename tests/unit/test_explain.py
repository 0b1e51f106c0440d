"""Explanations at the site: Grad-CAM, integrated gradients, MIL attention, TTA uncertainty, the
shareable scores, `fedscan site explain` and its page, and that explain and predict send nothing."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_small_exam_sites
from flwr.app import ArrayRecord
from typer.testing import CliRunner

from fedscan.common.cli import app
from fedscan.common.config import RunConfig
from fedscan.common.data.layout import SiteDir
from fedscan.common.models.mil import AttentionMIL
from fedscan.common.models.registry import build_model
from fedscan.common.tasks import classification, segmentation
from fedscan.common.tasks.attribution import exam_attention, gradcam, integrated_gradients, lesion_energy
from fedscan.common.tasks.local_training import LocalSite, open_site, run_precision, site_seed
from fedscan.common.tasks.metrics import expected_calibration_error
from fedscan.common.tasks.uncertainty import lesion_confidences, predictive_entropy, tta_predict
from fedscan.server.checkpoint import save_round

runner = CliRunner()


def _train(
    cfg: RunConfig, site: LocalSite, epochs: int, lr: float, batch_size: int, rounds: int = 1
) -> torch.nn.Module:
    """Train as a site does in a federation: ``rounds`` rounds of ``epochs`` local epochs, each with a
    fresh optimizer and the site's seed for that round."""
    torch.manual_seed(0)
    model = build_model(cfg)
    task = classification if cfg.task == "classification" else segmentation
    for r in range(1, rounds + 1):
        task.train(
            model,
            site.data,
            site.train_idx,
            cfg,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=site_seed(cfg.seed, site.name, r),
            precision=run_precision(cfg),
        )
    return model.eval()


def _model_file(folder: Path, model: torch.nn.Module, cfg: RunConfig) -> Path:
    save_round(folder, 1, ArrayRecord(model.state_dict()), cfg)
    return folder / "global_model.pt"


@pytest.fixture(scope="module")
def seg(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small U-Net trained on the larger synthetic hospital (15 patients)."""
    cfg = RunConfig(
        task="segmentation",
        model="unet",
        image_size=64,
        base_channels=8,
        unet_depth=3,
        batch_size=8,
        device="cpu",
    )
    cache = tmp_path_factory.mktemp("seg-cache")
    site_dir = SiteDir("hospital-b", synth_root / "hospital-b")
    site = open_site(site_dir, cfg, cache)
    model = _train(cfg, site, epochs=30, lr=3e-3, batch_size=8)
    return {
        "cfg": cfg,
        "site": site,
        "dir": site_dir.path,
        "cache": cache,
        "model": model,
        "file": _model_file(tmp_path_factory.mktemp("seg-run"), model, cfg),
    }


@pytest.fixture(scope="module")
def exams(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The attention-MIL model trained on 100 synthetic exams (half with a liver lesion)."""
    root = write_small_exam_sites(tmp_path_factory.mktemp("mil") / "sites", exams=(100,), label_level="exam")
    cfg = RunConfig(task="classification", model="mil", image_size=64, base_channels=8, device="cpu")
    cache = tmp_path_factory.mktemp("mil-cache")
    name = next(p.name for p in root.iterdir() if p.is_dir())
    site = open_site(SiteDir(name, root / name), cfg, cache)
    model = _train(cfg, site, epochs=1, lr=1e-3, batch_size=4, rounds=10)
    return {
        "cfg": cfg,
        "site": site,
        "dir": root / name,
        "cache": cache,
        "model": model,
        "file": _model_file(tmp_path_factory.mktemp("mil-run"), model, cfg),
    }


# --- the scores --------------------------------------------------------------------------------


def test_gradcam_of_a_trained_classifier_falls_on_the_lesion(tmp_path: Path) -> None:
    """ResNet-18 trained on the images of synthetic exams (labelled per image): on validation images
    that show the lesion, Grad-CAM puts more than 4 times as much of its energy inside the lesion as
    the lesion's share of the image area; integrated gradients more than twice."""
    root = write_small_exam_sites(tmp_path / "sites", exams=(48,), label_level="image")
    cfg = RunConfig(
        task="classification",
        model="resnet18",
        image_size=96,
        batch_size=16,
        device="cpu",
        class_weights="balanced",
    )
    name = next(p.name for p in root.iterdir() if p.is_dir())
    site = open_site(SiteDir(name, root / name), cfg, tmp_path / "cache")
    assert site.data.lesion is not None  # synthetic exams carry their lesion masks
    model = _train(cfg, site, epochs=4, lr=1e-3, batch_size=16)
    ev = classification.evaluate(
        model, site.data, site.val_idx, cfg, precision=run_precision(cfg), scores=True
    )
    assert ev["auroc"] > 0.9  # the classifier has learnt to find the lesion
    assert 0.0 < ev["lesion_area_share"] < 0.05
    assert ev["gradcam_lesion_energy"] > 4 * ev["lesion_area_share"], ev
    assert 0.0 <= ev["ece"] <= 1.0
    # integrated gradients, on the same lesion images
    samples = site.data.samples_of(site.val_idx)
    idx = [classification.lesion_images(site.data, int(k)) for k in samples]
    keep = [(i, m) for i, m in idx if len(i) and (m == 1).any()]
    x = torch.from_numpy(np.array(site.data.images[np.concatenate([i for i, _ in keep])]))[:, None]
    ig = np.abs(integrated_gradients(model, "resnet18", x, 1))
    inside, area = lesion_energy(ig, np.concatenate([m for _, m in keep]))
    assert inside > 2 * area
    # without scores (the rounds before the last) no Grad-CAM is computed
    plain = classification.evaluate(model, site.data, site.val_idx, cfg, precision=run_precision(cfg))
    assert "gradcam_lesion_energy" not in plain and plain["ece"] == pytest.approx(ev["ece"])
    # `fedscan site explain` on the image classifier: one case per validation image, the worst first
    out = tmp_path / "explain"
    result = runner.invoke(
        app,
        [
            "site",
            "explain",
            "--data",
            str(root / name),
            "--model",
            str(_model_file(tmp_path / "run", model, cfg)),
            "--out",
            str(out),
            "--n",
            "2",
            "--cache",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    ex = json.loads((out / "explain.json").read_text())
    assert ex["validation_cases"] == len(samples) == len(ex["cases"]) and ex["shown"] == 2
    assert ex["scores"]["gradcam_lesion_energy"] == pytest.approx(ev["gradcam_lesion_energy"])
    p_true = [c["probabilities"][c["true_class"]] for c in ex["cases"]]
    assert p_true == sorted(p_true) and {c["kind"] for c in ex["cases"]} == {"image"}
    assert all(c["slice"] is not None and c["attention"] is None for c in ex["cases"])


def test_mil_attention_is_highest_on_lesion_slices(exams: dict) -> None:
    """On the validation exams that hold a lesion, the images showing it get, on average, more than
    twice the attention of the others, and more than the uniform 1/n."""
    data, model = exams["site"].data, exams["model"]
    lesion, other, ratio_to_uniform = [], [], []
    for k in data.samples_of(exams["site"].val_idx):
        idx, masks = classification.lesion_images(data, int(k))
        shows = masks.reshape(len(idx), -1).max(1) == 1
        if not shows.any():
            continue
        bag = torch.from_numpy(np.array(data.images[idx]))[:, None]
        _, attention = exam_attention(model, bag)
        assert attention.sum() == pytest.approx(1.0, abs=1e-5)
        lesion.append(attention[shows].mean())
        other.append(attention[~shows].mean())
        ratio_to_uniform.append(attention[shows].mean() * len(idx))
    assert len(lesion) >= 5
    assert np.mean(lesion) > 2 * np.mean(other), (np.mean(lesion), np.mean(other))
    assert np.mean(ratio_to_uniform) > 1.5


def test_uncertainty_separates_wrong_voxels_from_right_ones(seg: dict) -> None:
    site, cfg = seg["site"], seg["cfg"]
    ev = segmentation.evaluate(
        seg["model"], site.data, site.val_idx, cfg, precision=run_precision(cfg), scores=True
    )
    assert ev["dice"] > 0.5
    assert ev["uncertainty_auroc"] > 0.7, ev
    # the plain prediction is unchanged by the uncertainty pass
    plain = segmentation.evaluate(seg["model"], site.data, site.val_idx, cfg, precision=run_precision(cfg))
    assert plain["dice"] == pytest.approx(ev["dice"]) and "uncertainty_auroc" not in plain


def test_gradcam_of_an_exam_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = AttentionMIL(1, 2, base_channels=4, chunk_size=4).eval()
    bag = torch.randn(10, 1, 32, 32)
    maps = gradcam(model, "mil", bag, 1)
    assert maps.shape == (10, 32, 32) and (maps >= 0).all() and maps.sum() > 0
    assert model.chunk_size == 4 and not model.encoder.features[5]._forward_hooks
    assert all(p.grad is None for p in model.parameters())
    model.chunk_size = 100  # in evaluation the chunking does not change the exam's map
    np.testing.assert_allclose(gradcam(model, "mil", bag, 1), maps, atol=1e-6)


def test_entropy_and_lesion_confidence() -> None:
    uniform = torch.full((1, 4, 2, 2), 0.25)
    sure = torch.zeros((1, 4, 2, 2))
    sure[:, 2] = 1.0
    assert predictive_entropy(uniform) == pytest.approx(np.ones((1, 2, 2)))
    assert predictive_entropy(sure) == pytest.approx(np.zeros((1, 2, 2)), abs=1e-6)
    pred = np.zeros((6, 6), np.uint8)
    pred[0:2, 0:2] = 1
    pred[4:6, 3:6] = 1
    probs = np.zeros((2, 6, 6), np.float32)
    probs[1, 0:2, 0:2] = 0.9
    probs[1, 4:6, 3:6] = 0.6
    probs[0] = 1 - probs[1]
    assert sorted(lesion_confidences(pred, probs)) == [(1, 4, pytest.approx(0.9)), (1, 6, pytest.approx(0.6))]


def test_tta_averages_mirrored_passes() -> None:
    """A model that sees only the left half: its mirrored passes differ, and the mean is their average."""

    class LeftHalf(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(x)
            mask[..., : x.shape[-1] // 2] = 1
            return torch.cat([torch.zeros_like(x), 4 * x * mask], 1)

    x = torch.rand(2, 1, 8, 8)
    plain, mean = tta_predict(LeftHalf(), x, run_precision(RunConfig(device="cpu")))
    assert torch.equal(plain, LeftHalf()(x))
    left = torch.softmax(LeftHalf()(x), 1)
    right = torch.softmax(LeftHalf()(x.flip(-1)), 1).flip(-1)
    up = torch.softmax(LeftHalf()(x.flip(-2)), 1).flip(-2)
    both = torch.softmax(LeftHalf()(x.flip((-2, -1))), 1).flip((-2, -1))
    assert torch.allclose(mean, (left + right + up + both) / 4, atol=1e-6)


def test_expected_calibration_error() -> None:
    # 10 cases at confidence 0.8 of which 8 right: calibrated
    probs = np.tile([0.2, 0.8], (10, 1))
    targets = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(probs, targets, 2) == pytest.approx(0.0)
    # all at confidence 0.9, half right: |0.5 - 0.9| = 0.4
    assert expected_calibration_error(
        np.tile([0.1, 0.9], (4, 1)), np.array([1, 1, 0, 0]), 2
    ) == pytest.approx(0.4)
    # two bins: 0.6 (2 cases, both right: 0.4 gap) and 1.0 (2 cases, one right: 0.5 gap) -> (0.4 + 0.5) / 2
    probs = np.array([[0.4, 0.6], [0.6, 0.4], [0.0, 1.0], [1.0, 0.0]])
    assert expected_calibration_error(probs, np.array([1, 0, 1, 1]), 2) == pytest.approx(0.45)
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int), 2))


# --- fedscan site explain -----------------------------------------------------------------------


def test_explain_segmentation_writes_a_page_with_the_worst_cases_first(seg: dict, tmp_path: Path) -> None:
    out = tmp_path / "explain"
    result = runner.invoke(
        app,
        [
            "site",
            "explain",
            "--data",
            str(seg["dir"]),
            "--model",
            str(seg["file"]),
            "--out",
            str(out),
            "--n",
            "2",
            "--cache",
            str(seg["cache"]),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "uncertainty_auroc" in result.output
    ex = json.loads((out / "explain.json").read_text())
    assert ex["task"] == "segmentation" and ex["weights"] == "global" and ex["shown"] == 2
    assert ex["validation_cases"] == len(np.unique(np.asarray(seg["site"].data.series)[seg["site"].val_idx]))
    errors = [1 - c["dice"] if c["dice"] is not None else 1.0 for c in ex["cases"]]
    assert errors == sorted(errors, reverse=True)  # the most wrong first
    site, cfg = seg["site"], seg["cfg"]
    ev = segmentation.evaluate(
        seg["model"], site.data, site.val_idx, cfg, precision=run_precision(cfg), scores=True
    )
    assert ex["scores"]["uncertainty_auroc"] == pytest.approx(ev["uncertainty_auroc"])
    assert ex["metrics"]["dice"] == pytest.approx(ev["dice"])
    shown = ex["cases"][:2]
    assert all(c["lesions"] is not None and c["figure"] for c in shown)
    assert all(c["lesions"] is None and c["figure"] is None for c in ex["cases"][2:])  # numbers only
    assert all(0.0 <= les["confidence"] <= 1.0 for c in shown for les in c["lesions"])
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["c001.png", "c002.png"]
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert shown[0]["series_uid"] in page and "uncertainty AUROC" in page
    assert page.index('id="c001"') < page.index('id="c002"')


def test_explain_mil_shows_each_images_attention(exams: dict, tmp_path: Path) -> None:
    out = tmp_path / "explain"
    result = runner.invoke(
        app,
        [
            "site",
            "explain",
            "--data",
            str(exams["dir"]),
            "--model",
            str(exams["file"]),
            "--out",
            str(out),
            "--n",
            "3",
            "--cache",
            str(exams["cache"]),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    ex = json.loads((out / "explain.json").read_text())
    assert set(ex["scores"]) == {"ece", "gradcam_lesion_energy", "lesion_area_share"}
    assert ex["scores"]["gradcam_lesion_energy"] > ex["scores"]["lesion_area_share"] > 0
    cases = ex["cases"]
    p_true = [c["probabilities"][c["true_class"]] for c in cases]
    assert p_true == sorted(p_true)  # the most wrong or uncertain first
    assert all(c["attention"] is None for c in cases[3:])  # the cases not shown have their numbers only
    for c in cases[:3]:
        assert c["kind"] == "exam" and len(c["attention"]) == c["slices"]
        assert sum(c["attention"]) == pytest.approx(1.0, abs=1e-4)
        assert c["lesion_slices"] is not None  # the site has lesion masks
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "attention" in page


def test_explain_refuses_bad_input_and_keeps_out(seg: dict, tmp_path: Path) -> None:
    base = ["site", "explain", "--cache", str(seg["cache"]), "--device", "cpu"]
    missing = runner.invoke(
        app,
        [*base, "--data", str(tmp_path / "nope"), "--model", str(seg["file"]), "--out", str(tmp_path / "o1")],
    )
    assert missing.exit_code == 2 and "site data folder not found" in missing.output
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    bad = runner.invoke(
        app, [*base, "--data", str(seg["dir"]), "--model", str(broken), "--out", str(tmp_path / "o2")]
    )
    assert bad.exit_code == 2 and "cannot read the model file" in bad.output and "Traceback" not in bad.output
    out = tmp_path / "o3"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    busy = runner.invoke(
        app, [*base, "--data", str(seg["dir"]), "--model", str(seg["file"]), "--out", str(out)]
    )
    assert busy.exit_code == 2 and "not empty" in busy.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    cuda = runner.invoke(
        app,
        [
            "site",
            "explain",
            "--cache",
            str(seg["cache"]),
            "--device",
            "gpu",
            "--data",
            str(seg["dir"]),
            "--model",
            str(seg["file"]),
            "--out",
            str(tmp_path / "o4"),
        ],
    )
    assert cuda.exit_code == 2 and "unknown device 'gpu'" in cuda.output
    # --overwrite replaces an earlier explanation and keeps the folder's other files
    for _ in range(2):
        again = runner.invoke(
            app,
            [
                *base,
                "--data",
                str(seg["dir"]),
                "--model",
                str(seg["file"]),
                "--out",
                str(out),
                "--n",
                "1",
                "--overwrite",
            ],
        )
        assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == ["cases", "explain.json", "index.html", "keep.txt"]
    assert [p.name for p in (out / "cases").iterdir()] == ["c001.png"]


# --- privacy ------------------------------------------------------------------------------------


def test_explain_and_predict_send_nothing(seg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every outbound connection refused, both commands still run to the end: they need no network."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled by the test")

    for name in ("connect", "connect_ex", "sendto", "send", "sendall"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    common = [
        "--data",
        str(seg["dir"]),
        "--model",
        str(seg["file"]),
        "--cache",
        str(seg["cache"]),
        "--device",
        "cpu",
    ]
    explained = runner.invoke(app, ["site", "explain", *common, "--out", str(tmp_path / "ex"), "--n", "1"])
    assert explained.exit_code == 0, explained.output
    predicted = runner.invoke(app, ["site", "predict", *common, "--out", str(tmp_path / "pred")])
    assert predicted.exit_code == 0, predicted.output
    assert attempts == []
    assert any((tmp_path / "pred" / "seg").glob("*.dcm")) and (tmp_path / "ex" / "index.html").is_file()
