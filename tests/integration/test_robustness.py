"""A faulty site: one site of five sends updates scaled by 100, or all NaN, every round.

The whole federation runs in this process: fedscan's ServerApp ``main`` and ClientApp handlers,
Flower's strategies, every message through protobuf as on the wire; only Flower's transport and
Ray are left out (the simulate tests cover them), so that several whole runs fit in the suite.

- fedmedian and fedtrimmedavg keep the global model's validation Dice within 5% of the honest run;
- NaN updates are always rejected, with the reason in report.json (for every strategy, on
  hand-made replies: ``tests/unit/test_strategies.py``), and the others train on;
- fedavg follows a scaled site (documented in the README's Strategies section): its Dice collapses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedscan.client.app import evaluate as client_evaluate
from fedscan.client.app import train as client_train
from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.data.synthetic import make_profiles, write_site
from fedscan.server.app import main as server_main

SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"]
FAULTY = "hospital-c"


class InProcessGrid:
    """The sites (``cfg.site_names``) answer in this process through the real ClientApp handlers."""

    def __init__(self, cfg: AppConfig) -> None:
        n = len(cfg.site_names)
        self.contexts = {
            k + 1: Context(
                run_id=1,
                node_id=k + 1,
                node_config={"partition-id": k, "num-partitions": n},
                state=RecordDict(),
                run_config=cfg.to_run_config(),
            )
            for k in range(n)
        }
        self.sent = 0
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        """Each site answers at once; its reply waits here for ``pull_messages``."""
        ids = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            msg = message_from_proto(message_to_proto(msg))
            handler = client_train if msg.metadata.message_type == "train" else client_evaluate
            reply: Message = handler(msg, self.contexts[msg.metadata.dst_node_id])
            self.replies[msg.metadata.message_id] = message_from_proto(message_to_proto(reply))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def run_in_process(cfg: AppConfig) -> None:
    """fedscan's ServerApp ``main`` over ``InProcessGrid``: a whole run in this process, with torch
    on one thread, as each deployed test site trains (``--threads 1``), so that a reference run
    here computes as the sites do."""
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:  # what a Flower process sets before it builds messages
            for attr in ("_run_id", "_node_id", "_task_id"):
                mp.setattr(TaskIdentity, attr, 1)
            server_main(InProcessGrid(cfg), context)
    finally:
        torch.set_num_threads(threads)


def run_plaintext_reference(
    data_root: Path, site_names: list[str], out: Path, *, rounds: int, seed: int
) -> dict:
    """A small plaintext FedAvg run over ``site_names`` with ``run_in_process`` (32-pixel slices, one
    local epoch, CPU): the reference the SecAgg+ and deployment tests compare with, without a Ray
    start. Its cache goes beside ``out``; returns its report.json."""
    run = RunConfig(
        data_root=data_root,
        sites=len(site_names),
        rounds=rounds,
        image_size=32,
        local_epochs=1,
        seed=seed,
        device="cpu",
        secagg=False,
        output=out,
        cache_dir=out.parent / f"{out.name}-cache",
    )
    run_in_process(AppConfig(run=run, site_names=site_names))
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small synthetic hospitals (8 patients each, 2 of them for validation), as `fedscan synth`
    draws them."""
    root = tmp_path_factory.mktemp("robust") / "sites"
    for i, profile in enumerate(make_profiles(len(SITES), 3)):
        write_site(root, profile.model_copy(update={"n_patients": 8}), 3, i)
    return root


def federate(root: Path, out: Path, strategy: str, fault: str | None = None) -> dict:
    # small and fast, but trained to its plateau, with the learning rate decayed over the rounds
    # (cosine) and 2 validation patients a site: with 1 validation patient and a constant rate, two
    # honest runs that differ only in the seed ended 12% apart, and any difference in the aggregate
    # moved the final Dice by more than 5% (measured: trimmed mean 0.69 honest, 0.74 with the
    # scaled site, both still climbing at round 10); here the curves flatten from round 9
    run = RunConfig(
        strategy=strategy,
        data_root=root,
        sites=len(SITES),
        rounds=12,
        local_epochs=2,
        image_size=32,
        base_channels=8,
        unet_depth=2,
        learning_rate=1e-2,
        lr_schedule="cosine",
        seed=2,
        output=out,
        cache_dir=root.parent / "cache",
        **({"fault_site": FAULTY, "fault_kind": fault} if fault else {}),
    )
    run_in_process(AppConfig(run=run, site_names=SITES))
    return json.loads((out / "report.json").read_text())


def mean_dice(rep: dict) -> float:
    return rep["final"]["mean"]["dice"]


@pytest.fixture(scope="module")
def honest(sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("honest")
    return {s: federate(sites, out / s, s) for s in ("fedmedian", "fedtrimmedavg")}


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_keep_the_dice_of_the_honest_run(
    strategy: str, sites: Path, honest: dict, tmp_path: Path
) -> None:
    ref = mean_dice(honest[strategy])
    assert ref > 0.5, ref  # the honest federation learned
    rep = federate(sites, tmp_path / "scaled", strategy, fault="scale")
    got = mean_dice(rep)
    assert abs(got - ref) <= 0.05 * ref, (strategy, ref, got)
    assert all(not h["aggregation"]["rejected"] for h in rep["history"])  # finite: not rejected, outvoted


def test_nan_updates_are_always_rejected(sites: Path, honest: dict, tmp_path: Path) -> None:
    rep = federate(sites, tmp_path / "nan", "fedavg", fault="nan")
    for h in rep["history"]:
        assert list(h["aggregation"]["rejected"]) == [FAULTY]
        assert "NaN or infinite" in h["aggregation"]["rejected"][FAULTY]
        assert h["aggregation"]["records_seen_by_strategy"] == len(SITES) - 1
    assert mean_dice(rep) > 0.5  # the others trained on


def test_fedavg_follows_a_scaled_site(sites: Path, honest: dict, tmp_path: Path) -> None:
    """Documented behaviour: the mean has no defence against a finite but wild update."""
    rep = federate(sites, tmp_path / "scaled", "fedavg", fault="scale")
    assert mean_dice(rep) < 0.5 * mean_dice(honest["fedmedian"]), (
        mean_dice(rep),
        mean_dice(honest["fedmedian"]),
    )
