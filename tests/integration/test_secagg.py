"""Secure aggregation in simulation: the strategy sees one aggregated record per round, and the
result equals plaintext FedAvg within the quantization tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_robustness import run_plaintext_reference
from test_simulate import run_cli

from fedscan.common.config import RunConfig
from fedscan.common.data.layout import discover_sites
from fedscan.common.secagg_numerics import error_bound
from fedscan.common.tasks.local_training import open_site

ARGS = ["--image-size", "32", "--local-epochs", "1", "--seed", "1", "--device", "cpu"]


def assert_matches_plaintext(
    secure: Path, plain: Path, cfg: RunConfig, data_root: Path, cache: Path, round_sites: int
) -> None:
    """Two checkpoints of one round from the same starting weights, with and without SecAgg+:
    every float weight within the quantization bound (fedscan.common.secagg_numerics, for the
    ``round_sites`` the round quantized for) plus float32 rounding, integer buffers equal, and
    not all equal (the masked path really ran)."""
    import numpy as np

    examples = [open_site(s, cfg, cache).train_idx.size for s in discover_sites(data_root)]
    tol = error_bound(
        cfg.secagg_clipping_range,
        cfg.secagg_plan(round_sites).quantization_range,
        cfg.secagg_max_weight,
        examples,
    )
    a = torch.load(secure, weights_only=True)["state_dict"]
    b = torch.load(plain, weights_only=True)["state_dict"]
    worst = 0.0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        diff = (a[k].double() - b[k].double()).abs().numpy()
        assert np.all(diff <= tol + np.spacing(b[k].abs().numpy())), (k, float(diff.max()), tol)
        worst = max(worst, float(diff.max()))
    assert worst > 0


@pytest.mark.integration
def test_secagg_equals_plaintext_within_the_quantization_step(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "--secagg"
    res = run_cli(
        "simulate", "--data-root", str(synth_root), "--rounds", "1", "--out", str(out), "--secagg", *ARGS
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # plaintext: fedscan's ServerApp and ClientApp in this process (test_robustness.py's harness,
    # torch on one thread as in each Ray actor), which saves a second start of Flower's engine
    names = [s.name for s in discover_sites(synth_root)]
    plain = run_plaintext_reference(synth_root, names, tmp_path / "--no-secagg", rounds=1, seed=1)
    sec = json.loads((out / "report.json").read_text())
    assert sec["secagg"] is True and plain["secagg"] is False
    # what the aggregation step received: one record per round under SecAgg+, one per site without
    assert [h["aggregation"]["records_seen_by_strategy"] for h in sec["history"]] == [1]
    assert [h["aggregation"]["records_seen_by_strategy"] for h in plain["history"]] == [2]
    assert sec["history"][0]["aggregation"]["sites_aggregated"] == 2  # both sites are in the sum
    assert "sites in each round's sum: 2" in (tmp_path / "--secagg" / "report.md").read_text()
    assert "secure aggregation: off" in (tmp_path / "--no-secagg" / "report.md").read_text()
    # the final models (one round, from the same seed) differ only by quantization: within the
    # bound, and the per-site Dice within the 0.01. (Over more rounds the Dice values
    # drift further apart: local training amplifies any difference in its starting point, even
    # noise of 1e-7 in plaintext; see BENCHMARKS.md, "Secure aggregation".)
    for site in ("hospital-a", "hospital-b"):
        assert (
            abs(sec["final"]["per_site"][site]["dice"] - plain["final"]["per_site"][site]["dice"]) < 0.01
        ), site
    assert_matches_plaintext(
        tmp_path / "--secagg" / "global_model.pt",
        tmp_path / "--no-secagg" / "global_model.pt",
        RunConfig(image_size=32, seed=1),
        synth_root,
        tmp_path / "cache",
        round_sites=2,
    )
