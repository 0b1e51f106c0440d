"""The shape of report.json: one pydantic model for the ServerApp that writes it, the run event that
carries it to `fedscan run` (``fedscan.common.run_events``) and `fedscan report`, which reads it.

The model names what every report holds and what the report files are made from; everything else
(``timing`` and ``aggregation`` per round, and the optional sections ``cross_site``,
``federated_gain``, ``baselines``, ``quality``, ``explanation_scores``, ...) is kept as it is,
in its place, so that a report read and written again is the same file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# running while the ServerApp runs; interrupted or failed when it stopped before the last round
RunStatus = Literal["running", "complete", "failed", "interrupted"]
# a site's metrics under the report's names, as written: ints stay ints, undefined is None
SiteRows = dict[str, dict[str, Any]]


class _Open(BaseModel):
    """A part of the report that keeps the keys it does not name, in their order."""

    model_config = ConfigDict(extra="allow")


class ReportMetrics(_Open):
    main: str
    names: list[str]


class RoundResult(_Open):
    round: int
    per_site: SiteRows


class FinalResults(_Open):
    per_site: SiteRows
    mean: dict[str, Any]
    worst: dict[str, Any]


class RunReport(_Open):
    """report.json. The fields are in the file's order; the optional sections follow them."""

    fedscan_version: str | None = None
    status: RunStatus
    task: str
    model: str
    strategy: str
    secagg: bool = False
    rounds: int
    rounds_completed: int
    seed: int
    sites: list[str]
    started: str | None = None
    updated: str | None = None
    metrics: ReportMetrics
    history: list[RoundResult]
    final: FinalResults

    def as_dict(self) -> dict[str, Any]:
        """The report as report.json holds it: the keys it was made with, in their order."""
        return self.model_dump(mode="json", exclude_unset=True)
