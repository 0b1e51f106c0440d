"""The ServerApp's round bookkeeping, without a Grid: what each round saw and cost, the report after
every round, the checkpoint, and the run events that tell the following command about it.

:class:`RunRounds` reads what the strategy kept of a round (a :class:`RoundLedger`: per-site
evaluations, compute seconds, rejected updates, weight shares) and turns it into the report's
history, the report files and the run events (``fedscan.common.run_events``). ``server/app.py``
drives it from Flower's ``evaluate_fn``; tests drive it with plain dictionaries and a clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedscan.common.config import AppConfig
from fedscan.common.errors import FedscanError
from fedscan.common.report_schema import RunReport
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
from fedscan.common.tasks.registry import task_metrics
from fedscan.server.report import ReportWriter, RunRecorder
from fedscan.server.strategies import SECURE_AGGREGATE


class RoundLedger(Protocol):
    """What the strategy keeps of each round, by server round (``PerSiteEvaluation``)."""

    round_offset: int
    site_history: dict[int, dict[str, dict[str, float]]]
    compute_seconds: dict[int, dict[str, dict[str, float]]]
    train_records: dict[int, int]
    trained: dict[int, list[str]]
    rejected: dict[int, dict[str, str]]
    weight_shares: dict[int, dict[str, float]]


def timing(round_seconds: float, compute: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A round's wall time against the sites' compute. A round waits for the slowest site twice
    (training, then evaluation), so the compute bound is the slowest training plus the slowest
    evaluation; the rest is overhead: messaging, process start-up, aggregation, waiting.

    In a folded plaintext run (``fedscan.server.round_loop``) a round's wall time is the time
    from the previous round's results to its own: one exchange, in which the sites evaluate it
    and train the next round; round 1's also holds the first training exchange, and the last
    round's is its evaluation-only exchange."""
    train, evaluate = compute.get("train", {}), compute.get("evaluate", {})
    bound = max(train.values(), default=0.0) + max(evaluate.values(), default=0.0)
    return {
        "round_seconds": round(round_seconds, 3),
        # under SecAgg+ training time comes for the round (the slowest site), not per site
        "site_seconds": {
            s: round(train.get(s, 0.0) + evaluate.get(s, 0.0), 3)
            for s in sorted({*train, *evaluate} - {SECURE_AGGREGATE})
        },
        "slowest_compute_seconds": round(bound, 3),
        "overhead_fraction": (
            round(max(round_seconds - bound, 0.0) / round_seconds, 4) if round_seconds > 0 else None
        ),
    }


def _write_now(what: str, write: Callable[[], object]) -> None:
    write()


class RunRounds:
    """One run's rounds, from the first to the report of the last.

    ``emit`` gets every run event; ``write(what, fn)`` runs the file writes (the ServerApp's
    OutputFolder skips them where the folder is not writable); ``waited()`` says how long the
    round waited for sites to connect (not part of its cost); ``sites_aggregated`` is, under
    SecAgg+, how many sites each round's secure sum holds."""

    def __init__(
        self,
        cfg: AppConfig,
        ledger: RoundLedger,
        emit: Callable[[RunEvent], None],
        *,
        write: Callable[[str, Callable[[], object]], None] = _write_now,
        clock: Callable[[], float] = time.monotonic,
        waited: Callable[[], float] = lambda: 0.0,
        sites_aggregated: dict[int, int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = cfg.run
        self.ledger = ledger
        self.emit = emit
        self.write = write
        self.clock = clock
        self.waited = waited
        self.sites_aggregated = sites_aggregated
        self.recorder = RunRecorder(self.run.output, cfg)
        self.metric = task_metrics(self.run.task)[1]
        self._round_start = clock()
        self.report_writer = ReportWriter(self.run.output, clock=clock)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.recorder.history

    def resume(self, history: list[dict[str, Any]]) -> None:
        """Take over a resumed run's history, and the sites it names."""
        self.recorder.history = history
        self.recorder.sites += sorted({s for h in history for s in h["per_site"]} - set(self.recorder.sites))

    def publish(self, status: str) -> dict[str, Any]:
        """Write the report files (see :class:`ReportWriter`: while the run goes on, the files
        made from report.json are refreshed at most every few seconds) and send the report;
        return the report."""
        rep = self.recorder.report(status)
        self.write("the report", lambda: self.report_writer(rep))
        self.emit(ReportUpdated(report=RunReport.model_validate(rep)))
        return rep

    def start(self, sites: int, checkpoint: Path | None = None) -> None:
        """The rounds begin (after the checkpoint's round for a resumed run)."""
        done = self.ledger.round_offset
        self.emit(
            RunStarted(
                sites=sites,
                rounds=self.run.rounds,
                resumed_after=done,
                checkpoint=str(checkpoint) if done and checkpoint is not None else None,
            )
        )

    def begin(self) -> None:
        """Flower's round 0 (the initial model): the first round's clock starts now."""
        self._round_start = self.clock()
        self.waited()

    def aggregation(self, server_round: int) -> dict[str, Any]:
        """What the aggregation step saw: one record per site, or under SecAgg+ one in all."""
        ledger = self.ledger
        seen = ledger.train_records.get(server_round, 0)
        secure = self.sites_aggregated is not None
        sites = self.sites_aggregated.get(server_round, 0) if self.sites_aggregated is not None else seen
        rejected = ledger.rejected.get(server_round, {})
        for site, reason in rejected.items():
            self.emit(UpdateRejected(round=server_round, site=site, reason=reason))
        agg: dict[str, Any] = {
            "secure": secure,
            "records_seen_by_strategy": seen,
            "sites_aggregated": sites,
            "rejected": rejected,
        }
        if not secure and server_round in ledger.trained:  # SecAgg+ names no site's update
            agg["sites_trained"] = list(ledger.trained[server_round])
        if server_round in ledger.weight_shares:  # quality weighting
            agg["weight_share"] = {s: round(v, 4) for s, v in ledger.weight_shares[server_round].items()}
        return agg

    def finish(self, flower_round: int, save_checkpoint: Callable[[int], object]) -> dict[str, Any]:
        """Flower's ``flower_round`` is evaluated: record it, save the checkpoint (``save_checkpoint``
        gets the run's round), publish the report, and say so. Returns the round's summary.

        Raises FedscanError when no site sent an evaluation."""
        server_round = flower_round + self.ledger.round_offset  # Flower counts a resumed run's rounds from 1
        # waiting for sites to connect is not part of the round's cost
        elapsed = self.clock() - self._round_start - self.waited()
        per_site = self.ledger.site_history.get(server_round, {})
        if not per_site:
            raise FedscanError(
                f"round {server_round}: no site returned an evaluation within {self.run.round_timeout:.0f}s",
                hint="check the sites' logs; for slow sites raise --round-timeout (round_timeout in a run "
                "config)",
            )
        summary = self.recorder.record_round(
            server_round,
            per_site,
            timing(elapsed, self.ledger.compute_seconds.get(server_round, {})),
            self.aggregation(server_round),
        )
        # all a resumed run needs: the model, the server optimizer's state, the history so far
        self.write("a checkpoint", lambda: save_checkpoint(server_round))
        self.publish("running")
        self._round_start = self.clock()
        untrained = self.history[-1].get("missed_training")
        if untrained:
            self.emit(TrainingMissing(round=server_round, sites=list(untrained)))
        missing = self.history[-1].get("missing_sites")
        if missing:
            self.emit(EvaluationsMissing(round=server_round, sites=list(missing)))
        self.emit(
            RoundFinished(
                round=server_round,
                rounds=self.run.rounds,
                metric=self.metric,
                mean=summary["mean"][self.metric],
                per_site={s: r.get(self.metric) for s, r in summary["per_site"].items()},
            )
        )
        return summary

    def fail(self, exc: BaseException | None = None, *, publish: bool = True) -> None:
        """The run stopped: the report says failed (unless ``publish`` is off) and the follower hears why;
        only a FedscanError's message is shown (``exc`` None or another error: "run failed")."""
        if publish:
            self.publish("failed")
        if isinstance(exc, FedscanError):
            self.emit(RunFailed(message=exc.message, hint=exc.hint))
        else:
            self.emit(RunFailed())

    def complete(self) -> dict[str, Any]:
        """The last round is in: the complete report, published."""
        rep = self.publish("complete")
        self.emit(RunFinished(metric=self.metric, mean=rep["final"]["mean"].get(self.metric)))
        return rep
