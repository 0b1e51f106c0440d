"""Secure aggregation: one training round through Flower's SecAgg+ (server half).

Flower ships SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` runs on a ``LegacyContext``
and talks to a legacy ``Strategy``. This module is the thin bridge. ``secure_train_round``
runs the protocol for one round over every connected site, and a small legacy strategy hands
the single aggregate it yields back as an ArrayRecord. The Message-API strategy then gets
exactly one aggregated reply per round; it never sees a site's own update.

Sites send their update as a delta (local weights minus the global weights), so the values
fit the clipping range; the aggregate is the example-weighted mean of the deltas, which the
round adds to the global weights. Flower's implementation of the protocol is used as is
(Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, MessageType, Parameters, Scalar
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

log = logging.getLogger("fedscan.server")


class _OneAggregate(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: it sends every connected site the round's
    instructions and keeps the one aggregate the protocol reconstructs."""

    def __init__(self, config: dict[str, Scalar]) -> None:
        self.config = config
        self.aggregate: Parameters | None = None
        self.num_examples = 0
        self.metrics: list[dict[str, Scalar]] = []
        self.sites = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]):
        # SecAggPlusWorkflow puts the same unmasked aggregate into every surviving result
        if results:
            self.aggregate = results[0][1].parameters
            self.num_examples = sum(r.num_examples for _, r in results)
            self.metrics = [{**dict(r.metrics), "num-examples": r.num_examples} for _, r in results]
            self.sites = len(results)
        return self.aggregate, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


def secure_train_round(
    grid: Grid,
    context: Context,
    server_round: int,
    deltas_of: ArrayRecord,
    train_config: ConfigRecord,
    workflow: SecAggPlusWorkflow,
    node_ids: list[int],
) -> tuple[ArrayRecord | None, int, list[dict[str, Scalar]]]:
    """Run SecAgg+ for one round over all connected sites.

    ``deltas_of``: the global weights the sites train from. Returns the example-weighted mean of
    the sites' deltas (None when the protocol could not finish, e.g. too few sites left), the
    total example count, and each survivor's plaintext scalar metrics."""
    strategy = _OneAggregate({**dict(train_config), "server-round": server_round})
    manager = SimpleClientManager()
    run_id = context.run_id
    for node_id in node_ids:
        manager.register(GridClientProxy(node_id, grid, run_id))
    legacy = LegacyContext(context, ServerConfig(num_rounds=server_round), strategy, manager)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = deltas_of
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    workflow(grid, legacy)
    if strategy.aggregate is None:
        return None, 0, []
    return parameters_to_arrayrecord(strategy.aggregate, keep_input=True), strategy.num_examples, strategy.metrics


def apply_delta(global_arrays: ArrayRecord, delta: ArrayRecord) -> ArrayRecord:
    """global + delta, array by array, back in each array's own dtype (integer buffers rounded)."""
    import torch

    base = global_arrays.to_numpy_ndarrays()
    diff = delta.to_numpy_ndarrays()
    if len(base) != len(diff):
        raise ValueError(f"the aggregate has {len(diff)} arrays, the model {len(base)}")
    out = {}
    for key, g, d in zip(global_arrays.keys(), base, diff, strict=True):
        value = g.astype(np.float64) + d.astype(np.float64).reshape(g.shape)
        value = np.rint(value).astype(g.dtype) if g.dtype.kind in "iu" else value.astype(g.dtype)
        out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return ArrayRecord(out)


SECURE_AGGREGATE = "secure-aggregate"


def make_workflow(run: Any, shares: int, threshold: int, n_sites: int) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the run's parameters. Sharing with everyone is passed as the
    fraction 1.0: Flower takes integer share counts only above 2."""
    return SecAggPlusWorkflow(
        num_shares=1.0 if shares >= n_sites else shares, reconstruction_threshold=threshold, max_weight=run.secagg_max_weight,
        clipping_range=run.secagg_clipping_range, quantization_range=run.secagg_quantization_range,
        timeout=run.secagg_timeout,
    )


class SecureTrainGrid:
    """A Grid whose training round runs SecAgg+: the strategy's train messages go out through
    the protocol, and the strategy gets back one reply, the secure aggregate, as if one site had
    sent it. Evaluation and everything else pass through unchanged. ``aggregates`` counts the
    aggregated records handed to the strategy, per round."""

    def __init__(self, grid: Grid, context: Context, run: Any) -> None:
        self._grid = grid
        self._context = context
        self.run = run
        self.aggregates: dict[int, int] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(messages, timeout=timeout)
        first = messages[0]
        global_arrays = first.content["arrays"]
        config = first.content["config"]
        server_round = int(config["server-round"])
        nodes = [m.metadata.dst_node_id for m in messages]
        shares, threshold = self.run.secagg_plan(len(nodes))  # for the sites this round really has
        log.info("round %d: SecAgg+ over %d sites, %d shares each, %d needed to unmask", server_round,
                 len(nodes), shares, threshold)
        delta, n, metrics = secure_train_round(self._grid, self._context, server_round, global_arrays, config,
                                               make_workflow(self.run, shares, threshold, len(nodes)), nodes)
        if delta is None:
            log.warning("round %d: secure aggregation did not complete (too few sites took part to the end); "
                        "the global model is unchanged", server_round)
            return []
        weights = [float(m.get("num-examples", 0) or 0) for m in metrics]
        names = sorted({k for m in metrics for k, v in m.items() if isinstance(v, (int, float))} - {"num-examples"})
        mean = {k: float(np.average([float(m.get(k, 0.0)) for m in metrics], weights=weights or None))
                for k in names} if metrics else {}
        content = RecordDict({
            "arrays": apply_delta(global_arrays, delta),
            "metrics": MetricRecord({**mean, "num-examples": int(n)}),
            "site": ConfigRecord({"name": SECURE_AGGREGATE}),
        })
        self.aggregates[server_round] = self.aggregates.get(server_round, 0) + 1
        return [Message(content=content, reply_to=first)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
