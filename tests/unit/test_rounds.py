"""The ServerApp's round bookkeeping (server/rounds.py), driven without Flower's Grid: a ledger of
plain dictionaries stands in for the strategy, a list collects the run events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.errors import FedscanError
from fedscan.common.run_events import (
    EvaluationsMissing,
    ReportUpdated,
    RoundFinished,
    RunEvent,
    RunFailed,
    RunFinished,
    RunStarted,
    TrainingMissing,
    UpdateRejected,
)
from fedscan.server.rounds import RunRounds


@dataclass
class Ledger:
    round_offset: int = 0
    site_history: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    compute_seconds: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    train_records: dict[int, int] = field(default_factory=dict)
    trained: dict[int, list[str]] = field(default_factory=dict)
    rejected: dict[int, dict[str, str]] = field(default_factory=dict)
    weight_shares: dict[int, dict[str, float]] = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def seg(dice: float, n: int = 12) -> dict[str, float]:
    return {"dice": dice, "iou": dice / 2, "hd95": 5.0, "loss": 1 - dice, "num-examples": n}


def make(
    tmp_path: Path, ledger: Ledger, rounds: int = 2, **kw: object
) -> tuple[RunRounds, list[RunEvent], Clock]:
    cfg = AppConfig(run=RunConfig(rounds=rounds, output=tmp_path), site_names=["a", "b"])
    events: list[RunEvent] = []
    clock = Clock()
    return RunRounds(cfg, ledger, events.append, clock=clock, **kw), events, clock  # type: ignore[arg-type]


def test_two_rounds_make_the_history_the_report_the_checkpoints_and_the_events(tmp_path: Path) -> None:
    ledger = Ledger()
    waits = iter([0.0, 1.5, 0.0])  # round 1 waited 1.5 s for a site to connect
    rounds, events, clock = make(tmp_path, ledger, waited=lambda: next(waits))
    saved: list[int] = []
    rounds.publish("running")
    rounds.start(2)
    rounds.begin()  # Flower's round 0
    clock.now += 10.0
    ledger.site_history[1] = {"a": seg(0.25), "b": seg(0.75, 24)}
    ledger.compute_seconds[1] = {"train": {"a": 3.0, "b": 4.0}, "evaluate": {"a": 1.0, "b": 0.5}}
    ledger.train_records[1] = 2
    ledger.trained[1] = ["a", "b"]
    ledger.rejected[1] = {}
    rounds.finish(1, saved.append)
    clock.now += 5.0
    ledger.site_history[2] = {"a": seg(0.6)}  # b sent no evaluation
    ledger.train_records[2] = 1
    ledger.trained[2] = ["a"]  # b's update was rejected: the round's model is a's alone
    ledger.rejected[2] = {"b": "its update holds NaN or infinite values"}
    ledger.weight_shares[2] = {"a": 1.0}
    rounds.finish(2, saved.append)
    rounds.complete()

    assert saved == [1, 2]
    first, second = rounds.history
    assert first["timing"]["round_seconds"] == 8.5  # 10 s less the 1.5 s spent waiting for sites
    assert first["timing"]["slowest_compute_seconds"] == 5.0
    assert first["aggregation"] == {
        "secure": False,
        "records_seen_by_strategy": 2,
        "sites_aggregated": 2,
        "rejected": {},
        "sites_trained": ["a", "b"],
    }
    assert "missed_training" not in first
    assert second["missing_sites"] == ["b"] and second["missed_training"] == ["b"]
    assert second["aggregation"]["rejected"] == {"b": "its update holds NaN or infinite values"}
    assert second["aggregation"]["weight_share"] == {"a": 1.0}

    shown = [e for e in events if not isinstance(e, ReportUpdated)]
    assert shown == [
        RunStarted(sites=2, rounds=2),
        RoundFinished(round=1, rounds=2, metric="dice", mean=0.5, per_site={"a": 0.25, "b": 0.75}),
        UpdateRejected(round=2, site="b", reason="its update holds NaN or infinite values"),
        TrainingMissing(round=2, sites=["b"]),
        EvaluationsMissing(round=2, sites=["b"]),
        RoundFinished(round=2, rounds=2, metric="dice", mean=0.6, per_site={"a": 0.6}),
        RunFinished(metric="dice", mean=0.6),
    ]
    reports = [e.report for e in events if isinstance(e, ReportUpdated)]
    assert [(r.status, r.rounds_completed) for r in reports] == [
        ("running", 0),
        ("running", 1),
        ("running", 2),
        ("complete", 2),
    ]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == reports[-1].as_dict()  # what `fedscan run` writes is what the ServerApp wrote
    assert on_disk["final"]["per_site"]["a"]["dice"] == 0.6


def test_a_resumed_run_counts_on_from_its_checkpoint(tmp_path: Path) -> None:
    ledger = Ledger(round_offset=2)
    rounds, events, _ = make(tmp_path, ledger, rounds=3)
    earlier = [
        {"round": r, "per_site": {"a": {"dice": 0.1, "num_examples": 12}, "c": {"dice": 0.2}}} for r in (1, 2)
    ]
    rounds.resume(earlier)
    assert rounds.recorder.sites == ["a", "b", "c"]  # c took part before the stop
    rounds.start(2, tmp_path / "checkpoints" / "round-002.pt")
    ledger.site_history[3] = {"a": seg(0.5), "b": seg(0.5), "c": seg(0.5)}
    rounds.finish(1, lambda r: None)  # Flower's first round of the resumed run is the run's third
    assert [h["round"] for h in rounds.history] == [1, 2, 3]
    assert events[0] == RunStarted(
        sites=2, rounds=3, resumed_after=2, checkpoint=str(tmp_path / "checkpoints" / "round-002.pt")
    )
    assert isinstance(events[-1], RoundFinished) and events[-1].round == 3


def test_secure_aggregation_counts_the_sites_in_the_sum(tmp_path: Path) -> None:
    ledger = Ledger(site_history={1: {"a": seg(0.3), "b": seg(0.3)}}, train_records={1: 1})
    rounds, _, _ = make(tmp_path, ledger, sites_aggregated={1: 2})
    rounds.finish(1, lambda r: None)
    assert rounds.history[0]["aggregation"] == {
        "secure": True,
        "records_seen_by_strategy": 1,
        "sites_aggregated": 2,
        "rejected": {},
    }


def test_a_round_without_evaluations_fails_the_run_and_says_why(tmp_path: Path) -> None:
    rounds, events, _ = make(tmp_path, Ledger())
    with pytest.raises(FedscanError, match="round 1: no site returned an evaluation") as info:
        rounds.finish(1, lambda r: pytest.fail("no checkpoint for a round without results"))
    rounds.fail(info.value)
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "failed"
    assert events[-1] == RunFailed(message=info.value.message, hint=info.value.hint)
    rounds.fail(KeyError("bug"), publish=False)  # not a user's problem: no message of its own
    assert events[-1] == RunFailed()


def test_an_output_folder_that_refuses_writes_still_sends_the_report(tmp_path: Path) -> None:
    skipped: list[str] = []
    ledger = Ledger(site_history={1: {"a": seg(0.3)}})
    rounds, events, _ = make(tmp_path, ledger, write=lambda what, fn: skipped.append(what))
    rounds.finish(1, lambda r: pytest.fail("the write policy decides"))
    assert skipped == ["a checkpoint", "the report"]
    assert not (tmp_path / "report.json").exists()
    assert [e.report.rounds_completed for e in events if isinstance(e, ReportUpdated)] == [1]
