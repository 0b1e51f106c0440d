"""SecAgg+ with sites that die mid-round, on a real deployment (127.0.0.1, TLS, node auth).

Five sites. A site's process is killed after it has shared its keys (its SuperNode has sent
two SecAgg+ replies of the round): the round still completes from the four survivors, and
its aggregate equals plaintext FedAvg over those four (simulated apart) within the
quantization tolerance. With two of four killed, fewer than the threshold (3) remain: that
round fails cleanly, the global model stays as it was, and the next round trains."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_deployment import Federation
from test_robustness import run_plaintext_reference
from test_secagg import assert_matches_plaintext
from test_simulate import FEDSCAN, flower_processes, run_cli

from fedscan.common.config import RunConfig
from fedscan.common.data.synthetic import synthesize
from fedscan.common.flower_runtime import stop_process_tree
from fedscan.common.models.registry import build_model

SITES = [f"hospital-{c}" for c in "abcde"]
ARGS = ["--image-size", "32", "--local-epochs", "1", "--seed", "2", "--device", "cpu"]


def _log_sizes(fed: Federation, names: list[str]) -> dict[str, int]:
    """Where each site's SuperNode log ends now: only what comes later belongs to the next run."""
    return {n: (fed.root / n / "logs" / "supernode.log").stat().st_size for n in names}


def _kill_after_key_sharing(fed: Federation, since: dict[str, int], timeout: float = 240) -> None:
    """Stop each site's daemon once its SuperNode has answered two training messages of the
    run (SecAgg+ setup and key sharing), before it can send its masked update."""
    pending = set(since)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            with open(fed.root / name / "logs" / "supernode.log", "rb") as f:
                f.seek(since[name])
                text = f.read().decode(errors="replace")
            parts = text.split("Sending: train message")
            if len(parts) >= 3 and "Sent successfully" in parts[2]:  # the key-sharing reply has gone out
                stop_process_tree(fed.procs[name])
                pending.discard(name)
        time.sleep(0.1)
    assert not pending, f"{pending} never shared keys"


def _run_and_kill(
    fed: Federation, config: Path, out: Path, min_sites: int, rounds: int, kill: list[str]
) -> dict:
    """`fedscan run` on the federation, killing the ``kill`` sites after they shared their keys;
    the run must still end well. Returns its report."""
    since = _log_sizes(fed, kill)
    run = subprocess.Popen(
        [
            *FEDSCAN,
            "run",
            "--superlink",
            fed.superlink,
            "--ca",
            str(fed.ca),
            "--config",
            str(config),
            "--sites",
            str(min_sites),
            "--rounds",
            str(rounds),
            "--out",
            str(out),
            *ARGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    fed.procs[f"run-{out.name}"] = run
    _kill_after_key_sharing(fed, since)
    text, _ = run.communicate(timeout=900)
    assert run.returncode == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete", text
    return report


@pytest.mark.integration
def test_secagg_survives_a_dropout_and_fails_cleanly_below_the_threshold(tmp_path: Path) -> None:
    before = flower_processes()
    fed = Federation(tmp_path)
    try:
        synthesize(fed.data, len(SITES), seed=4)
        res = run_cli(
            "server", "init", "--dir", str(fed.coord), "--host", "localhost", "--port", str(fed.port)
        )
        assert res.returncode == 0, res.stderr
        fed.spawn("superlink", "server", "start", "--dir", str(fed.coord))
        fed.wait_ready()
        for name in SITES:
            assert (
                run_cli(
                    "site",
                    "init",
                    "--dir",
                    str(fed.root / name),
                    "--name",
                    name,
                    "--data",
                    str(fed.data / name),
                ).returncode
                == 0
            )
            res = run_cli(
                "server",
                "add-site",
                "--dir",
                str(fed.coord),
                "--name",
                name,
                str(fed.root / name / "site.pub"),
                timeout=60,
            )
            assert res.returncode == 0, res.stderr
            fed.start_site(name)
        fed.wait_online(SITES)
        config = tmp_path / "run.toml"
        # a dead site is waited for this long: long enough for the live sites (a whole round's
        # other stages took 15 s here before the site's task executor, 10 s since; the stage that
        # trains about 3 s), short enough for the suite
        config.write_text("secagg = true\nsecagg_timeout = 20\nround_timeout = 20\n")

        # 1. five sites, one dies after key sharing: the four survivors' aggregate
        out = tmp_path / "dropout"
        report = _run_and_kill(fed, config, out, min_sites=4, rounds=1, kill=["hospital-e"])
        assert report["history"][0]["aggregation"]["records_seen_by_strategy"] == 1
        assert report["history"][0]["aggregation"]["sites_aggregated"] == 4  # the survivors

        survivors = tmp_path / "survivors"
        survivors.mkdir()
        for name in SITES[:4]:
            shutil.copytree(fed.data / name, survivors / name)
        # plaintext FedAvg over the four, by fedscan's ServerApp and ClientApp in this process
        # (test_robustness.py's harness: no Ray to start; torch on one thread, as the sites train)
        plain = tmp_path / "plain"
        run_plaintext_reference(survivors, SITES[:4], plain, rounds=1, seed=2)
        assert_matches_plaintext(
            out / "checkpoints" / "round-001.pt",
            plain / "checkpoints" / "round-001.pt",
            RunConfig(image_size=32, seed=2),
            survivors,
            tmp_path / "cache",
            round_sites=5,
        )

        # 2. four sites, two die after key sharing: 2 < threshold 3, the round fails cleanly
        # Round 2 must list only the two survivors. The SuperLink marks a silent site offline
        # within about 60 s (Flower's heartbeat), and round 1 outwaits that: its masking stage
        # waits for the killed sites until the SuperLink has marked them offline (an error
        # reply) or 75 s. (Round 1's evaluation rides on round 2's masking stage.)
        out2 = tmp_path / "below-threshold"
        config.write_text("secagg = true\nsecagg_timeout = 30\nround_timeout = 75\n")
        report = _run_and_kill(fed, config, out2, min_sites=2, rounds=2, kill=["hospital-c", "hospital-d"])
        seen = [h["aggregation"]["records_seen_by_strategy"] for h in report["history"]]
        assert seen == [0, 1], seen  # round 1: no aggregate; round 2: the two survivors'
        assert [h["aggregation"]["sites_aggregated"] for h in report["history"]] == [0, 2]
        assert "round(s) 1: too few sites finished the secure aggregation" in (out2 / "report.md").read_text()
        torch.manual_seed(2)
        initial = build_model(RunConfig(image_size=32, seed=2)).state_dict()
        r1 = torch.load(out2 / "checkpoints" / "round-001.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(r1[k], initial[k]) for k in initial)  # the global model did not move
        r2 = torch.load(out2 / "checkpoints" / "round-002.pt", weights_only=True)["state_dict"]
        assert any(not torch.equal(r2[k], initial[k]) for k in initial)  # and then it trained
    finally:
        fed.stop()
        assert flower_processes() - before == set(), "Flower processes were left running"
