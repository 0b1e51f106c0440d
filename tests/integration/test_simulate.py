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

FEDSCAN = [sys.executable, "-m", "fedscan.common.cli"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([*FEDSCAN, *args], capture_output=True, text=True, timeout=timeout, env=env)


def flower_processes() -> set[int]:
    names = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "raylet", "gcs_server")
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
        "simulate", "--data-root", str(synth_root), "--rounds", "2", "--out", str(out),
        "--image-size", "32", "--local-epochs", "1", "--seed", "3", "--device", "cpu",
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
        assert set(row) == {"dice", "iou", "hd95", "loss", "num_examples"}
    dices = [r["dice"] for r in final["per_site"].values()]
    assert final["mean"]["dice"] == pytest.approx(sum(dices) / 2)
    assert final["worst"]["dice"] == pytest.approx(min(dices))

    rows = list(csv.DictReader((out / "per_site.csv").open()))
    assert len(rows) == 4 and {r["site"] for r in rows} == {"hospital-a", "hospital-b"}
    md = (out / "report.md").read_text()
    assert "| hospital-a |" in md and "**mean**" in md and "Worst site" in md
    assert (out / "global_model.pt").is_file() and (out / "run_config.toml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]

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
    (["--model", "vgg"], "unknown model 'vgg'; allowed: unet"),
    (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'; allowed: fedavg"),
    (["--rounds", "0"], "rounds (from --rounds): Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=["missing-root", "no-dicom", "no-labels",
                                                          "model", "strategy", "rounds"])
def test_bad_input_is_a_clear_error(args: list[str], message: str, synth_root: Path, tmp_path: Path) -> None:
    (tmp_path / "nodicom" / "site1" / "images").mkdir(parents=True)
    (tmp_path / "nodicom" / "site1" / "images" / "scan.jpg").write_bytes(b"\xff\xd8not dicom")
    shutil.copytree(synth_root / "hospital-a" / "images", tmp_path / "nolabels" / "hospital-a" / "images")
    out = tmp_path / "out"
    res = run_cli("simulate", "--out", str(out), *[a.format(tmp=tmp_path) for a in args], timeout=120)
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
