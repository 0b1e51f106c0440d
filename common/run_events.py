"""Typed events from a run's ServerApp to the command that follows the run (`fedscan simulate`,
`fedscan run`): progress, the report after every round, and how the run ended.

The ServerApp writes each event with :func:`write_event` as one JSON object on a line of its own on
its standard output. Flower carries that output to `flwr log --stream`
(``fedscan.common.flower_runtime.follow_run``), where :func:`decode` turns each such line back
into its event. Any other line (Flower's own log) decodes to None: it is kept in the log file and
nothing reads it. What a user sees of an event is its :meth:`text`, made here from the event's
fields; no process reads another's text.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from fedscan.common.report_schema import RunReport

# The key every event carries: which event it is. A JSON line without it is not an event.
EVENT_KEY = "fedscan_event"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def text(self) -> str | None:
        """The line a user sees for this event; None for an event that is data only."""
        return None


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class RunStarted(_Event):
    """The ServerApp has started the rounds (``resumed_after``: the checkpoint's round of a resumed run)."""

    fedscan_event: Literal["run_started"] = "run_started"
    sites: int
    rounds: int
    resumed_after: int = 0
    checkpoint: str | None = None

    def text(self) -> str:
        if self.resumed_after:
            return (
                f"resuming from round {self.resumed_after} ({self.checkpoint}): {self.sites} sites, "
                f"rounds {self.resumed_after + 1} to {self.rounds}"
            )
        return f"run started: {self.sites} sites, {self.rounds} rounds"


class WaitingForSites(_Event):
    """Fewer sites than a round needs are connected; the run waits up to ``timeout`` seconds."""

    fedscan_event: Literal["waiting_for_sites"] = "waiting_for_sites"
    connected: int
    needed: int
    timeout: float

    def text(self) -> str:
        return f"waiting for sites: {self.connected} of {self.needed} connected (up to {self.timeout:.0f}s)"


class SecureAggregation(_Event):
    """The run trains under SecAgg+, with these parameters."""

    fedscan_event: Literal["secure_aggregation"] = "secure_aggregation"
    sites: int
    threshold: int
    clipping_range: float
    quantization_bits: int

    def text(self) -> str:
        return (
            f"secure aggregation (SecAgg+): each round over the sites it reaches (with {self.sites}: "
            f"{self.threshold} needed to unmask); updates clipped to +-{self.clipping_range:g}, "
            f"quantized to 2^{self.quantization_bits} levels"
        )


class RunWarning(_Event):
    """Something a user should know about a round (a site dropped out of SecAgg+, say)."""

    fedscan_event: Literal["warning"] = "warning"
    message: str

    def text(self) -> str:
        return self.message


class UpdateRejected(_Event):
    """The server left a site's update out of a round's aggregate."""

    fedscan_event: Literal["update_rejected"] = "update_rejected"
    round: int
    site: str
    reason: str

    def text(self) -> str:
        return f"round {self.round}: rejected the update of {self.site}: {self.reason}"


class TrainingMissing(_Event):
    """Sites of the run sent no usable training update in a round (it failed, timed out or was
    rejected): the round's model is the other sites' aggregate."""

    fedscan_event: Literal["training_missing"] = "training_missing"
    round: int
    sites: list[str]

    def text(self) -> str:
        return f"round {self.round}: no training update from {', '.join(self.sites)}"


class EvaluationsMissing(_Event):
    """Sites of the run sent no evaluation in a round."""

    fedscan_event: Literal["evaluations_missing"] = "evaluations_missing"
    round: int
    sites: list[str]

    def text(self) -> str:
        return f"round {self.round}: no evaluation from {', '.join(self.sites)}"


class RoundFinished(_Event):
    """A round is done: the mean and each site's value of the task's main metric."""

    fedscan_event: Literal["round_finished"] = "round_finished"
    round: int
    rounds: int
    metric: str
    mean: float | None
    per_site: dict[str, float | None]

    def text(self) -> str:
        sites = ", ".join(f"{s} {_score(v)}" for s, v in self.per_site.items())
        return f"round {self.round}/{self.rounds} done: mean {self.metric} {_score(self.mean)} ({sites})"


class ReportUpdated(_Event):
    """The run's report as it stands (after every round, and at the end): report.json's content."""

    fedscan_event: Literal["report"] = "report"
    report: RunReport


class RunFinished(_Event):
    """The last round is done and the report complete."""

    fedscan_event: Literal["run_finished"] = "run_finished"
    metric: str
    mean: float | None

    def text(self) -> str:
        return f"run complete: final mean {self.metric} {self.mean}"


class RunFailed(_Event):
    """The run stopped: the problem (for one a user can fix) and what to do about it."""

    fedscan_event: Literal["run_failed"] = "run_failed"
    message: str | None = None
    hint: str | None = None

    def text(self) -> str:
        message = f": {self.message}" if self.message else ""
        return "run failed" + message + (f" | {self.hint}" if self.hint else "")


RunEvent = Annotated[
    RunStarted
    | WaitingForSites
    | SecureAggregation
    | RunWarning
    | UpdateRejected
    | TrainingMissing
    | EvaluationsMissing
    | RoundFinished
    | ReportUpdated
    | RunFinished
    | RunFailed,
    Field(discriminator=EVENT_KEY),
]
_EVENTS: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)


def encode(event: RunEvent) -> str:
    """One event as one line of JSON (no newline)."""
    return event.model_dump_json()


def decode(line: str) -> RunEvent | None:
    """The event a line holds; None for a line that holds none (any other output).

    Raises ValueError for a line that is an event but not a valid one (a ServerApp of another
    fedscan version, say)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or EVENT_KEY not in data:
        return None
    return _EVENTS.validate_python(data)


def write_event(event: RunEvent, stream: TextIO | None = None) -> None:
    """Write an event to the ServerApp's output (stdout), on a line of its own, in one write so that no
    other output can land inside it. The leading newline ends any line other output left open."""
    out = stream if stream is not None else sys.stdout
    out.write("\n" + encode(event) + "\n")
    out.flush()
