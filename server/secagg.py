"""Secure aggregation: one training round through Flower's SecAgg+ (server half).

Flower ships SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` runs on a ``LegacyContext``
and talks to a legacy ``Strategy``. This module is the thin bridge. ``secure_train_round``
runs the protocol for one round over every connected site, and a small legacy strategy hands
the single aggregate it yields back as an ArrayRecord. The Message-API strategy then gets
exactly one aggregated reply per round; it never sees a site's own update.

Sites send their update as a delta (local weights minus the global weights; encoded as
``fedscan.common.secagg_numerics`` describes), so the values fit the clipping range; the
aggregate is the example-weighted mean of the deltas, which the round adds to the global
weights. Because the bridge wraps the Grid, not the strategy, every Message-API strategy runs
on it unchanged: it sees one reply whose weights are the secure mean (a server optimizer such as
FedAdam then steps from it). Aggregators that need each site's update (a median, a trimmed
mean) cannot be robust on a single record.

The evaluation of the previous round's model rides on the stage that trains, as it rides on a
plaintext training message (``fedscan.server.round_loop``): each site's evaluation config goes
into its FitIns config, and the evaluation metrics it sends beside its masked vector come back
to the strategy as that site's evaluation reply. A SecAgg+ round is then the protocol's four
exchanges, with no evaluation exchange of its own.

Flower's implementation of the protocol (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) is used as is, except for one correction to which sites
count as dropped (``DropoutSafeSecAggPlus``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, MessageType, Parameters, Scalar
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedscan.common.config import RunConfig, SecAggPlan
from fedscan.common.errors import FedscanError
from fedscan.common.message_keys import (
    CLIPPED_FRACTION,
    COMPUTE_SECONDS,
    EVALUATE_CONFIG,
    EVALUATE_FIRST,
    EVALUATE_PREFIX,
    EVALUATED_SITE,
    EVALUATION,
    EVALUATION_PREFIX,
)
from fedscan.common.secagg_numerics import MODULUS, decode_aggregate
from fedscan.server.strategies import SECURE_AGGREGATE

log = logging.getLogger("fedscan.server")


class _OneAggregate(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: it sends every connected site the round's
    instructions (the round's config, and each site's own part of it: the evaluation riding on
    it) and keeps the one aggregate the protocol reconstructs."""

    def __init__(self, config: dict[str, Scalar], per_site: Mapping[int, Mapping[str, Scalar]]) -> None:
        self.config = config
        self.per_site = per_site
        self.aggregate: Parameters | None = None
        self.num_examples = 0
        self.metrics: list[dict[str, Scalar]] = []
        self.sites = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            (proxy, FitIns(parameters, {**self.config, **self.per_site.get(int(proxy.node_id), {})}))
            for proxy in client_manager.all().values()
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAggPlusWorkflow puts the same unmasked aggregate into every surviving result
        if results:
            self.aggregate = results[0][1].parameters
            self.num_examples = sum(r.num_examples for _, r in results)
            self.metrics = [{**dict(r.metrics), "num-examples": r.num_examples} for _, r in results]
            self.sites = len(results)
        return self.aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_train_round(
    grid: Grid,
    context: Context,
    server_round: int,
    deltas_of: ArrayRecord,
    train_config: ConfigRecord,
    workflow: SecAggPlusWorkflow,
    node_ids: list[int],
    per_site: Mapping[int, Mapping[str, Scalar]] | None = None,
) -> tuple[ArrayRecord | None, int, list[dict[str, Scalar]]]:
    """Run SecAgg+ for one round over all connected sites.

    ``deltas_of``: the global weights the sites train from; ``per_site``: config entries for one
    site's FitIns only, by node ID (the evaluation riding on it). Returns the example-weighted mean of
    the sites' deltas (None when the protocol could not finish, e.g. too few sites left), the
    total example count, and each survivor's plaintext scalar metrics."""
    # the round's config as a legacy FitIns holds it: Scalar values, the only ones the sites'
    # recorddict_to_fitins accepts
    strategy = _OneAggregate(
        {**cast(dict[str, Scalar], dict(train_config)), "server-round": server_round}, per_site or {}
    )
    manager = SimpleClientManager()
    run_id = context.run_id
    for node_id in node_ids:
        manager.register(GridClientProxy(node_id, grid, run_id))
    legacy = LegacyContext(context, ServerConfig(num_rounds=server_round), strategy, manager)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = deltas_of
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    workflow(grid, legacy)
    if strategy.aggregate is None or strategy.num_examples <= 0:  # no weight at all: no mean either
        return None, 0, []
    return (
        parameters_to_arrayrecord(strategy.aggregate, keep_input=True),
        strategy.num_examples,
        strategy.metrics,
    )


class DropoutSafeSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with one correction to its dropout bookkeeping; the protocol and
    all its cryptography stay Flower's.

    Flower 1.42 treats as dropped, at unmasking, every site sampled at setup that sent no
    masked vector. A site that left before its key shares went out is among them, yet nobody
    holds shares of its keys: every survivor then fails at unmasking (``KeyError`` in
    ``secaggplus_mod``) and the round is lost, although the survivors never masked against that
    site. Here a site takes part from the moment its key shares went out: sites that left
    earlier are dropped from the round and from every neighbourhood, so unmasking recovers and
    removes exactly the masks that are in the sum.

    Also, the stage that trains (masking) waits ``train_timeout`` when that is longer than the
    other stages' timeout: it includes the sites' local training (and the evaluation before it).
    The evaluation metrics a site sent beside its masked vector are taken out of its training
    metrics into ``evaluations`` (node ID -> (site, metrics)), kept even if the round then fails."""

    def __init__(self, *, train_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_timeout = train_timeout
        self.evaluations: dict[int, tuple[str, dict[str, int | float]]] = {}

    def share_keys_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        for nid in shared:
            state.nid_to_neighbours[nid] = state.nid_to_neighbours[nid] & shared
        return self._check_threshold(state)  # over the sites that take part from here on

    def collect_masked_vectors_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        stage_timeout = self.timeout
        if self.train_timeout is not None and (stage_timeout is None or self.train_timeout > stage_timeout):
            self.timeout = self.train_timeout
        try:
            return super().collect_masked_vectors_stage(grid, context, state)
        finally:
            self.timeout = stage_timeout
            for proxy, fitres in state.legacy_results:
                site = fitres.metrics.pop(EVALUATED_SITE, None)
                evaluation = {
                    k[len(EVALUATION_PREFIX) :]: fitres.metrics.pop(k)
                    for k in list(fitres.metrics)
                    if k.startswith(EVALUATION_PREFIX)
                }
                if site is None:
                    continue
                # what a MetricRecord holds (numbers); anything else a site sent is left out, with a warning
                numbers = {
                    k: v
                    for k, v in evaluation.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                if len(numbers) < len(evaluation):
                    log.warning(
                        "site %s sent %d evaluation value(s) that are not numbers; they are left out",
                        site,
                        len(evaluation) - len(numbers),
                    )
                self.evaluations[int(proxy.node_id)] = (str(site), numbers)


def folded_config(msg: Message) -> dict[str, Scalar]:
    """The evaluation config a training message carries (``EVALUATE_CONFIG``, from
    ``fedscan.server.round_loop.fold_evaluation``) as FitIns config entries; empty without one."""
    if EVALUATE_CONFIG not in msg.content.config_records:
        return {}
    entries: dict[str, Scalar] = {EVALUATE_FIRST: True}
    for key, value in msg.content.config_records[EVALUATE_CONFIG].items():
        if not isinstance(value, (bool, int, float, str, bytes)):  # a legacy FitIns holds scalars only
            raise FedscanError(
                f"the evaluation config's {key!r} is a {type(value).__name__}: under SecAgg+ the "
                "evaluation rides on the training message, whose config holds single values only"
            )
        entries[f"{EVALUATE_PREFIX}{key}"] = value
    return entries


def make_workflow(run: RunConfig, plan: SecAggPlan, n_sites: int) -> DropoutSafeSecAggPlus:
    """The SecAgg+ workflow with the run's parameters (its ``secure_aggregation`` group, and the
    round's timeout for the stage that trains). Sharing with everyone is passed as the fraction 1.0:
    Flower takes integer share counts only above 2."""
    settings = run.secure_aggregation
    return DropoutSafeSecAggPlus(
        num_shares=1.0 if plan.shares >= n_sites else plan.shares,
        reconstruction_threshold=plan.threshold,
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=plan.quantization_range,
        modulus_range=MODULUS,
        timeout=settings.timeout,
        train_timeout=run.round_timeout,
    )


def _decode(global_arrays: ArrayRecord, delta: ArrayRecord) -> ArrayRecord:
    from fedscan.common.array_records import from_state  # imports torch

    base = dict(zip(global_arrays.keys(), global_arrays.to_numpy_ndarrays(), strict=True))
    return from_state(decode_aggregate(base, delta.to_numpy_ndarrays()))


def _summary(metrics: list[dict[str, Scalar]], n: int) -> dict[str, MetricRecordValues]:
    """The survivors' plaintext scalars as one record: the example-weighted mean of each metric,
    the slowest site's compute time, and the total example count."""
    weights = [float(m.get("num-examples", 0) or 0) for m in metrics]
    names = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float))} - {"num-examples"}
    out: dict[str, MetricRecordValues] = {
        k: float(
            np.average([float(m.get(k, 0.0)) for m in metrics], weights=weights if sum(weights) else None)
        )
        for k in sorted(names - {COMPUTE_SECONDS})
    }
    if COMPUTE_SECONDS in names:
        out[COMPUTE_SECONDS] = max(float(m.get(COMPUTE_SECONDS, 0.0)) for m in metrics)
    out["num-examples"] = int(n)
    return out


class SecureTrainGrid:
    """A Grid whose training round runs SecAgg+: the strategy's train messages go out through
    the protocol, and the strategy gets back one reply, the secure aggregate, as if one site had
    sent it, plus each site's evaluation that rode on the protocol's stage that trains (as a
    training reply carrying only ``EVALUATION``, the shape ``split_replies`` takes apart).
    Evaluation-only messages and everything else pass through unchanged. Per round, ``aggregates``
    counts the aggregated records handed to the strategy and ``sites_aggregated`` the sites whose
    masked updates are in the aggregate (0 when the round failed)."""

    def __init__(
        self, grid: Grid, context: Context, run: Any, progress: Callable[..., None] | None = None
    ) -> None:
        self._grid = grid
        self._context = context
        self.run = run
        self._progress = progress  # where the coordinator follows the run, besides the log
        self.aggregates: dict[int, int] = {}
        self.sites_aggregated: dict[int, int] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return self._grid.send_and_receive(messages, timeout=timeout)
        # sites evaluated but not trained this round: their evaluation on its own, before the protocol
        alone = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
        evaluated = list(self._grid.send_and_receive(alone, timeout=timeout)) if alone else []
        messages = train
        first = messages[0]
        global_arrays = first.content.array_records["arrays"]  # as FedAvg.configure_train names them
        config = first.content.config_records["config"]
        server_round = int(cast(int, config["server-round"]))  # FedAvg.configure_train writes an int
        nodes = [m.metadata.dst_node_id for m in messages]
        try:
            plan = self.run.secagg_plan(len(nodes))  # for the sites this round really has
        except ValueError as exc:
            raise FedscanError(
                f"round {server_round}: {exc}", hint="change the secagg_ settings in the run config"
            ) from None
        log.info(
            "round %d: SecAgg+ over %d sites (%d needed to unmask)", server_round, len(nodes), plan.threshold
        )
        workflow = make_workflow(self.run, plan, len(nodes))
        delta, n, metrics = secure_train_round(
            self._grid,
            self._context,
            server_round,
            global_arrays,
            config,
            workflow,
            nodes,
            {m.metadata.dst_node_id: folded_config(m) for m in messages},
        )
        # each site's evaluation, as the training reply of a folded plaintext exchange carries it
        # (``fedscan.server.round_loop.split_replies`` makes it the site's evaluation reply)
        evaluations = workflow.evaluations
        for msg in messages:
            if msg.metadata.dst_node_id in evaluations:
                site, values = evaluations[msg.metadata.dst_node_id]
                part = RecordDict(
                    {
                        EVALUATION: MetricRecord(cast(dict[str, MetricRecordValues], values)),
                        "site": ConfigRecord({"name": site}),
                    }
                )
                evaluated.append(Message(content=part, reply_to=msg))
        self.sites_aggregated[server_round] = len(metrics)
        problems = []
        if delta is None:
            problems.append(
                f"round {server_round}: secure aggregation did not complete: fewer than {plan.threshold} "
                "sites took part to the end; the global model is unchanged"
            )
        elif len(metrics) < len(nodes):
            problems.append(
                f"round {server_round}: {len(nodes) - len(metrics)} of {len(nodes)} sites dropped out "
                f"during SecAgg+; the aggregate is the other {len(metrics)}'s"
            )
        clipped = [float(m.get(CLIPPED_FRACTION, 0.0)) for m in metrics]
        if any(clipped):
            problems.append(
                f"round {server_round}: the SecAgg+ clipping range (+-{self.run.secagg_clipping_range:g}) "
                f"cut up to {100 * max(clipped):.2g}% of a site's update; raise secagg_clipping_range"
            )
        for text in problems:
            log.warning("%s", text)
            if self._progress:
                self._progress("%s", text)
        if delta is None:
            # the protocol stopped before some sites reached the stage that trains: the evaluation
            # they were to send goes to them on its own, as it did before it was folded
            missed = [
                m
                for m in messages
                if EVALUATE_CONFIG in m.content.config_records and m.metadata.dst_node_id not in evaluations
            ]
            return evaluated + (self._evaluate_alone(missed, global_arrays, timeout) if missed else [])
        try:
            new_global = _decode(global_arrays, delta)
        except ValueError as exc:
            raise FedscanError(
                f"round {server_round}: the secure aggregate does not fit the model: {exc}"
            ) from None
        content = RecordDict(
            {
                "arrays": new_global,
                "metrics": MetricRecord(_summary(metrics, n)),
                "site": ConfigRecord({"name": SECURE_AGGREGATE}),
            }
        )
        self.aggregates[server_round] = self.aggregates.get(server_round, 0) + 1
        return [Message(content=content, reply_to=first), *evaluated]

    def _evaluate_alone(
        self, folded: list[Message], global_arrays: ArrayRecord, timeout: float | None
    ) -> list[Message]:
        """The evaluations that rode on ``folded`` training messages, as messages of their own."""
        messages = [
            Message(
                RecordDict({"arrays": global_arrays, "config": m.content.config_records[EVALUATE_CONFIG]}),
                dst_node_id=m.metadata.dst_node_id,
                message_type=MessageType.EVALUATE,
                group_id=m.metadata.group_id,
            )
            for m in folded
        ]
        return list(self._grid.send_and_receive(messages, timeout=timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
