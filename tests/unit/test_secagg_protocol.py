"""SecAgg+ end to end in one process: Flower's workflow (through fedscan's bridge) against five
sites running Flower's ``secaggplus_mod`` (through fedscan's client half). Every message goes
through Flower's protobuf serialization, as on the wire. Sites drop out at chosen stages; the
aggregate must equal the plaintext example-weighted mean of the sites whose masked vectors
arrived, within the quantization bound, or the round must fail cleanly below the threshold."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedscan.client.secagg import secure_train
from fedscan.common.config import RunConfig
from fedscan.common.message_keys import CLIPPED_FRACTION, COMPUTE_SECONDS
from fedscan.common.secagg_numerics import (
    decode_aggregate,
    encode_update,
    error_bound,
    quantization_range,
)
from fedscan.server.secagg import SecureTrainGrid, make_workflow, secure_train_round
from fedscan.server.strategies import SECURE_AGGREGATE

BIG = 17041098822420999236  # node IDs are uint64: one above 2^63, as real SuperLinks hand out
NODES = [11, 22, 33, 44, BIG]
COUNTS = {11: 30, 22: 75, 33: 12, 44: 140, BIG: 52}
STEPS = {11: 400, 22: 950, 33: 160, 44: 1700, BIG: 700}  # local steps: num_batches_tracked grows by these


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps every message it builds with the running task's identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _global() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _model().state_dict()


def _trained(nid: int) -> dict[str, torch.Tensor]:
    """What site ``nid`` ends its local training with: the global weights moved by up to ~0.3."""
    g = torch.Generator().manual_seed(nid % 1000)
    out = {}
    for k, v in _global().items():
        if v.is_floating_point():
            out[k] = v + 0.3 * (torch.rand(v.shape, generator=g) * 2 - 1)
        else:
            out[k] = v + STEPS[nid]
    return out


def _plaintext(survivors: list[int]) -> dict[str, np.ndarray]:
    """The example-weighted mean of the survivors' models; integer buffers stay global."""
    w = np.array([COUNTS[n] for n in survivors], dtype=np.float64)
    return {
        k: (
            sum(wi * _trained(n)[k].double().numpy() for wi, n in zip(w, survivors, strict=True)) / w.sum()
            if g.is_floating_point()
            else g.double().numpy()
        )
        for k, g in _global().items()
    }


def _within(secure: np.ndarray, plain: np.ndarray, tol: float) -> bool:
    """Within the bound, plus the rounding of both to the model's float32."""
    return bool(
        np.all(
            np.abs(secure.astype(np.float64) - plain) <= tol + np.spacing(np.abs(plain).astype(np.float32))
        )
    )


class WireGrid:
    """A Grid whose sites answer in-process through the real client half; every message is
    serialized to protobuf and back, as on the wire. A site in ``drop`` stops answering from
    the named stage on."""

    def __init__(self, drop: dict[int, str], broken: frozenset[int] = frozenset()) -> None:
        self.drop = drop
        self.broken = broken  # sites whose training ends with NaN weights
        self.dead: set[int] = set()
        self.configs: dict[int, tuple[dict, dict]] = {}  # site -> (training config, evaluation config)
        self.extra_evaluation: dict = {}  # sent beside each site's evaluation metrics
        self.state = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES
        }
        self.sent = 0

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            msg = message_from_proto(message_to_proto(msg))
            nid = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.EVALUATE:  # an evaluation on its own
                if nid not in self.dead:
                    metrics = MetricRecord({"dice": nid % 9 / 10, "num-examples": COUNTS[nid]})
                    site = ConfigRecord({"name": f"site-{nid % 100}"})
                    self.configs[nid] = ({}, dict(msg.content.config_records["config"]))
                    replies.append(Message(RecordDict({"metrics": metrics, "site": site}), reply_to=msg))
                continue
            if self.drop.get(nid) == msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]:
                self.dead.add(nid)
            if nid in self.dead:
                continue

            def train(arrays, config, ctxt, nid=nid):  # noqa: ANN001, ANN202
                self.configs[nid] = (config, self.configs.get(nid, ({}, {}))[1])
                model = _model()
                model.load_state_dict(_trained(nid))
                if nid in self.broken:
                    model[0].weight.data[0, 0] = float("nan")
                return (
                    {k: v.numpy() for k, v in model.state_dict().items()},  # the trained state, as numpy
                    {"num-examples": COUNTS[nid], "train_loss": nid % 7 / 10, COMPUTE_SECONDS: nid % 5},
                    "x",
                )

            def evaluate(arrays, config, ctxt, nid=nid):  # noqa: ANN001, ANN202
                assert all(np.array_equal(arrays[k].numpy(), v.numpy()) for k, v in _global().items())
                self.configs[nid] = ({}, config)
                return {
                    "dice": nid % 9 / 10,
                    "num-examples": COUNTS[nid],
                    **self.extra_evaluation,
                }, f"site-{nid % 100}"

            try:
                reply = secure_train(msg, self.state[nid], train, lambda: list(_global()), evaluate=evaluate)
            except Exception:  # noqa: BLE001  a ClientApp that raises sends Flower an error reply
                self.dead.add(nid)
                continue
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def _run(drop: dict[int, str], threshold: int = 3):
    run = RunConfig(secagg=True)
    plan = run.secagg_plan(len(NODES))._replace(threshold=threshold)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return (
        secure_train_round(
            WireGrid(drop),
            ctx,
            1,
            ArrayRecord(_global()),
            ConfigRecord({"lr": 0.1}),
            make_workflow(run, plan, len(NODES)),
            NODES,
        ),
        run,
        plan,
    )


def _check_equals_plaintext(delta: ArrayRecord, run: RunConfig, q_range: int, survivors: list[int]) -> None:
    g = {k: v.numpy() for k, v in _global().items()}
    secure = decode_aggregate(g, delta.to_numpy_ndarrays())
    plain = _plaintext(survivors)
    tol = error_bound(
        run.secagg_clipping_range, q_range, run.secagg_max_weight, [COUNTS[n] for n in survivors]
    )
    assert tol < 1e-4  # the bound itself is tight at these settings
    for k, v in secure.items():
        if np.issubdtype(v.dtype, np.integer):  # num_batches_tracked: a step count, kept global
            assert int(v) == plain[k], (k, int(v), plain[k])
        else:
            assert _within(v, plain[k], tol), k


@pytest.mark.parametrize(
    ("drop", "survivors"),
    [
        ({}, NODES),
        ({BIG: Stage.COLLECT_MASKED_VECTORS}, [11, 22, 33, 44]),  # left after sharing its keys
        ({22: Stage.COLLECT_MASKED_VECTORS, BIG: Stage.COLLECT_MASKED_VECTORS}, [11, 33, 44]),
        ({BIG: Stage.SHARE_KEYS}, [11, 22, 33, 44]),  # left before its key shares went out
        ({44: Stage.SHARE_KEYS, BIG: Stage.COLLECT_MASKED_VECTORS}, [11, 22, 33]),
        ({BIG: Stage.SETUP}, [11, 22, 33, 44]),
        ({BIG: Stage.UNMASK}, NODES),  # its masked vector arrived: it is in the sum
    ],
    ids=[
        "none",
        "after-key-sharing",
        "two-after-key-sharing",
        "during-key-sharing",
        "one-during-one-after",
        "at-setup",
        "at-unmasking",
    ],
)
def test_the_aggregate_is_the_survivors_plaintext_mean(drop: dict[int, str], survivors: list[int]) -> None:
    (delta, n, metrics), run, plan = _run(drop)
    assert delta is not None
    assert n == sum(COUNTS[s] for s in survivors)
    assert len(metrics) == len(survivors)  # the scalars sent beside each masked vector that arrived
    assert all(m[CLIPPED_FRACTION] == 0.0 for m in metrics)
    _check_equals_plaintext(delta, run, plan.quantization_range, survivors)


def test_a_nan_update_stays_at_its_site_and_the_round_completes_without_it() -> None:
    run = RunConfig(secagg=True)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    delta, n, metrics = secure_train_round(
        WireGrid({}, broken=frozenset({33})),
        ctx,
        1,
        ArrayRecord(_global()),
        ConfigRecord({}),
        make_workflow(run, run.secagg_plan(5), 5),
        NODES,
    )
    survivors = [11, 22, 44, BIG]
    assert delta is not None and n == sum(COUNTS[s] for s in survivors) and len(metrics) == 4
    _check_equals_plaintext(delta, run, run.secagg_plan(5).quantization_range, survivors)


def test_below_the_threshold_the_round_fails_cleanly() -> None:
    # three of five gone after sharing keys: two remain, three shares are needed
    (delta, n, metrics), _, _ = _run({k: Stage.COLLECT_MASKED_VECTORS for k in (22, 44, BIG)})
    assert (delta, n, metrics) == (None, 0, [])
    # through the Grid the strategy sees: no reply at all, so the global model stays as it was
    said: list[str] = []
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    grid = SecureTrainGrid(
        WireGrid({k: Stage.COLLECT_MASKED_VECTORS for k in (22, 44, BIG)}),
        ctx,
        RunConfig(secagg=True),
        progress=lambda msg, *args: said.append(msg % args),
    )
    content = RecordDict({"arrays": ArrayRecord(_global()), "config": ConfigRecord({"server-round": 3})})
    msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in NODES]
    assert (
        list(grid.send_and_receive(msgs)) == [] and grid.sites_aggregated == {3: 0} and grid.aggregates == {}
    )
    assert said == [
        "round 3: secure aggregation did not complete: fewer than 3 sites took part to the end; "
        "the global model is unchanged"
    ]


def test_stock_flower_loses_the_round_when_a_site_leaves_during_key_sharing(monkeypatch) -> None:  # noqa: ANN001
    """Why the bridge corrects Flower's bookkeeping: without it this round is lost although four
    of five sites finished, because every survivor fails at unmasking."""
    import fedscan.server.secagg as bridge

    monkeypatch.setattr(bridge.DropoutSafeSecAggPlus, "share_keys_stage", SecAggPlusWorkflow.share_keys_stage)
    failures: list[BaseException] = []
    original = secure_train

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        try:
            return original(*args, **kwargs)
        except KeyError as exc:
            failures.append(exc)
            raise

    monkeypatch.setattr(sys.modules[__name__], "secure_train", recording)  # what WireGrid calls
    (delta, n, metrics), _, _ = _run({BIG: Stage.SHARE_KEYS})
    assert (delta, n, metrics) == (None, 0, [])  # the round is lost
    # each survivor, asked at unmasking for its share of the key of the site that left, has none
    assert len(failures) == 4 and all(str(BIG) in str(e) for e in failures)


def test_the_strategy_gets_one_reply_the_secure_aggregate() -> None:
    run = RunConfig(secagg=True)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    said: list[str] = []
    grid = SecureTrainGrid(
        WireGrid({BIG: Stage.COLLECT_MASKED_VECTORS}),
        ctx,
        run,
        progress=lambda msg, *args: said.append(msg % args),
    )
    content = RecordDict({"arrays": ArrayRecord(_global()), "config": ConfigRecord({"server-round": 1})})
    msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in NODES]
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 1 and grid.aggregates == {1: 1} and grid.sites_aggregated == {1: 4}
    assert said == ["round 1: 1 of 5 sites dropped out during SecAgg+; the aggregate is the other 4's"]
    reply = replies[0]
    assert reply.content["site"]["name"] == SECURE_AGGREGATE
    metrics = reply.content["metrics"]
    survivors = [11, 22, 33, 44]
    assert metrics["num-examples"] == sum(COUNTS[s] for s in survivors)
    assert metrics[COMPUTE_SECONDS] == max(s % 5 for s in survivors)  # the slowest site
    expected_loss = np.average([s % 7 / 10 for s in survivors], weights=[COUNTS[s] for s in survivors])
    assert metrics["train_loss"] == pytest.approx(expected_loss)
    # the reply carries the new global weights: the old ones plus the aggregated delta
    arrays = reply.content["arrays"].to_torch_state_dict()
    plain = _plaintext(survivors)
    tol = error_bound(
        run.secagg_clipping_range,
        run.secagg_plan(5).quantization_range,
        run.secagg_max_weight,
        [COUNTS[s] for s in survivors],
    )
    for k, v in arrays.items():
        if v.is_floating_point():
            assert _within(v.double().numpy(), plain[k], tol), k
        else:
            assert int(v) == plain[k]


def test_quantization_range_keeps_the_sum_below_the_modulus() -> None:
    for n in (1, 2, 3, 4, 5, 10, 17, 100, 1000):
        q = quantization_range(n)
        assert q & (q - 1) == 0  # a power of two
        assert n * q < 2**32 <= n * 2 * q  # the largest such
    assert quantization_range(3) == 2**30 and quantization_range(10) == 2**28
    with pytest.raises(ValueError, match="at most 268435456"):  # at config time, for the run's sites
        RunConfig(secagg_quantization_range=2**30).secagg_plan(10, strict=True)
    with pytest.raises(ValueError, match="at most 268435456"):
        RunConfig(secagg=True, sites=10, secagg_quantization_range=2**30)
    # a round with more sites than the config expected: lowered to what they allow
    assert RunConfig(secagg_quantization_range=2**30).secagg_plan(10).quantization_range == 2**28
    assert RunConfig(secagg_quantization_range=2**20).secagg_plan(10).quantization_range == 2**20


def test_encoding_flattens_keeps_counters_global_and_counts_clipping() -> None:
    g = [np.zeros((2, 3), np.float32), np.array(5, np.int64)]
    local = [np.array([[0.5, -9.0, 1.0], [20.0, 0.0, 0.0]], np.float32), np.array(2053, np.int64)]
    enc, clipped = encode_update(g, local, clip=8.0, weight_ratio=1.0)
    assert [e.shape for e in enc] == [(6,), (1,)] and all(e.dtype == np.float64 for e in enc)
    assert enc[1][0] == 0.0  # a step counter's change is not sent
    assert clipped == pytest.approx(2 / 7)  # -9 and 20 exceed +-8
    # Flower scales by the weight ratio before clipping: a small site's large delta may still fit
    assert encode_update(g, local, clip=8.0, weight_ratio=0.5)[1] == pytest.approx(1 / 7)  # 20·0.5 only
    back = decode_aggregate({"w": g[0], "n": g[1]}, enc)
    assert (
        np.array_equal(back["w"], local[0])
        and back["n"] == 5
        and back["n"].dtype == np.int64
        and back["n"].shape == ()
    )
    with pytest.raises(ValueError, match="shape"):
        encode_update(g, [np.zeros(6, np.float32), local[1]], clip=8.0, weight_ratio=1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):  # never into the masked sum
        encode_update(g, [np.full((2, 3), np.nan, np.float32), local[1]], clip=8.0, weight_ratio=1.0)


def test_secagg_plan_makes_flower_accept_its_parameters() -> None:
    """Every plan the config accepts builds a workflow Flower takes: shares odd and at least 3
    below all, threshold a majority and below the shares; one site is refused with the fix."""
    for n in (2, 3, 4, 5, 6, 10):
        for shares in (None, 2, 3, 4, 5, 6, 9, 10):
            plan = RunConfig(secagg_shares=shares).secagg_plan(n)
            if plan.shares < n:
                assert plan.shares % 2 == 1 and plan.shares >= 3 and plan.threshold < plan.shares
            assert 2 * plan.threshold > plan.shares
            make_workflow(RunConfig(), plan, n)  # Flower's own checks pass
    assert RunConfig(secagg_shares=4).secagg_plan(10).shares == 5
    with pytest.raises(ValueError, match="more than half"):
        RunConfig(secagg_threshold=2).secagg_plan(5)
    with pytest.raises(ValueError, match="below secagg_shares"):
        RunConfig(secagg_shares=3, secagg_threshold=3).secagg_plan(10)
    with pytest.raises(ValueError, match="at least 2 sites.*--no-secagg"):
        RunConfig().secagg_plan(1)
    with pytest.raises(ValueError, match="at least 2 sites"):
        RunConfig(secagg=True, sites=1)


@pytest.mark.parametrize(
    ("name", "amplification"),
    [("FedAvg", 1.0), ("FedAvgM", 1.0), ("FedProx", 1.0), ("FedAdam", 10.0), ("FedYogi", 10.0)],
)
def test_message_api_strategies_run_unchanged_on_the_secure_aggregate(
    name: str, amplification: float
) -> None:
    """One code path: Flower's Message-API strategies configure the round and aggregate what the
    SecAgg+ Grid returns, as they would the sites' own replies. Their new global model matches
    the same strategy fed the plaintext replies, within the quantization bound (times what a
    server optimizer can amplify it: η·(1−β1)/τ = 10 for FedAdam and FedYogi's defaults)."""
    import flwr.serverapp.strategy as strategies
    from flwr.app import MetricRecord

    run = RunConfig(secagg=True)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    wire = WireGrid({})
    wire.get_node_ids = lambda: list(NODES)  # type: ignore[attr-defined]
    grid = SecureTrainGrid(wire, ctx, run)
    start = ArrayRecord(_global())
    secure = getattr(strategies, name)()
    msgs = list(secure.configure_train(1, start, ConfigRecord({}), grid))
    assert len(msgs) == len(NODES)
    secure_arrays, _ = secure.aggregate_train(1, grid.send_and_receive(msgs))

    plain = getattr(strategies, name)()
    msgs = list(plain.configure_train(1, start, ConfigRecord({}), grid))
    replies = []
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"p{i}"
        n = m.metadata.dst_node_id
        sent = {
            k: v if v.is_floating_point() else _global()[k] for k, v in _trained(n).items()
        }  # as the ClientApp
        replies.append(
            Message(
                RecordDict(
                    {"arrays": ArrayRecord(sent), "metrics": MetricRecord({"num-examples": COUNTS[n]})}
                ),
                reply_to=m,
            )
        )
    plain_arrays, _ = plain.aggregate_train(1, replies)

    tol = amplification * error_bound(
        run.secagg_clipping_range,
        run.secagg_plan(5).quantization_range,
        run.secagg_max_weight,
        list(COUNTS.values()),
    )
    a, b = secure_arrays.to_torch_state_dict(), plain_arrays.to_torch_state_dict()
    moved = 0.0
    for k, g in _global().items():
        assert a[k].shape == g.shape, k  # 0-d buffers stay 0-d
        if g.is_floating_point():
            assert _within(a[k].numpy(), b[k].double().numpy(), tol), k
        else:  # step counters stay global either way (Flower averages them as floats)
            assert float(a[k]) == float(b[k]) == float(g), k
        moved = max(moved, (a[k].double() - _global()[k].double()).abs().max().item())
    assert moved > 0.005  # the strategy really stepped


def test_what_a_site_sends_under_secagg_is_what_the_readme_lists() -> None:
    """Per stage, every record and key of a site's reply: keys, encrypted shares, the masked
    vector with the scalar metrics and the count (the weights' ArrayRecord goes out empty), key
    shares. Nothing else."""
    replies: list[Message] = []

    class Recording(WireGrid):
        def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
            out = super().send_and_receive(messages, timeout=timeout)
            replies.extend(out)
            return out

    run = RunConfig(secagg=True)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    secure_train_round(
        Recording({}),
        ctx,
        1,
        ArrayRecord(_global()),
        ConfigRecord({}),
        make_workflow(run, run.secagg_plan(5), 5),
        NODES,
    )
    expected = [
        {"secaggplus_configs": ["pk1", "pk2"]},
        {"secaggplus_configs": ["ctxts", "dsts"]},
        {
            "fitres.metrics": ["compute_seconds", "secagg_clipped", "train_loss"],
            "fitres.num_examples": ["num_examples"],
            "fitres.parameters": [],
            "fitres.status": ["code", "message"],
            "secaggplus_configs": ["masked_params"],
        },
        {"secaggplus_configs": ["nids", "shares"]},
    ]
    assert len(replies) == 4 * len(NODES)
    for stage, want in enumerate(expected):
        for reply in replies[stage * len(NODES) : (stage + 1) * len(NODES)]:
            assert {k: sorted(v.keys()) for k, v in reply.content.items()} == want, stage


def _folded(server_round: int) -> tuple[list[Message], list[Message]]:
    """Round ``server_round``'s training messages and the previous round's evaluation messages."""
    arrays = ArrayRecord(_global())
    train = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round, "lr": 0.1})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in NODES
    ]
    evaluate = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round - 1})}),
            dst_node_id=n,
            message_type=MessageType.EVALUATE,
        )
        for n in NODES
    ]
    return train, evaluate


def test_a_round_that_stops_before_training_still_evaluates_the_live_sites() -> None:
    """Three of five sites gone at setup: the protocol stops before the stage that trains, so the
    evaluation that was to ride on it goes to every site on its own; the two live ones answer."""
    from fedscan.server.round_loop import fold_evaluation, split_replies

    wire = WireGrid({k: Stage.SETUP for k in (33, 44, BIG)})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    grid = SecureTrainGrid(wire, ctx, RunConfig(secagg=True))
    train, evaluate = _folded(3)
    trained, evaluated = split_replies(
        grid.send_and_receive(fold_evaluation(train, evaluate)), train, evaluate
    )
    assert trained == [] and grid.sites_aggregated == {3: 0}
    assert {m.metadata.src_node_id: m.content["site"]["name"] for m in evaluated} == {
        11: "site-11",
        22: "site-22",
    }
    assert wire.configs[11] == ({}, {"server-round": 2})


def test_the_evaluation_rides_on_the_stage_that_trains() -> None:
    """Round 2's training messages carry round 1's evaluation (as ``fold_evaluation`` folds it):
    each site evaluates the global model before it trains, its metrics come back beside its
    masked vector, and ``split_replies`` gives the strategy one aggregate and each site's own
    evaluation reply; a site that drops out before its masked vector sends no evaluation."""
    from fedscan.server.round_loop import fold_evaluation, split_replies

    wire = WireGrid({BIG: Stage.COLLECT_MASKED_VECTORS})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    grid = SecureTrainGrid(wire, ctx, RunConfig(secagg=True))
    arrays = ArrayRecord(_global())
    train = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, "lr": 0.1})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in NODES
    ]
    evaluate = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "tta": "off"})}),
            dst_node_id=n,
            message_type=MessageType.EVALUATE,
        )
        for n in NODES
    ]
    replies = grid.send_and_receive(fold_evaluation(train, evaluate))
    trained, evaluated = split_replies(replies, train, evaluate)
    survivors = [11, 22, 33, 44]
    assert wire.sent == 4 * 5 - 1  # the protocol's four stages, no evaluation exchange (BIG left at stage 3)
    assert len(trained) == 1 and trained[0].content["site"]["name"] == SECURE_AGGREGATE
    assert "evaluation.dice" not in trained[0].content["metrics"]  # the training summary holds no evaluation
    got = {
        m.metadata.src_node_id: (
            m.metadata.message_type,
            m.content["site"]["name"],
            dict(m.content["metrics"]),
        )
        for m in evaluated
    }
    assert got == {
        n: (MessageType.EVALUATE, f"site-{n % 100}", {"dice": n % 9 / 10, "num-examples": COUNTS[n]})
        for n in survivors
    }
    assert all(isinstance(got[n][2]["num-examples"], int) for n in survivors)  # counts stay integers
    for n in survivors:  # each site got its evaluation config apart from its training config
        assert wire.configs[n] == ({"server-round": 2, "lr": 0.1}, {"server-round": 1, "tta": "off"}), n


def test_an_evaluation_value_that_is_not_a_number_is_left_out() -> None:
    """A site (a hostile one) sends text among its evaluation metrics: the server keeps its numbers
    and the round goes on, instead of failing on a MetricRecord that cannot hold text."""
    from fedscan.server.round_loop import fold_evaluation, split_replies

    wire = WireGrid({})
    wire.extra_evaluation = {"note": "/data/patient-0042", "flag": True}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    grid = SecureTrainGrid(wire, ctx, RunConfig(secagg=True))
    train, evaluate = _folded(2)
    trained, evaluated = split_replies(
        grid.send_and_receive(fold_evaluation(train, evaluate)), train, evaluate
    )
    assert len(trained) == 1 and len(evaluated) == len(NODES)
    assert all(set(m.content["metrics"]) == {"dice", "num-examples"} for m in evaluated)
