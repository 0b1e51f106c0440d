"""Federated strategies, extended to keep each site's evaluation under its own name.

Flower's strategies average evaluation metrics across sites; a hospital needs to see its
own numbers. :class:`PerSiteEvaluation` records every reply's metrics under the site name
the client sends, before the usual aggregation runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from fedscan.common.config import RunConfig
from fedscan.common.weights import COMPUTE_SECONDS

log = logging.getLogger("fedscan.server")

SiteMetrics = dict[str, dict[str, float]]


def site_name(msg: Message) -> str:
    """The site name a reply carries, or its node ID when it has none."""
    if not msg.has_error() and "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def site_metrics_from_replies(replies: Iterable[Message]) -> SiteMetrics:
    """{site name: {metric: value}} from evaluation replies; failed replies are logged."""
    per_site: SiteMetrics = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("node %s did not evaluate: %s", node, msg.error.reason)
            continue
        name = site_name(msg)
        records = list(msg.content.metric_records.values())
        if not records:
            log.warning("site %s sent no metrics", name)
            continue
        per_site[name] = {k: float(v) for k, v in records[0].items() if isinstance(v, (int, float))}
    return per_site


def _seconds(replies: list[Message]) -> dict[str, float]:
    out = {}
    for msg in replies:
        if msg.has_error():
            continue
        for rec in msg.content.metric_records.values():
            if COMPUTE_SECONDS in rec:
                out[site_name(msg)] = float(rec[COMPUTE_SECONDS])
    return out


# the name on the one training reply a strategy gets under SecAgg+: the secure aggregate
SECURE_AGGREGATE = "secure-aggregate"


class PerSiteEvaluation(Strategy):
    """Mixin: keeps ``site_history[round] = {site: metrics}``, then aggregates as usual."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.site_history: dict[int, SiteMetrics] = {}
        # seconds each site computed, per round: {"train": {site: s}, "evaluate": {site: s}}
        self.compute_seconds: dict[int, dict[str, dict[str, float]]] = {}
        # how many training records the aggregation step received per round: one per site in
        # plaintext, exactly one (the secure aggregate) under SecAgg+
        self.train_records: dict[int, int] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        # a fixed order (by site name), so that the floating-point sums do not depend on which
        # site answered first: the same seed gives the same model in simulation and deployment
        replies = sorted(replies, key=site_name)
        self.train_records[server_round] = len(replies)
        self.compute_seconds.setdefault(server_round, {})["train"] = _seconds(replies)
        return super().aggregate_train(server_round, replies)  # type: ignore[safe-super]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.compute_seconds.setdefault(server_round, {})["evaluate"] = _seconds(replies)
        self.site_history[server_round] = {
            site: {k: v for k, v in m.items() if k != COMPUTE_SECONDS}
            for site, m in site_metrics_from_replies(replies).items()
        }
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[safe-super]


class PerSiteFedAvg(PerSiteEvaluation, FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017) with per-site evaluation records."""


_STRATEGIES: dict[str, type[PerSiteEvaluation]] = {"fedavg": PerSiteFedAvg}


def build_strategy(cfg: RunConfig, n_sites: int) -> PerSiteEvaluation:
    """The run's strategy; every site trains and evaluates in every round."""
    cls = _STRATEGIES[cfg.strategy]
    return cls(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n_sites,
        min_evaluate_nodes=n_sites,
        min_available_nodes=n_sites,
    )
