"""The ServerApp's round loop: a Flower strategy's own steps, with each round's evaluation folded
into the next round's training message.

Flower's ``Strategy.start`` sends two exchanges a round: the training messages, then the
evaluation of the new global model. Deployed, every exchange waits on Flower's fixed polls (an
idle SuperNode sleeps 3 s between pulls, flwr 1.42 supernode/start_client_internal.py) and on a
ClientApp process per message, so a plaintext round cost two of them. This loop calls the same
strategy methods (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) in the order ``Strategy.start`` does, except that the evaluation of round
r's model rides on round r+1's training messages (the site evaluates what it received before
training on it, ``fedscan.client.app``), and one evaluation-only exchange follows the last round.
A site the strategy evaluates but does not train gets its evaluation in the same exchange, alone.
The strategy sees exactly the replies it would have seen: the evaluation part of a training
reply is split off into an evaluation reply of its own, and a site whose training failed after
it evaluated becomes an error reply for training.

Round r is therefore finished (recorded, checkpointed, reported) once round r+1's replies are in,
with the strategy state saved right after round r's aggregation. Under SecAgg+ the folded
training messages go through the protocol's stages (``fedscan.server.secagg.SecureTrainGrid``),
the evaluation riding on the stage that trains, and come back as one aggregate plus each site's
evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedscan.common.message_keys import EVALUATE_CONFIG, EVALUATION, TRAINING_FAILED


class RoundStrategy(Protocol):
    """The steps of a Flower Message-API strategy this loop calls."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]: ...

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None: ...

    def state(self) -> dict[str, Any]: ...


def fold_evaluation(train: list[Message], evaluate: list[Message]) -> list[Message]:
    """The messages of one folded exchange: each training message carries its site's evaluation
    config (under ``EVALUATE_CONFIG``); a site only evaluated gets its evaluation message alone."""
    by_node = {m.metadata.dst_node_id: m for m in evaluate}
    out = []
    for msg in train:
        ev = by_node.pop(msg.metadata.dst_node_id, None)
        if ev is not None:
            content = RecordDict(dict(msg.content.items()))  # the strategy's RecordDict is shared
            content[EVALUATE_CONFIG] = ev.content.config_records["config"]
            msg.content = content
        out.append(msg)
    return out + list(by_node.values())


def split_replies(
    replies: Iterable[Message], train: list[Message], evaluate: list[Message]
) -> tuple[list[Message], list[Message]]:
    """The replies of a folded exchange as the strategy would have had them: (training replies,
    evaluation replies), each evaluation reply built from the part of a training reply it rode on
    (or an evaluation-only message's own reply). Replies are told apart by their node and type
    (a node gets at most one message of each kind in an exchange), not by message ID: the IDs
    are the SuperLink's, given to the packed copies the grid sent."""
    train_by_node = {m.metadata.dst_node_id: m for m in train}
    eval_by_node = {m.metadata.dst_node_id: m for m in evaluate}
    trained: list[Message] = []
    evaluated: list[Message] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        sent = train_by_node.get(node)
        if sent is None or reply.metadata.message_type == MessageType.EVALUATE:
            evaluated.append(reply)  # an evaluation-only message's reply
            continue
        ev = eval_by_node.get(node)
        if reply.has_error() or ev is None:
            trained.append(reply)  # no evaluation rode on it, or none came back
            continue
        content = reply.content
        site = {"site": content["site"]} if "site" in content.config_records else {}
        if EVALUATION in content.metric_records:
            evaluated.append(Message(RecordDict({"metrics": content[EVALUATION], **site}), reply_to=ev))
            if set(content.keys()) <= {EVALUATION, "site"}:
                continue  # the evaluation alone: under SecAgg+ the training came back as one aggregate
        if TRAINING_FAILED in content.config_records:
            reason = str(content.config_records[TRAINING_FAILED].get("reason", "site training failed"))
            trained.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=sent))
        else:
            reply.content = RecordDict({k: v for k, v in content.items() if k != EVALUATION})
            trained.append(reply)
    return trained, evaluated


def run_rounds(
    strategy: RoundStrategy,
    grid: Any,
    initial: ArrayRecord,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
    on_round: Callable[[int, ArrayRecord, dict[str, Any]], None],
    fold: bool = True,
) -> ArrayRecord:
    """Train for ``num_rounds`` rounds; return the last global model. ``on_round(r, arrays,
    state)`` gets each round once its evaluation is in, with the global model after round r and
    the strategy's state as it was right after round r's aggregation (round 0: the initial
    model). Without ``fold``, the same as Flower's ``Strategy.start``: two exchanges a round (the
    reference the folded order is tested against)."""
    on_round(0, initial, copy.deepcopy(strategy.state()))
    arrays = initial
    pending: tuple[int, ArrayRecord, dict[str, Any]] | None = None  # trained, not yet evaluated

    def evaluate_alone(server_round: int, model: ArrayRecord) -> None:
        messages = list(strategy.configure_evaluate(server_round, model, evaluate_config, grid))
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))

    for current in range(1, num_rounds + 1):
        train = list(strategy.configure_train(current, arrays, train_config, grid))
        if fold and pending is not None:
            evaluate = list(strategy.configure_evaluate(pending[0], pending[1], evaluate_config, grid))
            replies = grid.send_and_receive(fold_evaluation(train, evaluate), timeout=timeout)
            train_replies, eval_replies = split_replies(replies, train, evaluate)
            strategy.aggregate_evaluate(pending[0], eval_replies)
            on_round(*pending)
        else:
            train_replies = list(grid.send_and_receive(train, timeout=timeout))
        new_arrays, _ = strategy.aggregate_train(current, train_replies)
        arrays = new_arrays if new_arrays is not None else arrays
        pending = (current, arrays, copy.deepcopy(strategy.state()))
        if not fold:
            evaluate_alone(current, arrays)
            on_round(*pending)
            pending = None
    if pending is not None:  # the last round's model: one evaluation-only exchange
        evaluate_alone(pending[0], pending[1])
        on_round(*pending)
    return arrays
