"""Federated strategies: Flower's own (``flwr.serverapp.strategy``), extended to keep each
site's evaluation under its own name and to reject faulty updates.

Flower's strategies average evaluation metrics across sites; a hospital needs to see its
own numbers. :class:`PerSiteEvaluation` records every reply's metrics under the site name
the client sends, before the usual aggregation runs. Before any strategy aggregates, a training
reply whose weights hold NaN or infinite values, or do not match the global model's arrays and
shapes, is rejected with a logged reason (and counted in the report), whatever the strategy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from fedscan.common.config import AggregationSettings, RunConfig
from fedscan.common.message_keys import COMPUTE_SECONDS, QUALITY_FACTOR
from fedscan.common.tasks.schedule import round_lr

# the metric quality weighting writes into each kept reply and aggregates by
QUALITY_WEIGHT = "quality-weight"

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
                out[site_name(msg)] = float(cast(float, rec[COMPUTE_SECONDS]))  # a site's seconds: a number
    return out


# the name on the one training reply a strategy gets under SecAgg+: the secure aggregate
SECURE_AGGREGATE = "secure-aggregate"


# the attributes of Flower's strategies that carry the server optimizer's state between rounds:
# FedOpt's moments (FedAdam, FedYogi) and FedAvgM's momentum
OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")


class PerSiteEvaluation(FedAvg):
    """Mixin over FedAvg, from which every strategy here derives: keeps
    ``site_history[round] = {site: metrics}``, then aggregates as usual.

    ``round_offset``: the rounds a resumed run did before this ``start()``. Flower counts the
    rounds of every ``start()`` from 1; the mixin passes on ``round + round_offset``, so that the
    sites' per-round seeds, FedAdam's bias correction and the records keyed by round continue.

    ``run``: the run's settings, when the strategy should send each round's learning rate
    (``lr_schedule``) in the training config.
    """

    round_offset: int = 0
    run: RunConfig | None = None

    def state(self) -> dict[str, Any]:
        """The server optimizer's state (see ``OPTIMIZER_STATE``) this strategy has: for a checkpoint."""
        return {name: getattr(self, name) for name in OPTIMIZER_STATE if hasattr(self, name)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (a resumed run)."""
        unknown = sorted(set(state) - {n for n in OPTIMIZER_STATE if hasattr(self, n)})
        if unknown:
            raise ValueError(f"{type(self).__name__} has no optimizer state {unknown}")
        for name, value in state.items():
            setattr(self, name, value)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the concrete strategy's arguments
        super().__init__(*args, **kwargs)
        self.site_history: dict[int, SiteMetrics] = {}
        # seconds each site computed, per round: {"train": {site: s}, "evaluate": {site: s}}
        self.compute_seconds: dict[int, dict[str, dict[str, float]]] = {}
        # how many training records the aggregation step received per round: one per site in
        # plaintext, exactly one (the secure aggregate) under SecAgg+
        self.train_records: dict[int, int] = {}
        # the sites whose training update went into the aggregate, per round (plaintext)
        self.trained: dict[int, list[str]] = {}
        # training updates rejected before aggregation, per round: {site: reason}
        self.rejected: dict[int, dict[str, str]] = {}
        self._global_shapes: dict[str, tuple[int, ...]] | None = None  # of the round's global model
        # quality weighting (plaintext): the largest share of the aggregate a site may hold, or None;
        # and the lowest factor a site's reported quality counts with
        self.quality_max_share: float | None = None
        self.quality_floor = 0.0
        # each site's share of the aggregate, per round, under quality weighting
        self.weight_shares: dict[int, dict[str, float]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._global_shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        if self.run is not None:  # this round's learning rate, on the run's schedule
            config = ConfigRecord({**config, "lr": round_lr(self.run, server_round)})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        # a fixed order (by site name), so that the floating-point sums do not depend on which
        # site answered first: the same seed gives the same model in simulation and deployment
        replies = sorted(replies, key=site_name)
        kept = []
        for msg in replies:
            problem = None if msg.has_error() else faulty_update(msg, self._global_shapes)
            if problem:
                log.warning("round %d: rejected the update of %s: %s", server_round, site_name(msg), problem)
                self.rejected.setdefault(server_round, {})[site_name(msg)] = problem
            else:
                kept.append(msg)
        replies = kept
        self.train_records[server_round] = len(replies)
        self.trained[server_round] = [site_name(m) for m in replies if not m.has_error()]
        self.compute_seconds.setdefault(server_round, {})["train"] = _seconds(replies)
        self.before_aggregation(replies)
        if self.quality_max_share is None or not replies:
            return super().aggregate_train(server_round, replies)
        # quality weighting: the training replies are weighted by the weights written here (the
        # evaluation replies, which carry none, keep Flower's weighting by example count)
        self.weight_shares[server_round] = _quality_weights(
            replies, self.quality_max_share, self.quality_floor
        )
        by_count, self.weighted_by_key = self.weighted_by_key, QUALITY_WEIGHT
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.weighted_by_key = by_count

    def before_aggregation(self, replies: list[Message]) -> None:
        """A hook for a strategy that adapts to the round's kept replies (nothing by default)."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self.compute_seconds.setdefault(server_round, {})["evaluate"] = _seconds(replies)
        self.site_history[server_round] = {
            site: {k: v for k, v in m.items() if k != COMPUTE_SECONDS}
            for site, m in site_metrics_from_replies(replies).items()
        }
        return super().aggregate_evaluate(server_round, replies)


def capped_shares(weights: dict[str, float], max_share: float) -> dict[str, float]:
    """Shares proportional to ``weights``, none above ``max_share``: a site over the cap is held
    at it and the excess goes to the others in proportion (water-filling). A cap below 1/n is
    raised to 1/n, the equal split."""
    cap = max(max_share, 1.0 / len(weights))
    capped: dict[str, float] = {}
    while True:
        free = {s: w for s, w in weights.items() if s not in capped}
        left = 1.0 - cap * len(capped)
        total = sum(free.values())
        shares = {s: (left * w / total if total > 0 else left / len(free)) for s, w in free.items()}
        over = {s for s, v in shares.items() if v > cap + 1e-12}
        if not over:
            return {**{s: cap for s in capped}, **shares}
        capped.update(dict.fromkeys(over, cap))


def _quality_weights(replies: list[Message], max_share: float, floor: float) -> dict[str, float]:
    """Quality weighting: each reply's weight is example count x the quality factor the site
    sent (held within [``floor``, 1]; a missing or non-finite one counts as 1), with no site
    above ``max_share`` of the total. Written into the reply as ``QUALITY_WEIGHT`` (the strategy
    aggregates by it); returns each site's share."""
    raw = {}
    for msg in replies:
        rec = next(iter(msg.content.metric_records.values()))
        q = float(cast(float, rec.get(QUALITY_FACTOR, 1.0)))  # the site's factor: a number
        q = min(1.0, max(floor, q)) if math.isfinite(q) else 1.0
        n = float(cast(float, rec["num-examples"]))  # a count
        raw[site_name(msg)] = n * q if math.isfinite(n) and n > 0 else 0.0
    shares = capped_shares(raw, max_share)
    for msg in replies:
        next(iter(msg.content.metric_records.values()))[QUALITY_WEIGHT] = shares[site_name(msg)]
    return shares


def faulty_update(msg: Message, shapes: dict[str, tuple[int, ...]] | None) -> str | None:
    """Why a training reply's weights cannot be aggregated, or None: non-finite values, or
    arrays that are not the global model's (missing, extra, or of another shape)."""
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return f"it holds {len(records)} weight records, not 1"
    arrays = records[0]
    if shapes is not None:
        missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
        if missing or extra:
            return f"its arrays do not match the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, arr in arrays.items():
        if shapes is not None and tuple(arr.shape) != shapes[key]:
            return f"array {key} has shape {tuple(arr.shape)}, the model's is {shapes[key]}"
        values = arr.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array {key} holds NaN or infinite values"
    return None


class PerSiteFedAvg(PerSiteEvaluation, FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017): the example-weighted mean."""


class PerSiteFedAvgM(PerSiteEvaluation, FedAvgM):
    """FedAvgM (Hsu et al. 2019): FedAvg with server momentum."""


class PerSiteFedAdam(PerSiteEvaluation, FedAdam):
    """FedAdam (Reddi et al., ICLR 2021): Adam on the server, the mean update as its gradient."""


class PerSiteFedYogi(PerSiteEvaluation, FedYogi):
    """FedYogi (Reddi et al., ICLR 2021): Yogi on the server."""


class PerSiteFedProx(PerSiteEvaluation, FedProx):
    """FedProx (Li et al., MLSys 2020): FedAvg, the sites adding µ/2·‖w − w_global‖² to their loss."""


class PerSiteFedMedian(PerSiteEvaluation, FedMedian):
    """FedMedian (Yin et al., ICML 2018): the coordinate-wise median, robust to a faulty site."""


class PerSiteFedTrimmedAvg(PerSiteEvaluation, FedTrimmedAvg):
    """FedTrimmedAvg (Yin et al., ICML 2018): the coordinate-wise mean without the lowest and
    highest ``trimmed_fraction`` of the sites' values. Without a fraction set (``auto_trim``),
    one site's values at each end of the round's kept replies, however many sites answered."""

    auto_trim = False

    def before_aggregation(self, replies: list[Message]) -> None:
        if self.auto_trim and replies:
            self.beta = min(1.0001 / len(replies), 0.4999)
            if len(replies) < 3:
                log.warning(
                    "fedtrimmedavg: only %d update(s) this round: nothing to cut, a plain mean", len(replies)
                )


class PerSiteFedBN(PerSiteFedAvg):
    """FedBN (Li et al., ICLR 2021): FedAvg over every layer but the normalization layers, which
    stay at each site (``fedscan.common.tasks.fedbn_layers``) and are never sent. The global model keeps
    its initial normalization layers; each site evaluates its personalized model."""

    def __init__(self, *args: object, local_keys: frozenset[str] = frozenset(), **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.local_keys = local_keys
        self._round_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_arrays = arrays
        messages = super().configure_train(server_round, arrays, config, grid)
        self._global_shapes = {
            k: v for k, v in (self._global_shapes or {}).items() if k not in self.local_keys
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:  # a secure aggregate holds them (unchanged): the shared layers only
            if not msg.has_error() and "arrays" in msg.content.array_records:
                arrays = msg.content["arrays"]
                msg.content["arrays"] = ArrayRecord(
                    {k: arrays[k] for k in arrays if k not in self.local_keys}
                )
        shared, metrics = super().aggregate_train(server_round, replies)
        if shared is None or self._round_arrays is None:
            return shared, metrics
        full = self._round_arrays  # the new shared layers, the global normalization layers, in model order
        return ArrayRecord({k: (full[k] if k in self.local_keys else shared[k]) for k in full}), metrics


_STRATEGIES: dict[str, type[PerSiteEvaluation]] = {
    "fedavg": PerSiteFedAvg,
    "fedavgm": PerSiteFedAvgM,
    "fedadam": PerSiteFedAdam,
    "fedyogi": PerSiteFedYogi,
    "fedprox": PerSiteFedProx,
    "fedmedian": PerSiteFedMedian,
    "fedtrimmedavg": PerSiteFedTrimmedAvg,
    "fedbn": PerSiteFedBN,
}


def _options(agg: AggregationSettings, n_sites: int) -> dict[str, float]:
    """The run config's settings for the chosen strategy (its ``aggregation`` group)."""
    lr = agg.server_learning_rate
    if agg.strategy == "fedavgm":
        return {"server_learning_rate": 1.0 if lr is None else lr, "server_momentum": agg.server_momentum}
    if agg.strategy in ("fedadam", "fedyogi"):
        return {"eta": 1e-2 if lr is None else lr, "tau": agg.server_tau}
    if agg.strategy == "fedprox":
        return {"proximal_mu": agg.proximal_mu}
    if agg.strategy == "fedtrimmedavg":  # by default one site's values at each end
        return {
            "beta": agg.trimmed_fraction
            if agg.trimmed_fraction is not None
            else min(1.0001 / n_sites, 0.4999)
        }
    return {}


def build_strategy(
    cfg: RunConfig, n_sites: int, local_keys: frozenset[str] = frozenset()
) -> PerSiteEvaluation:
    """The run's strategy; every site trains and evaluates in every round. ``local_keys``: the
    model's normalization layers, which FedBN leaves at the sites."""
    cls = _STRATEGIES[cfg.strategy]
    options: dict[str, object] = dict(_options(cfg.aggregation, n_sites))
    if cfg.strategy == "fedbn":
        options["local_keys"] = local_keys
    # quality weighting in plaintext: by the weights the strategy writes; under SecAgg+ each site
    # masks its count x quality factor, and the secure aggregate carries their total as its count
    quality = cfg.quality_weighting and not cfg.secagg
    strategy = cls(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n_sites,
        min_evaluate_nodes=n_sites,
        min_available_nodes=n_sites,
        **options,
    )
    if quality:
        strategy.quality_max_share = cfg.quality_max_share
        strategy.quality_floor = cfg.quality_floor
    if isinstance(strategy, PerSiteFedTrimmedAvg):
        strategy.auto_trim = cfg.trimmed_fraction is None
    strategy.run = cfg
    return strategy
