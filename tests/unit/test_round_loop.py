"""The folded round loop: one exchange a plaintext round, and the strategy none the wiser.

A fake grid plays three sites that train (add their site number to every weight) and evaluate
(report the mean weight they received). The same strategy run through Flower's order (two
exchanges a round) and folded (round r's evaluation on round r+1's training messages, one
evaluation-only exchange at the end) must end with the same model, the same per-site history
and the same checkpoints, in rounds + 1 exchanges instead of 2 x rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedscan.common.config import RunConfig
from fedscan.common.message_keys import EVALUATE_CONFIG, EVALUATION, TRAINING_FAILED
from fedscan.server.round_loop import run_rounds, split_replies
from fedscan.server.strategies import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = [11, 12, 13]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray | torch.Tensor):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def _mean(arrays: ArrayRecord) -> float:
    return float(np.mean([a.numpy().mean() for a in arrays.values()]))


class Sites:
    """A grid whose nodes train and evaluate at once; it counts exchanges and what they held."""

    def __init__(self, fail_training: dict[int, int] | None = None) -> None:
        self.exchanges: list[list[str]] = []
        self.fail_training = fail_training or {}  # node -> the round its training fails

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.exchanges.append(sorted(m.metadata.message_type for m in messages))
        return [self._answer(m) for m in messages]

    def _site(self, msg: Message) -> dict[str, Any]:
        node = msg.metadata.dst_node_id
        return {"site": ConfigRecord({"name": f"site-{node}"}), "node": node}

    def _evaluation(self, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord({"num-examples": 10, "score": _mean(arrays), "compute_seconds": 0.5})

    def _answer(self, msg: Message) -> Message:
        site = self._site(msg)
        arrays = msg.content.array_records["arrays"]
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(
                RecordDict({"metrics": self._evaluation(arrays), "site": site["site"]}), reply_to=msg
            )
        content: dict[str, Any] = {"site": site["site"]}
        if EVALUATE_CONFIG in msg.content.config_records:
            content[EVALUATION] = self._evaluation(arrays)
        server_round = int(msg.content.config_records["config"]["server-round"])
        if self.fail_training.get(site["node"]) == server_round:
            if EVALUATION not in content:
                return Message(Error(0, "site training failed: internal error"), reply_to=msg)
            content[TRAINING_FAILED] = ConfigRecord({"reason": "site training failed: internal error"})
            return Message(RecordDict(content), reply_to=msg)
        trained = {k: torch.from_numpy(v.numpy() + site["node"] % 10) for k, v in arrays.items()}
        content["arrays"] = ArrayRecord(trained)
        content["metrics"] = MetricRecord({"num-examples": 10 * (site["node"] % 10), "compute_seconds": 1.0})
        return Message(RecordDict(content), reply_to=msg)


def _run(fold: bool, rounds: int = 3, **sites: Any) -> tuple[Any, Sites, list[tuple[int, float, Any]]]:
    strategy = build_strategy(RunConfig(strategy="fedadam"), len(NODES))
    grid = Sites(**sites)
    seen: list[tuple[int, float, Any]] = []
    initial = ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    final = run_rounds(
        strategy,
        grid,
        initial,
        num_rounds=rounds,
        train_config=ConfigRecord({"local-epochs": 1}),
        evaluate_config=ConfigRecord(),
        timeout=10.0,
        on_round=lambda r, arrays, state: seen.append((r, _mean(arrays), state)),
        fold=fold,
    )
    return (strategy, final), grid, seen


def test_a_folded_run_sends_one_exchange_a_round_and_ends_where_flowers_order_does() -> None:
    (plain, plain_final), plain_grid, plain_rounds = _run(fold=False)
    (folded, folded_final), folded_grid, folded_rounds = _run(fold=True)
    assert len(plain_grid.exchanges) == 6 and len(folded_grid.exchanges) == 4
    assert folded_grid.exchanges[0] == ["train"] * 3
    assert folded_grid.exchanges[1] == ["train"] * 3  # carrying round 1's evaluation
    assert folded_grid.exchanges[-1] == ["evaluate"] * 3
    for key in folded_final:
        np.testing.assert_array_equal(folded_final[key].numpy(), plain_final[key].numpy())
    assert folded.site_history == plain.site_history
    assert sorted(folded.site_history) == [1, 2, 3] and set(folded.site_history[1]) == {
        "site-11",
        "site-12",
        "site-13",
    }
    # each site evaluated the model of that round: the mean of what the round's aggregate holds
    for (r, mean, _), (_, plain_mean, _) in zip(folded_rounds, plain_rounds, strict=True):
        assert mean == plain_mean
        if r:
            assert folded.site_history[r]["site-11"]["score"] == pytest.approx(mean, rel=1e-6)
    # the checkpoint state of round r is FedAdam's state right after round r's aggregation
    assert [r for r, _, _ in folded_rounds] == [0, 1, 2, 3]
    for (r, _, state), (_, _, plain_state) in zip(folded_rounds, plain_rounds, strict=True):
        assert _same(state, plain_state), r
    assert folded_rounds[-1][2] and not _same(folded_rounds[-1][2], folded_rounds[1][2])  # it moves
    assert folded.compute_seconds[2]["evaluate"] == plain.compute_seconds[2]["evaluate"]


def test_a_site_whose_training_fails_after_it_evaluated_misses_only_that_round() -> None:
    (strategy, _), _, _ = _run(fold=True, fail_training={13: 2})
    assert set(strategy.site_history[1]) == {"site-11", "site-12", "site-13"}  # evaluated in exchange 2
    assert strategy.trained[2] == ["site-11", "site-12"]
    assert strategy.trained[3] == ["site-11", "site-12", "site-13"]
    assert set(strategy.site_history[2]) == {"site-11", "site-12", "site-13"}


def test_split_replies_rebuilds_what_the_strategy_expects() -> None:
    strategy = build_strategy(RunConfig(), len(NODES))
    grid = Sites()
    arrays = ArrayRecord({"w": torch.ones(2)})
    train = sorted(
        strategy.configure_train(2, arrays, ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id
    )
    evaluate = [  # node 13 is not evaluated this time
        m
        for m in strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)
        if m.metadata.dst_node_id != 13
    ]
    for m in train[:2]:
        m.content = RecordDict(
            {**dict(m.content.items()), EVALUATE_CONFIG: ConfigRecord({"server-round": 1})}
        )
    replies = [grid._answer(m) for m in train]
    replies[1] = Message(Error(0, "lost"), reply_to=train[1])  # node 12's reply
    trained, evaluated = split_replies(replies, train, evaluate)
    assert [m.metadata.src_node_id for m in trained] == NODES
    assert trained[1].has_error() and not trained[0].has_error()
    assert EVALUATION not in trained[0].content.metric_records
    assert set(trained[0].content.keys()) == {"arrays", "metrics", "site"}
    assert [m.metadata.src_node_id for m in evaluated] == [11]  # node 12's reply was lost
    assert evaluated[0].metadata.message_type == MessageType.EVALUATE
    assert set(evaluated[0].content.keys()) == {"metrics", "site"}
    assert evaluated[0].content["metrics"]["score"] == pytest.approx(1.0)


def _folded_train_message() -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.ones(2)}),
            "config": ConfigRecord({"server-round": 2}),
            EVALUATE_CONFIG: ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content, dst_node_id=11, message_type=MessageType.TRAIN)


def _site_context(tmp_path: Any) -> Any:
    from flwr.app import Context

    from fedscan.common.config import AppConfig

    cfg = AppConfig(run=RunConfig(rounds=2, output=tmp_path), site_names=["site-11"])
    return Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())


def test_a_site_answers_a_folded_message_whatever_half_of_it_fails(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ClientApp of a folded training message: evaluation first, then training. A failed
    training keeps the evaluation and says only its category; a failed evaluation does not stop
    the training."""
    from fedscan.client import app as client_app
    from fedscan.client import site_runner

    metrics = {"num-examples": 10.0, "score": 0.5, "compute_seconds": 0.1}
    update = ArrayRecord({"w": torch.full((2,), 2.0)})
    secret = "/data/hospital/patient-0042.dcm could not be read"

    def broken(*args: Any) -> Any:
        raise RuntimeError(secret)

    monkeypatch.setattr(site_runner, "evaluate", lambda *a: (dict(metrics), "site-11"))
    monkeypatch.setattr(site_runner, "plain_train", broken)
    reply = client_app.train(_folded_train_message(), _site_context(tmp_path))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {EVALUATION, "site", TRAINING_FAILED}
    assert reply.content[EVALUATION]["score"] == 0.5
    reason = str(reply.content.config_records[TRAINING_FAILED]["reason"])
    assert reason == "site training failed: internal error (see the site log)" and secret not in reason

    monkeypatch.setattr(site_runner, "evaluate", broken)
    monkeypatch.setattr(site_runner, "plain_train", lambda *a: (update, {"num-examples": 10.0}, "site-11"))
    reply = client_app.train(_folded_train_message(), _site_context(tmp_path))
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), [2.0, 2.0])
