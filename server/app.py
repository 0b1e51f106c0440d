"""The Flower ServerApp: builds the strategy from the run config and runs the rounds.

After every round it saves a checkpoint (the global model, the strategy's state, the history)
and rewrites the report with each site's evaluation of that model; what it has to say reaches
the command that follows the run as run events on its output (``fedscan.common.run_events``).
Given ``resume_from``, it continues a run after its checkpoint's round. The Flower-specific
parts stay here; the round bookkeeping is ``fedscan.server.rounds``, testable alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedscan.common.array_records import to_record
from fedscan.common.config import AppConfig
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.common.packed_records import PackError, packed, unpacked
from fedscan.common.run_events import (
    RunEvent,
    RunFailed,
    RunWarning,
    SecureAggregation,
    WaitingForSites,
    write_event,
)
from fedscan.common.weights import norm_keys
from fedscan.server import checkpoint
from fedscan.server.round_loop import run_rounds
from fedscan.server.rounds import RunRounds
from fedscan.server.strategies import PerSiteEvaluation, build_strategy

log = logging.getLogger("fedscan.server")

app = ServerApp()


class SitesMissing(FedscanError):
    """Fewer sites than a round needs stayed connected for longer than the wait timeout."""


# How often the ServerApp asks the SuperLink for the replies of the messages it sent. Flower's
# HttpGrid.send_and_receive sleeps a fixed 3 s between pulls (flwr 1.42, superlink/grid/
# http_grid.py), so a deployed exchange waited 1.5 s on average after the last reply had arrived;
# a pull is one local HTTP request to the SuperLink, so asking every 0.2 s costs nothing that shows.
REPLY_POLL_SECONDS = 0.2


class DeadlineGrid:
    """A Grid whose node list gives up: when fewer than ``needed`` nodes are connected for longer
    than ``timeout`` seconds, asking for the nodes raises SitesMissing. Flower's strategies wait
    for their minimum number of nodes without a limit; this puts one on every such wait.

    ``send_and_receive`` is Flower's contract (push the messages, pull replies until all came or
    ``timeout`` passed) over the inner grid's public ``push_messages``/``pull_messages``, asking for
    replies every ``poll`` seconds instead of HttpGrid's fixed 3 s."""

    def __init__(
        self,
        grid: Grid,
        needed: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[RunEvent], None] = write_event,
        poll: float = REPLY_POLL_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._grid = grid
        self.needed = needed
        self.timeout = timeout
        self._clock = clock
        self._emit = emit
        self._poll = poll
        self._sleep = sleep
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
            self._emit(WaitingForSites(connected=len(ids), needed=self.needed, timeout=self.timeout))
        elif now - self._short_since > self.timeout:
            raise SitesMissing(
                f"only {len(ids)} of the {self.needed} sites this run needs were connected after waiting "
                f"{self.timeout:.0f}s",
                hint="start the missing sites (`fedscan site start`), lower --sites, or raise --wait-timeout",
            )
        return ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages`` with their arrays packed into one object each (``common.packed_records``)
        and return the replies that came within ``timeout`` seconds, unpacked."""
        pushed = self._grid.push_messages([packed(m) for m in messages])
        waiting = {mid for mid in pushed if mid}  # "" / None: not pushed
        end = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(_unpacked_reply(m) for m in got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (end is not None and self._clock() >= end):
                break
            self._sleep(self._poll)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _unpacked_reply(msg: Message) -> Message:
    try:
        return unpacked(msg)[0]
    except PackError as exc:  # left packed: the strategy rejects arrays that are not the model's
        log.warning("node %s sent a reply whose arrays cannot be unpacked: %s", msg.metadata.src_node_id, exc)
        return msg


class OutputFolder:
    """The ServerApp's own copy of the results (checkpoints, report files). A folder it cannot
    write is logged once and skipped: the report still reaches `fedscan run` as a run event."""

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
    saved = {
        "task": resumed.config.get("task"),
        "model": resumed.config.get("model"),
        "strategy": resumed.strategy,
    }
    ours = {"task": run.task, "model": run.model, "strategy": run.strategy}
    if saved != ours:
        raise FedscanError(
            f"the checkpoint {cfg.resume_from} is of another run ({saved}, this run: {ours})",
            hint="resume a run with the config it was started with (its run_config.toml)",
        )
    shapes = {k: tuple(v.shape) for k, v in initial.items()}
    if {k: tuple(v.shape) for k, v in resumed.arrays.items()} != shapes:
        raise FedscanError(
            f"the weights in {cfg.resume_from} do not fit this run's {run.model}",
            hint="resume a run with the config it was started with (its run_config.toml)",
        )
    if not 1 <= resumed.server_round < run.rounds:
        raise FedscanError(
            f"the checkpoint {cfg.resume_from} is of round {resumed.server_round}; "
            f"this run has {run.rounds} rounds, so there is nothing left to resume"
        )
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
    output = OutputFolder()
    rounds = RunRounds(cfg, strategy, write_event, write=output)
    output("the run config", lambda: checkpoint.save_run_config(run.output, run))
    initial = to_record(model)
    if cfg.resume_from is not None:
        try:
            resumed = resume_point(cfg, strategy, initial)
        except FedscanError as exc:
            rounds.fail(exc, publish=False)
            raise
        initial = resumed.arrays
        rounds.resume(resumed.history)

    rounds.publish("running")
    rounds.start(n_sites, cfg.resume_from)
    deadline_grid = DeadlineGrid(grid, n_sites, run.wait_timeout)
    rounds.waited = deadline_grid.take_waited
    train_grid: Any = deadline_grid
    if run.secagg:
        from fedscan.server.secagg import SecureTrainGrid

        try:
            plan = run.secagg_plan(n_sites)
        except ValueError as exc:
            rounds.publish("failed")
            write_event(RunFailed(message=str(exc)))
            hint = "change the secagg_ settings, or run with --no-secagg"
            raise FedscanError(str(exc), hint=hint) from None
        train_grid = SecureTrainGrid(
            cast(Grid, deadline_grid),  # a Grid by duck typing: it passes on what it does not change
            context,
            run,
            progress=lambda msg, *args: write_event(RunWarning(message=msg % args)),
        )
        rounds.sites_aggregated = train_grid.sites_aggregated
        write_event(
            SecureAggregation(
                sites=n_sites,
                threshold=plan.threshold,
                clipping_range=run.secagg_clipping_range,
                quantization_bits=plan.quantization_range.bit_length() - 1,
            )
        )

    def after_round(server_round: int, arrays: ArrayRecord, state: dict[str, Any]) -> None:
        if server_round == 0:
            rounds.begin()
            return

        def save(done: int) -> None:
            checkpoint.save_round(run.output, done, arrays, run, state, rounds.history)

        rounds.finish(server_round, save)

    round_config = ConfigRecord(
        {"local-epochs": run.local_epochs, "lr": run.learning_rate, "batch-size": run.batch_size}
    )
    try:
        run_rounds(
            strategy,
            train_grid,
            initial,
            num_rounds=run.rounds - strategy.round_offset,
            train_config=round_config,
            evaluate_config=ConfigRecord(),
            timeout=run.round_timeout,
            on_round=after_round,
        )
    except BaseException as exc:
        rounds.fail(exc)
        raise
    rounds.complete()
