"""A SecAgg+ run resumed from a checkpoint ends with the same weights, bit for bit, as the run
that never stopped: each site's stochastic rounding in the protocol's quantization is seeded by
the run's seed, the round and the site (``fedscan.client.secagg.quantization_seed``), and the
masked sum is exact integer arithmetic.

The whole federation runs in this process, as in ``test_robustness.py``: fedscan's ServerApp
``main`` with SecAgg+ (Flower's ``SecAggPlusWorkflow``, all four stages) and the real ClientApp
handlers (Flower's ``secaggplus_mod``), every message through protobuf; the deployed resume
after a killed SuperLink, in plaintext, is ``test_deployment.py``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_robustness import run_in_process

from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.data.synthetic import make_profiles, write_site

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def secure_run(root: Path, out: Path, resume_from: Path | None = None) -> dict[str, torch.Tensor]:
    run = RunConfig(
        data_root=root,
        sites=len(SITES),
        rounds=3,
        local_epochs=1,
        image_size=32,
        base_channels=4,
        unet_depth=2,
        secagg=True,
        seed=4,
        output=out,
        cache_dir=root.parent / "cache",
    )
    run_in_process(AppConfig(run=run, site_names=SITES, resume_from=resume_from))
    return torch.load(out / "global_model.pt", weights_only=True)["state_dict"]


@pytest.mark.integration
def test_a_secagg_run_resumed_from_round_1_ends_bit_identical(tmp_path: Path) -> None:
    root = tmp_path / "sites"
    for i, profile in enumerate(make_profiles(len(SITES), 6)):
        write_site(root, profile.model_copy(update={"n_patients": 4}), 6, i)

    a = secure_run(root, tmp_path / "uninterrupted")
    report = json.loads((tmp_path / "uninterrupted" / "report.json").read_text())
    assert report["secagg"] is True and report["rounds_completed"] == 3
    assert [h["aggregation"]["sites_aggregated"] for h in report["history"]] == [3, 3, 3]
    assert [h["aggregation"]["records_seen_by_strategy"] for h in report["history"]] == [1, 1, 1]

    b = secure_run(root, tmp_path / "resumed", tmp_path / "uninterrupted" / "checkpoints" / "round-001.pt")
    resumed = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert resumed["status"] == "complete" and [h["round"] for h in resumed["history"]][-2:] == [2, 3]
    assert list(a) == list(b)
    for key in a:  # rounds 2 and 3 ran again from round 1's checkpoint: every weight the same
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert resumed["final"] == report["final"]
