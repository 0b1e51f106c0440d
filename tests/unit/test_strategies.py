"""The strategies on hand-made replies: what each aggregates to, and faulty updates (NaN,
infinite, wrong arrays or shapes) rejected with a reason before any of them aggregates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FixedNodes
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedscan.common.config import STRATEGIES, RunConfig
from fedscan.common.tasks.loops import fit
from fedscan.common.tasks.precision import choose_precision
from fedscan.common.tasks.schedule import round_lr
from fedscan.server.strategies import build_strategy

NODES = [1, 2, 3, 4, 5]
COUNTS = [10, 20, 30, 40, 50]


pytestmark = pytest.mark.usefixtures("flower_task_identity")


GLOBAL = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def _round(strategy_name: str, site_weights: list[dict[str, torch.Tensor]], **cfg: object):
    strategy = build_strategy(RunConfig(strategy=strategy_name, **cfg), len(NODES))
    msgs = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({}), FixedNodes(NODES)))
    replies = []
    for i, (m, weights, n) in enumerate(zip(msgs[: len(site_weights)], site_weights, COUNTS, strict=False)):
        m.metadata.__dict__["_message_id"] = f"m{i}"
        content = RecordDict(
            {
                "arrays": ArrayRecord(weights),
                "metrics": MetricRecord({"num-examples": n}),
                "site": ConfigRecord({"name": f"site-{i}"}),
            }
        )
        replies.append(Message(content, reply_to=m))
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, msgs, (None if arrays is None else arrays.to_torch_state_dict())


def _honest(scale: float = 1.0) -> list[dict[str, torch.Tensor]]:
    return [
        {"w": torch.full((3, 2), float(i + 1)) * scale, "b": torch.full((2,), -float(i + 1))}
        for i in range(5)
    ]


def test_every_strategy_aggregates_honest_sites() -> None:
    weights = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    mean = float(np.dot(weights, [1, 2, 3, 4, 5]))
    expect = {"fedavg": mean, "fedprox": mean, "fedbn": mean, "fedmedian": 3.0, "fedtrimmedavg": 3.0}
    for name in STRATEGIES:
        _, msgs, out = _round(name, _honest())
        assert out is not None and set(out) == {"w", "b"}, name
        if name in expect:
            assert out["w"].double().mean().item() == pytest.approx(expect[name]), name
        else:  # server optimizers step from the global model towards the mean
            assert 0 < out["w"].double().mean().item() <= mean + 1e-6, name
    # FedProx tells the sites its µ
    _, msgs, _ = _round("fedprox", _honest(), proximal_mu=0.5)
    assert all(m.content["config"]["proximal-mu"] == 0.5 for m in msgs)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)}, "NaN or infinite"),
        ({"w": torch.full((3, 2), float("inf")), "b": torch.zeros(2)}, "NaN or infinite"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, "has shape (2, 3), the model's is (3, 2)"),
        ({"w": torch.zeros(3, 2)}, "missing ['b']"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(2), "extra": torch.zeros(1)}, "unexpected ['extra']"),
    ],
)
@pytest.mark.parametrize("name", STRATEGIES)
def test_a_faulty_update_is_rejected_with_its_reason_whatever_the_strategy(
    name: str, broken: dict, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    sites = _honest()
    sites[4] = broken
    strategy, _, out = _round(name, sites)
    assert list(strategy.rejected[1]) == ["site-4"] and reason in strategy.rejected[1]["site-4"]
    assert "rejected the update of site-4" in caplog.text
    assert strategy.train_records[1] == 4
    assert out is not None and all(torch.isfinite(v).all() for v in out.values())
    # the result is what the four others give on their own
    _, _, ref = _round(name, _honest()[:4])
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_robust_strategies_shrug_off_a_site_scaled_by_100() -> None:
    honest = {
        name: _round(name, _honest())[2]["w"].double().mean().item()
        for name in ("fedmedian", "fedtrimmedavg", "fedavg")
    }
    attacked = _honest()
    attacked[4] = {k: v * 100 for k, v in attacked[4].items()}
    got = {name: _round(name, attacked)[2]["w"].double().mean().item() for name in honest}
    assert got["fedmedian"] == pytest.approx(honest["fedmedian"])
    assert got["fedtrimmedavg"] == pytest.approx(honest["fedtrimmedavg"])
    assert got["fedavg"] > 50 * honest["fedavg"] / 4  # the mean follows the scaled site


def test_robust_strategies_are_refused_under_secure_aggregation() -> None:
    for name in ("fedmedian", "fedtrimmedavg"):
        with pytest.raises(ValueError, match="needs each site's own update"):
            RunConfig(strategy=name, secagg=True)
    RunConfig(strategy="fedprox", secagg=True)  # client-side: fine


def test_the_proximal_term_keeps_local_training_near_the_global_model() -> None:
    def train(mu: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        start = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)) for _ in range(10)
        ]
        fit(
            model,
            lambda: batches,
            torch.nn.CrossEntropyLoss(),
            epochs=20,
            lr=1e-2,
            precision=choose_precision(torch.device("cpu")),
            proximal_mu=mu,
        )
        return (
            sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start, strict=True))
            ** 0.5
        )

    free, tied = train(0.0), train(10.0)
    assert tied < 0.5 * free, (free, tied)


def test_the_learning_rate_schedule_reaches_every_site_and_continues_after_a_resume() -> None:
    run = RunConfig(rounds=5, learning_rate=1e-3, lr_schedule="cosine", lr_final_fraction=0.1)
    expected = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 4))) for k in range(5)]
    assert [round_lr(run, r) for r in range(1, 6)] == pytest.approx(expected)
    assert (
        round_lr(run, 5) == pytest.approx(1e-4) and round_lr(run.model_copy(update={"rounds": 1}), 1) == 1e-3
    )
    assert round_lr(RunConfig(rounds=5), 3) == 1e-3  # constant by default

    def sent_lr(strategy_round: int, offset: int) -> list[float]:
        strategy = build_strategy(run, len(NODES))
        strategy.round_offset = offset  # a resumed run: Flower counts its rounds from 1 again
        msgs = strategy.configure_train(
            strategy_round, ArrayRecord(GLOBAL), ConfigRecord({"lr": 1.0}), FixedNodes(NODES)
        )
        return [float(m.content["config"]["lr"]) for m in msgs]

    assert sent_lr(2, 0) == pytest.approx([expected[1]] * len(NODES))
    assert sent_lr(1, 3) == pytest.approx([expected[3]] * len(NODES))  # round 4 of the run
