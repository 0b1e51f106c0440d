"""The Flower ServerApp: builds the strategy from the run config and runs the rounds.

After every round it saves a checkpoint (the global model, the strategy's state, the history)
and rewrites the report with each site's evaluation of that model. Given ``resume_from``, it
continues a run after its checkpoint's round. The Flower-specific parts stay here, the rest is
testable alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedscan.common.array_records import to_record
from fedscan.common.config import AppConfig
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.common.tasks.registry import task_metrics
from fedscan.common.weights import norm_keys
from fedscan.server import checkpoint
from fedscan.server.report import RunRecorder, write_report_files
from fedscan.server.strategies import SECURE_AGGREGATE, PerSiteEvaluation, build_strategy

log = logging.getLogger("fedscan.server")

# Prefix of the per-round progress lines; `fedscan simulate` picks them out of the log stream.
PROGRESS_TAG = "[fedscan] "
# Prefix of the report, one JSON line per round: `fedscan run` rebuilds the report files from it,
# so the coordinator's user gets them even where the ServerApp's machine or user differs.
REPORT_TAG = "[fedscan-report] "

app = ServerApp()


def _progress(msg: str, *args: object) -> None:
    print(PROGRESS_TAG + (msg % args if args else msg), flush=True)


def _emit_report(rep: dict[str, Any]) -> None:
    # one write, so that no other log output can land inside the line
    sys.stdout.write(REPORT_TAG + json.dumps(rep, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def timing(round_seconds: float, compute: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A round's wall time against the sites' compute. A round waits for the slowest site twice
    (training, then evaluation), so the compute bound is the slowest training plus the slowest
    evaluation; the rest is overhead: messaging, process start-up, aggregation, waiting."""
    train, evaluate = compute.get("train", {}), compute.get("evaluate", {})
    bound = max(train.values(), default=0.0) + max(evaluate.values(), default=0.0)
    return {
        "round_seconds": round(round_seconds, 3),
        # under SecAgg+ training time comes for the round (the slowest site), not per site
        "site_seconds": {s: round(train.get(s, 0.0) + evaluate.get(s, 0.0), 3)
                         for s in sorted({*train, *evaluate} - {SECURE_AGGREGATE})},
        "slowest_compute_seconds": round(bound, 3),
        "overhead_fraction": round(max(round_seconds - bound, 0.0) / round_seconds, 4) if round_seconds > 0 else None,
    }


class SitesMissing(FedscanError):
    """Fewer sites than a round needs stayed connected for longer than the wait timeout."""


class DeadlineGrid:
    """A Grid whose node list gives up: when fewer than ``needed`` nodes are connected for longer
    than ``timeout`` seconds, asking for the nodes raises SitesMissing. Flower's strategies wait
    for their minimum number of nodes without a limit; this puts one on every such wait."""

    def __init__(self, grid: Grid, needed: int, timeout: float, clock: Callable[[], float] = time.monotonic):
        self._grid = grid
        self.needed = needed
        self.timeout = timeout
        self._clock = clock
        self._short_since: float | None = None
        self.waited = 0.0  # seconds spent short of sites, for the round timing

    def take_waited(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        now = self._clock()
        if len(ids) >= self.needed:
            if self._short_since is not None:
                self.waited += now - self._short_since
            self._short_since = None
            return ids
        if self._short_since is None:
            self._short_since = now
            _progress("waiting for sites: %d of %d connected (up to %.0fs)", len(ids), self.needed, self.timeout)
        elif now - self._short_since > self.timeout:
            raise SitesMissing(
                f"only {len(ids)} of the {self.needed} sites this run needs were connected after waiting "
                f"{self.timeout:.0f}s",
                hint="start the missing sites (`fedscan site start`), lower --sites, or raise --wait-timeout",
            )
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class OutputFolder:
    """The ServerApp's own copy of the results (checkpoints, report files). A folder it cannot
    write is logged once and skipped: the report still reaches `fedscan run` through the log."""

    def __init__(self) -> None:
        self.ok = True

    def __call__(self, what: str, write: Callable[[], object]) -> None:
        if not self.ok:
            return
        try:
            write()
        except OSError as exc:
            self.ok = False
            log.warning("cannot write %s here (%s); results are only streamed to `fedscan run`", what, exc)


def resume_point(cfg: AppConfig, strategy: PerSiteEvaluation, initial: ArrayRecord) -> checkpoint.Resume:
    """Read ``cfg.resume_from``, check that it belongs to this run, and restore the strategy's
    state and round offset from it. Raises FedscanError for a checkpoint of another run."""
    assert cfg.resume_from is not None
    run = cfg.run
    resumed = checkpoint.load_resume(cfg.resume_from)
    saved = {"task": resumed.config.get("task"), "model": resumed.config.get("model"), "strategy": resumed.strategy}
    ours = {"task": run.task, "model": run.model, "strategy": run.strategy}
    if saved != ours:
        raise FedscanError(f"the checkpoint {cfg.resume_from} is of another run ({saved}, this run: {ours})",
                           hint="resume a run with the config it was started with (its run_config.toml)")
    if {k: tuple(v.shape) for k, v in resumed.arrays.items()} != {k: tuple(v.shape) for k, v in initial.items()}:
        raise FedscanError(f"the weights in {cfg.resume_from} do not fit this run's {run.model}",
                           hint="resume a run with the config it was started with (its run_config.toml)")
    if not 1 <= resumed.server_round < run.rounds:
        raise FedscanError(f"the checkpoint {cfg.resume_from} is of round {resumed.server_round}; "
                           f"this run has {run.rounds} rounds, so there is nothing left to resume")
    strategy.load_state(resumed.strategy_state)
    strategy.round_offset = resumed.server_round
    return resumed


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(context.run_config)
    run = cfg.run
    n_sites = len(cfg.site_names) or run.sites
    torch.manual_seed(run.seed)
    model = build_model(run)
    strategy = build_strategy(run, n_sites, norm_keys(model))
    _, main_metric = task_metrics(run.task)
    recorder = RunRecorder(run.output, cfg)
    output = OutputFolder()
    output("the run config", lambda: checkpoint.save_run_config(run.output, run))
    initial = to_record(model)
    if cfg.resume_from is not None:
        try:
            resumed = resume_point(cfg, strategy, initial)
        except FedscanError as exc:
            _progress("run failed: %s%s", exc.message, f" | {exc.hint}" if exc.hint else "")
            raise
        initial = resumed.arrays
        recorder.history = resumed.history
        recorder.sites += sorted({s for h in resumed.history for s in h["per_site"]} - set(recorder.sites))

    def publish(status: str) -> dict[str, Any]:
        rep = recorder.report(status)
        output("the report", lambda: write_report_files(run.output, rep))
        _emit_report(rep)
        return rep

    publish("running")
    done = strategy.round_offset
    if done:
        _progress("resuming from round %d (%s): %d sites, rounds %d to %d", done, cfg.resume_from, n_sites,
                  done + 1, run.rounds)
    else:
        _progress("run started: %d sites, %d rounds", n_sites, run.rounds)
    round_start = [time.monotonic()]
    deadline_grid = DeadlineGrid(grid, n_sites, run.wait_timeout)
    train_grid: Any = deadline_grid
    if run.secagg:
        from fedscan.server.secagg import SecureTrainGrid

        try:
            plan = run.secagg_plan(n_sites)
        except ValueError as exc:
            publish("failed")
            _progress("run failed: %s", exc)
            raise FedscanError(str(exc), hint="change the secagg_ settings, or run with --no-secagg") from None
        train_grid = SecureTrainGrid(deadline_grid, context, run, progress=_progress)
        _progress("secure aggregation (SecAgg+): each round over the sites it reaches (with %d: %d needed to "
                  "unmask); updates clipped to +-%g, quantized to 2^%d levels", n_sites, plan.threshold,
                  run.secagg_clipping_range, plan.quantization_range.bit_length() - 1)

    def aggregation(server_round: int) -> dict[str, Any]:
        """What the aggregation step saw: one record per site, or under SecAgg+ one in all."""
        seen = strategy.train_records.get(server_round, 0)
        sites = train_grid.sites_aggregated.get(server_round, 0) if run.secagg else seen
        rejected = strategy.rejected.get(server_round, {})
        for site, reason in rejected.items():
            _progress("round %d: rejected the update of %s: %s", server_round, site, reason)
        agg = {"secure": run.secagg, "records_seen_by_strategy": seen, "sites_aggregated": sites,
               "rejected": rejected}
        if server_round in strategy.weight_shares:  # quality weighting
            agg["weight_share"] = {s: round(v, 4) for s, v in strategy.weight_shares[server_round].items()}
        return agg

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            round_start[0] = time.monotonic()
            deadline_grid.take_waited()
            return None
        server_round += strategy.round_offset  # Flower counts the rounds of a resumed run from 1
        # waiting for sites to connect is not part of the round's cost
        elapsed = time.monotonic() - round_start[0] - deadline_grid.take_waited()
        per_site = strategy.site_history.get(server_round, {})
        if not per_site:
            raise FedscanError(
                f"round {server_round}: no site returned an evaluation within {run.round_timeout:.0f}s",
                hint="check the sites' logs; raise round_timeout for slow sites",
            )
        summary = recorder.record_round(
            server_round, per_site, timing(elapsed, strategy.compute_seconds.get(server_round, {})),
            aggregation(server_round),
        )
        # all a resumed run needs: the model, the server optimizer's state, the history so far
        output("a checkpoint", lambda: checkpoint.save_round(run.output, server_round, arrays, run,
                                                             strategy.state(), recorder.history))
        publish("running")
        round_start[0] = time.monotonic()
        per_site = ", ".join(
            f"{s} {r[main_metric]:.3f}" if r.get(main_metric) is not None else f"{s} n/a"
            for s, r in summary["per_site"].items()
        )
        mean = summary["mean"][main_metric]
        missing = recorder.history[-1].get("missing_sites")
        if missing:
            _progress("round %d: no evaluation from %s", server_round, ", ".join(missing))
        _progress("round %d/%d done: mean %s %s (%s)", server_round, run.rounds, main_metric,
                  "n/a" if mean is None else f"{mean:.3f}", per_site)
        return None

    round_config = ConfigRecord(
        {"local-epochs": run.local_epochs, "lr": run.learning_rate, "batch-size": run.batch_size}
    )
    try:
        strategy.start(
            grid=train_grid,
            initial_arrays=initial,
            num_rounds=run.rounds - strategy.round_offset,
            train_config=round_config,
            evaluate_config=ConfigRecord(),
            evaluate_fn=after_round,
            timeout=run.round_timeout,
        )
    except FedscanError as exc:
        publish("failed")
        _progress("run failed: %s%s", exc.message, f" | {exc.hint}" if exc.hint else "")
        raise
    except BaseException:
        publish("failed")
        _progress("run failed")
        raise
    rep = publish("complete")
    _progress("run complete: final mean %s %s", main_metric, rep["final"]["mean"].get(main_metric))
