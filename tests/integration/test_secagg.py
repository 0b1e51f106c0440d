"""Secure aggregation in simulation: the strategy sees one aggregated record per round, and the
result equals plaintext FedAvg within the quantization tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_simulate import run_cli

from fedscan.client.training import open_site
from fedscan.common.config import RunConfig
from fedscan.common.data.layout import discover_sites

ARGS = ["--image-size", "32", "--local-epochs", "2", "--seed", "1", "--device", "cpu"]


def secagg_tolerance(cfg: RunConfig, examples: list[int]) -> float:
    """Largest error of one weight: each site's weighted delta is quantized to a step of
    2·clip/Q (stochastic rounding: up to one step), and the sum is divided by the total weight
    Σ n_i / max_weight."""
    step = 2 * cfg.secagg_clipping_range / cfg.secagg_quantization_range
    return len(examples) * step / (sum(examples) / cfg.secagg_max_weight)


@pytest.mark.integration
def test_secagg_equals_plaintext_within_the_quantization_step(synth_root: Path, tmp_path: Path) -> None:
    reports = {}
    for mode in ("--secagg", "--no-secagg"):
        out = tmp_path / mode
        res = run_cli("simulate", "--data-root", str(synth_root), "--rounds", "2", "--out", str(out), mode, *ARGS)
        assert res.returncode == 0, res.stdout + res.stderr
        reports[mode] = json.loads((out / "report.json").read_text())
    sec, plain = reports["--secagg"], reports["--no-secagg"]
    assert sec["secagg"] is True and plain["secagg"] is False
    # what the aggregation step received: one record per round under SecAgg+, one per site without
    assert [h["aggregation"]["records_seen_by_strategy"] for h in sec["history"]] == [1, 1]
    assert [h["aggregation"]["records_seen_by_strategy"] for h in plain["history"]] == [2, 2]
    # after round 1 the models differ only by quantization, and so do the Dice values. Later
    # rounds train on from those weights, and Flower's stochastic rounding makes the final Dice
    # move by a few hundredths from run to run: not asserted (see the issue 6 notes)
    for site in ("hospital-a", "hospital-b"):
        first_sec, first_plain = sec["history"][0]["per_site"][site], plain["history"][0]["per_site"][site]
        assert abs(first_sec["dice"] - first_plain["dice"]) < 0.01

    # round 1 starts from the same weights, so its aggregate differs only by quantization
    cfg = RunConfig(image_size=32, seed=1)
    examples = [open_site(s, cfg, tmp_path / "cache").train_idx.size for s in discover_sites(synth_root)]
    tol = secagg_tolerance(cfg, examples)
    a = torch.load(tmp_path / "--secagg" / "checkpoints" / "round-001.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "--no-secagg" / "checkpoints" / "round-001.pt", weights_only=True)["state_dict"]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert 0 < worst <= tol + 1e-6, (worst, tol)  # > 0: the masked path really ran
