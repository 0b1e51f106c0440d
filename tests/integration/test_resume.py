"""`fedscan simulate --resume`: a FedAdam run stopped after round 2 of 4 and resumed ends with the
same weights, bit for bit, and the same per-site history as a run that never stopped.

FedAdam, because its server optimizer's moments and its bias correction (which counts the rounds)
must come back from the checkpoint for the rounds after it to match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

FEDSCAN = [sys.executable, "-m", "fedscan.common.cli"]
# small and quick: a 2-level U-Net of width 4 on 32-pixel slices
TINY = (
    'strategy = "fedadam"\nrounds = 4\nimage-size = 32\nbase-channels = 4\nunet-depth = 2\n'
    'local-epochs = 1\nseed = 5\ndevice = "cpu"\n'
)
ENV = dict(os.environ, COLUMNS="200", NO_COLOR="1")


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDSCAN, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd
    )


def started_in(folder: Path) -> list[str]:
    """The processes running in ``folder``: the CLI runs there, and every Flower and Ray process it
    starts inherits that working directory (other runs on the machine do not count)."""
    found = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        if (
            p.info["cwd"]
            and Path(p.info["cwd"]).is_relative_to(folder)
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:120]}")
    return found


def stop_after_round(
    args: list[str], out: Path, server_round: int, cwd: Path, timeout: float = 300
) -> subprocess.Popen:
    """Start `fedscan simulate`, and send it SIGTERM as soon as round ``server_round``'s checkpoint
    is written (as a user's Ctrl-C or a scheduler would); return the stopped process."""
    proc = subprocess.Popen(
        [*FEDSCAN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
        cwd=cwd,
    )
    ckpt = out / "checkpoints" / f"round-{server_round:03d}.pt"
    deadline = time.monotonic() + timeout
    while not ckpt.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {ckpt.name} (exit {proc.returncode}):\n{proc.communicate()[0]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return proc


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "global_model.pt", weights_only=True)["state_dict"]


@pytest.mark.integration
def test_a_stopped_run_resumes_to_the_same_weights(synth_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    args = ["simulate", "--config", str(config), "--data-root", str(synth_root)]

    out_a = tmp_path / "uninterrupted"
    res = run_cli(*args, "--out", str(out_a), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    out_b = tmp_path / "resumed"
    stopped = stop_after_round([*args, "--out", str(out_b)], out_b, 2, cwd=tmp_path)
    assert stopped.returncode == 130
    report = json.loads((out_b / "report.json").read_text())
    assert report["status"] in ("interrupted", "failed")
    done = sorted(p.name for p in (out_b / "checkpoints").glob("round-*.pt"))
    # the signal lands in round 3 (it may just finish): there is something left to resume
    assert done in (["round-001.pt", "round-002.pt"], ["round-001.pt", "round-002.pt", "round-003.pt"])
    assert started_in(tmp_path) == []  # the stop left nothing running

    res = run_cli("simulate", "--resume", str(out_b), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming from round {len(done)}" in res.stderr
    assert "round 4/4 done" in res.stderr and "round 1/4 done" not in res.stderr
    assert not (out_b / "data").exists()  # the given sites were used; nothing synthesized

    a, b = final_weights(out_a), final_weights(out_b)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key

    rep_a = json.loads((out_a / "report.json").read_text())
    rep_b = json.loads((out_b / "report.json").read_text())
    assert rep_b["status"] == "complete" and rep_b["rounds_completed"] == 4
    assert [h["round"] for h in rep_b["history"]] == [1, 2, 3, 4]
    for ha, hb in zip(rep_a["history"], rep_b["history"], strict=True):
        assert ha["per_site"] == hb["per_site"], ha["round"]  # Dice and every other metric, per site
    assert rep_a["final"] == rep_b["final"]
    assert sorted(p.name for p in (out_b / "checkpoints").glob("round-*.pt")) == [
        f"round-00{r}.pt" for r in (1, 2, 3, 4)
    ]

    # a finished run has nothing left to resume
    again = run_cli("simulate", "--resume", str(out_b), cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "is already complete" in again.stderr
    assert started_in(tmp_path) == []
