"""`fedscan simulate` end to end through Flower's simulation engine, and its bad-input paths."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

FEDSCAN = [sys.executable, "-m", "fedscan.common.cli"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([*FEDSCAN, *args], capture_output=True, text=True, timeout=timeout, env=env)


def flower_processes() -> set[int]:
    names = (
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-simulation",
        "flwr-serverapp",
        "flwr-clientapp",
        "fedscan.client.site_executor",  # a site's task executor and its fork server
        "fedscan.client.site_worker",
        "raylet",
        "gcs_server",
    )
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names):
            found.add(p.info["pid"])
    return found


@pytest.mark.integration
def test_two_sites_two_rounds(synth_root: Path, tmp_path: Path) -> None:
    before = flower_processes()
    out = tmp_path / "out"
    res = run_cli(
        "simulate",
        "--data-root",
        str(synth_root),
        "--rounds",
        "2",
        "--out",
        str(out),
        "--image-size",
        "32",
        "--local-epochs",
        "1",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--baselines",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 1/2 done" in res.stderr and "round 2/2 done" in res.stderr

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    assert (report["task"], report["model"], report["strategy"]) == ("segmentation", "unet", "fedavg")
    assert report["rounds"] == 2 and report["rounds_completed"] == 2
    assert report["sites"] == ["hospital-a", "hospital-b"]
    assert [h["round"] for h in report["history"]] == [1, 2]
    for h in report["history"]:
        assert set(h["per_site"]) == {"hospital-a", "hospital-b"}
    final = report["final"]
    assert set(final["per_site"]) == {"hospital-a", "hospital-b"}
    # validation slices: whole patients of 12 slices each
    assert final["per_site"]["hospital-a"]["num_examples"] == 12
    assert final["per_site"]["hospital-b"]["num_examples"] % 12 == 0
    for row in final["per_site"].values():
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["iou"] <= 1.0
        assert set(row) == {
            "dice",
            "iou",
            "hd95",
            "lesion_sensitivity",
            "lesion_fp_per_image",
            "loss",
            "num_examples",
            "uncertainty_auroc",
        }  # the final round adds its explanation score
    assert "uncertainty_auroc" not in report["history"][0]["per_site"]["hospital-a"]
    # what the sites' explanations share: one number each, nothing of their images or files
    assert report["explanation_scores"] == {
        s: {"uncertainty_auroc": row["uncertainty_auroc"]} for s, row in final["per_site"].items()
    }
    assert all(0.0 <= row["uncertainty_auroc"] <= 1.0 for row in final["per_site"].values())
    text = (out / "report.json").read_text()
    uids = [p.name.removesuffix(".nii.gz") for p in synth_root.glob("*/labels/*.nii.gz")]
    assert uids and not [u for u in uids if u in text]
    dices = [r["dice"] for r in final["per_site"].values()]
    assert final["mean"]["dice"] == pytest.approx(sum(dices) / 2)
    assert final["worst"]["dice"] == pytest.approx(min(dices))

    rows = list(csv.DictReader((out / "per_site.csv").open()))
    assert len(rows) == 4 and {r["site"] for r in rows} == {"hospital-a", "hospital-b"}
    md = (out / "report.md").read_text()
    assert "| hospital-a |" in md and "**mean**" in md and "Worst site" in md
    assert (out / "global_model.pt").is_file() and (out / "run_config.toml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]

    # --baselines: every model at every site; the global row is the federated evaluation's
    sites = ["hospital-a", "hospital-b"]
    cross = report["cross_site"]
    assert set(cross) == {"global", "pooled", "local:hospital-a", "local:hospital-b"}
    assert all(set(row) == set(sites) for row in cross.values())
    for s in sites:
        assert cross["global"][s]["dice"] == pytest.approx(final["per_site"][s]["dice"], abs=1e-6)
        assert report["federated_gain"][s] == pytest.approx(
            cross["global"][s]["dice"] - cross[f"local:{s}"][s]["dice"], abs=1e-6
        )
    base = report["baselines"]
    steps = sum(base["steps_per_site"].values())
    assert steps <= base["pooled_steps"] <= steps + 2 * 2  # 2 rounds x 1 epoch, a batch per site and epoch
    assert set(report["quality"]) == set(sites) and all(q["snr"] > 0 for q in report["quality"].values())
    assert "Cross-site evaluation" in md and "## Explanation scores" in md
    html = (out / "report.html").read_text()
    assert 'id="cross-site-heatmap"' in html and (out / "figures" / "cross_site.png").is_file()

    from fedscan.common.config import RunConfig
    from fedscan.common.models.registry import build_model
    from fedscan.server.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "global_model.pt")
    assert ckpt["round"] == 2
    model = build_model(RunConfig.model_validate(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])  # the saved weights fit the configured model
    # nothing of Flower or Ray is left running
    assert flower_processes() - before == set()


BAD_INPUT = [
    (["--data-root", "{tmp}/missing"], "does not exist"),
    (["--data-root", "{tmp}/nodicom"], "no DICOM among"),
    (["--data-root", "{tmp}/nolabels"], "has images but no labels"),
    (["--model", "vgg"], "unknown model 'vgg'; allowed: unet, segnet, densenet121, resnet18, mil"),
    (["--task", "classification", "--model", "unet"], "model 'unet' does not do classification"),
    (["--task", "classification", "--data-root", "{synth}"], "has images but no class labels"),
    (
        ["--task", "classification", "--model", "resnet18", "--data-root", "{cls}"],
        "model 'resnet18' classifies single images, but this site's labels.csv labels whole exams",
    ),
    (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'; allowed: fedavg"),
    (["--rounds", "0"], "rounds (from --rounds): Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(
    "args,message",
    BAD_INPUT,
    ids=[
        "missing-root",
        "no-dicom",
        "no-labels",
        "model",
        "task-model",
        "no-class-labels",
        "image-model-exam-labels",
        "strategy",
        "rounds",
    ],
)
def test_bad_input_is_a_clear_error(
    args: list[str], message: str, synth_root: Path, exam_root: Path, tmp_path: Path
) -> None:
    (tmp_path / "nodicom" / "site1" / "images").mkdir(parents=True)
    (tmp_path / "nodicom" / "site1" / "images" / "scan.jpg").write_bytes(b"\xff\xd8not dicom")
    shutil.copytree(synth_root / "hospital-a" / "images", tmp_path / "nolabels" / "hospital-a" / "images")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, synth=synth_root, cls=exam_root) for a in args]
    res = run_cli("simulate", "--out", str(out), *args, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (out / "report.json").exists()


def test_refuses_to_mix_runs(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    res = run_cli("simulate", "--out", str(out), "--data-root", str(synth_root), timeout=120)
    assert res.returncode == 2
    assert "already holds results of a run" in res.stderr and "--overwrite" in res.stderr
    assert (out / "report.json").read_text() == "{}"


@pytest.mark.integration
def test_exam_classification_with_attention_mil(exam_root: Path, tmp_path: Path) -> None:
    before = flower_processes()
    out = tmp_path / "out"
    res = run_cli(
        "simulate",
        "--task",
        "classification",
        "--data-root",
        str(exam_root),
        "--rounds",
        "1",
        "--out",
        str(out),
        "--image-size",
        "32",
        "--local-epochs",
        "1",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 1/1 done: mean balanced_accuracy" in res.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["task"], report["model"]) == ("classification", "mil")  # the task's default model
    assert report["metrics"]["main"] == "balanced_accuracy"
    manifest = json.loads((exam_root / "manifest.json").read_text())
    for site, row in report["final"]["per_site"].items():
        assert list(row)[:6] == ["auroc", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy"]
        assert 0.0 <= row["balanced_accuracy"] <= 1.0
        assert row["auroc"] is None or 0.0 <= row["auroc"] <= 1.0  # null: one class in validation
        # examples are exams: about a quarter of the site's exams are held out
        exams = manifest["counts"][site]["exams"]
        assert 0 < row["num_examples"] < exams / 2
    # the shareable explanation scores: calibration, and Grad-CAM energy where the sites have lesion masks
    for scores in report["explanation_scores"].values():
        assert set(scores) == {"ece", "gradcam_lesion_energy", "lesion_area_share"}
        assert all(v is None or isinstance(v, float) for v in scores.values())
        assert 0.0 <= scores["ece"] <= 1.0
        # undefined (null) when no validation image of the site shows a lesion, or the map is empty
        assert scores["lesion_area_share"] is None or 0.0 < scores["lesion_area_share"] < 0.1
    md = (out / "report.md").read_text()
    assert "| site | AUROC | balanced accuracy |" in md and "validation exams" in md
    assert "Grad-CAM energy in lesion" in md
    assert flower_processes() - before == set()


@pytest.mark.integration
def test_segnet_with_fedbn_under_secagg_from_a_config_file(synth_root: Path, tmp_path: Path) -> None:
    """SegNet (BatchNorm: float running statistics and an integer step counter) from a config file,
    trained with FedBN under SecAgg+: the global model's normalization layers never move (their
    masked updates are zero), each site keeps its own per round, and the cross-site matrix holds
    each site's personalized model."""
    config = tmp_path / "fedbn.toml"
    config.write_text(
        'model = "segnet"\nsegnet-width = 0.125\nimage-size = 32\nlocal-epochs = 1\nrounds = 2\n'
        'strategy = "fedbn"\nsecagg = true\n'
    )
    out = tmp_path / "out"
    res = run_cli(
        "simulate",
        "--config",
        str(config),
        "--data-root",
        str(synth_root),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--baselines",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "fedbn" and report["secagg"] is True and report["status"] == "complete"
    assert [h["aggregation"]["sites_aggregated"] for h in report["history"]] == [2, 2]
    assert [h["aggregation"]["records_seen_by_strategy"] for h in report["history"]] == [1, 1]
    for row in report["final"]["per_site"].values():
        assert 0.0 <= row["dice"] <= 1.0
        assert row["lesion_fp_per_image"] is not None and row["lesion_fp_per_image"] >= 0.0
    assert "lesion sensitivity" in (out / "report.md").read_text()

    from fedscan.common.config import RunConfig
    from fedscan.common.models.registry import build_model
    from fedscan.common.weights import norm_keys

    saved = torch.load(out / "global_model.pt", weights_only=True)
    run = RunConfig.model_validate(saved["config"])
    assert run.strategy == "fedbn" and run.secagg
    torch.manual_seed(run.seed)  # the ServerApp's initial model
    initial = build_model(run).state_dict()
    final = saved["state_dict"]
    local = norm_keys(build_model(run))
    assert local and all(torch.equal(final[k], initial[k]) for k in local)  # never sent, never averaged
    counters = [k for k in final if k.endswith("num_batches_tracked")]
    assert counters and all(int(final[k]) == 0 for k in counters)  # step counters never left the sites
    assert any(not torch.equal(final[k], initial[k]) for k in final if k not in local)  # the rest trained
    for site in ("hospital-a", "hospital-b"):
        rounds = sorted(p.name for p in (out / "cache" / "fedbn").glob(f"*/{site}/round-*.pt"))
        assert rounds == ["round-001.pt", "round-002.pt"], rounds
    cross = report["cross_site"]
    assert {"personalized:hospital-a", "personalized:hospital-b", "global", "pooled"} <= set(cross)
    for site in ("hospital-a", "hospital-b"):  # each site's own evaluation was of its personalized model
        assert cross[f"personalized:{site}"][site]["dice"] == pytest.approx(
            report["final"]["per_site"][site]["dice"], abs=1e-6
        )
        assert report["federated_gain_model"][site] == f"personalized:{site}"


def test_synth_classification_cli(tmp_path: Path) -> None:
    out = tmp_path / "exams"
    res = run_cli("synth", "--task", "classification", "--sites", "1", "--out", str(out), "--seed", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hospital-a: 32 exams" in res.stdout
    rows = list(csv.DictReader((out / "hospital-a" / "labels" / "labels.csv").open()))
    assert len(rows) == 32 and set(rows[0]) == {"SeriesInstanceUID", "label"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "classification" and manifest["label_level"] == "exam"
    assert sum(int(r["label"]) for r in rows) == manifest["counts"]["hospital-a"]["labelled_positive"]
    bad = run_cli(
        "synth", "--task", "classification", "--label-level", "series", "--out", str(tmp_path / "x")
    )
    assert bad.returncode == 2 and "unknown label level 'series'; allowed: exam, image" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_bad_labels_keep_earlier_results(exam_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "sites"
    shutil.copytree(exam_root, root)
    (root / "hospital-b" / "labels" / "labels.csv").write_text("SeriesInstanceUID,label\n1.2.3,7\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    res = run_cli(
        "simulate",
        "--task",
        "classification",
        "--data-root",
        str(root),
        "--out",
        str(out),
        "--overwrite",
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "labels.csv line 2: class 7 is outside 0..1" in res.stderr and "Traceback" not in res.stderr
    assert (out / "report.json").read_text() == "{}"  # the earlier run's results are untouched
