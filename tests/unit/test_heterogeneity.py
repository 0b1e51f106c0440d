"""Heterogeneous sites without Flower's runtime: FedBN's local layers, quality weighting, fault
injection, the pooled baseline's data, the federated gain, and the heterogeneous scenario."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FixedNodes
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedscan.client.site_round import injected_fault
from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.data.layout import discover_sites
from fedscan.common.data.quality import quality_factor
from fedscan.common.data.synthetic import make_profiles
from fedscan.common.errors import FedscanError
from fedscan.common.message_keys import QUALITY_FACTOR
from fedscan.common.tasks.fedbn_layers import LocalLayers
from fedscan.common.tasks.local_training import open_site
from fedscan.common.weights import norm_keys
from fedscan.server.baselines import federated_gain, pool_sites
from fedscan.server.strategies import build_strategy, capped_shares

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1), nn.InstanceNorm2d(1, affine=True)
    )


def _reply(msg: Message, i: int, arrays: dict[str, torch.Tensor], metrics: dict[str, float]) -> Message:
    msg.metadata.__dict__["_message_id"] = f"m{i}"
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": f"site-{i}"}),
        }
    )
    return Message(content, reply_to=msg)


def test_norm_keys_are_every_normalization_layer() -> None:
    keys = norm_keys(_net())
    assert keys == {
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.weight",
        "3.bias",
    }


def test_fedbn_averages_the_shared_layers_and_keeps_the_global_norm_layers() -> None:
    net = _net()
    local = norm_keys(net)
    strategy = build_strategy(RunConfig(strategy="fedbn"), 3, local)
    start = ArrayRecord(net.state_dict())
    msgs = list(strategy.configure_train(1, start, ConfigRecord({}), FixedNodes([1, 2, 3])))
    shared = [k for k in start if k not in local]
    replies = []
    for i, msg in enumerate(msgs):
        arrays = {k: torch.full(tuple(start[k].shape), float(i + 1)) for k in shared}
        if i == 2:  # a secure aggregate carries every array (its norm layers unchanged): they are ignored
            arrays.update(
                {k: torch.full(tuple(start[k].shape), 99.0) for k in local if "num_batches" not in k}
            )
            arrays.update({k: torch.zeros((), dtype=torch.long) for k in local if "num_batches" in k})
        replies.append(_reply(msg, i, arrays, {"num-examples": 10 * (i + 1)}))
    out, _ = strategy.aggregate_train(1, replies)
    assert out is not None and list(out.keys()) == list(start.keys())  # full model, model order
    expect = (1 * 10 + 2 * 20 + 3 * 30) / 60
    for k in shared:
        assert np.allclose(out[k].numpy(), expect), k
    for k in local:  # the global model's own, not the 99s
        assert np.array_equal(out[k].numpy(), start[k].numpy()), k
    assert strategy.rejected == {}


def test_a_site_keeps_its_local_layers_per_round(tmp_path) -> None:  # noqa: ANN001
    cfg = RunConfig(strategy="fedbn")
    store = LocalLayers(tmp_path, cfg, "site-a")
    net = _net()
    assert store.apply(net, 1) is None  # nothing stored yet: the global layers stay
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
        net[3].weight.fill_(2.0)
    store.save(1, net)
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)
    store.save(2, net)
    fresh = _net()
    conv = fresh[0].weight.detach().clone()
    assert (
        store.apply(fresh, 1) == 1
        and float(fresh[1].running_mean[0]) == 3.0
        and float(fresh[3].weight[0].detach()) == 2.0
    )
    assert store.apply(fresh, 7) == 2 and float(fresh[1].running_mean[0]) == 5.0
    assert torch.equal(fresh[0].weight, conv)  # shared layers untouched
    # another run (other settings) has its own store
    assert LocalLayers(tmp_path, cfg.model_copy(update={"seed": 1}), "site-a").apply(_net(), 7) is None
    # the run's length is not part of its identity (a resumed or extended run finds its layers)
    assert LocalLayers(tmp_path, cfg.model_copy(update={"rounds": 9}), "site-a").apply(_net(), 7) == 2


def test_capped_shares() -> None:
    assert capped_shares({"a": 1.0, "b": 1.0}, 0.5) == {"a": 0.5, "b": 0.5}
    s = capped_shares({"a": 90.0, "b": 5.0, "c": 5.0}, 0.5)
    assert (
        s["a"] == pytest.approx(0.5)
        and s["b"] == pytest.approx(0.25)
        and sum(s.values()) == pytest.approx(1.0)
    )
    s = capped_shares({"a": 50.0, "b": 40.0, "c": 5.0, "d": 5.0}, 0.4)  # two sites over the cap
    assert s["a"] == pytest.approx(0.4) and s["b"] == pytest.approx(0.4) and s["c"] == pytest.approx(0.1)
    assert capped_shares({"a": 3.0}, 0.5) == {"a": 1.0}  # one site: the cap cannot hold
    s = capped_shares({"a": 1.0, "b": 2.0, "c": 3.0}, 0.9)  # below the cap: plain proportions
    assert s == pytest.approx({"a": 1 / 6, "b": 2 / 6, "c": 3 / 6})


def test_quality_factor_is_bounded() -> None:
    assert quality_factor(60.0, 30.0, 0.25) == 1.0
    assert quality_factor(15.0, 30.0, 0.25) == 0.5
    assert quality_factor(1.0, 30.0, 0.25) == 0.25
    assert quality_factor(None, 30.0, 0.25) == 1.0 and quality_factor(float("nan"), 30.0, 0.25) == 1.0


def test_quality_weighting_weights_by_count_times_quality_with_a_cap() -> None:
    strategy = build_strategy(RunConfig(strategy="fedavg", quality_weighting=True, quality_max_share=0.5), 3)
    start = ArrayRecord({"w": torch.zeros(2)})
    msgs = list(strategy.configure_train(1, start, ConfigRecord({}), FixedNodes([1, 2, 3])))
    counts, quality = [100, 100, 100], [1.0, 0.25, 1.0]
    replies = [
        _reply(m, i, {"w": torch.full((2,), float(i))}, {"num-examples": n, QUALITY_FACTOR: q})
        for i, (m, n, q) in enumerate(zip(msgs, counts, quality, strict=True))
    ]
    out, _ = strategy.aggregate_train(1, replies)
    shares = strategy.weight_shares[1]
    assert shares == pytest.approx({"site-0": 1 / 2.25, "site-1": 0.25 / 2.25, "site-2": 1 / 2.25})
    assert float(out["w"].numpy()[0]) == pytest.approx(shares["site-1"] * 1 + shares["site-2"] * 2)
    # one big site is held at the cap
    strategy = build_strategy(RunConfig(strategy="fedavg", quality_weighting=True, quality_max_share=0.5), 3)
    msgs = list(strategy.configure_train(1, start, ConfigRecord({}), FixedNodes([1, 2, 3])))
    replies = [
        _reply(m, i, {"w": torch.full((2,), float(i))}, {"num-examples": n, QUALITY_FACTOR: 1.0})
        for i, (m, n) in enumerate(zip(msgs, [1000, 10, 10], strict=True))
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.weight_shares[1]["site-0"] == pytest.approx(0.5)


def _ctx(simulated: bool) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0} if simulated else {},
        state=RecordDict(),
        run_config={},
    )


def test_fault_injection_only_in_simulation_and_only_at_the_named_site() -> None:
    glob = ArrayRecord({"w": torch.ones(3), "n": torch.zeros((), dtype=torch.long)})
    mine = ArrayRecord({"w": torch.full((3,), 1.5), "n": torch.zeros((), dtype=torch.long)})
    scale = AppConfig(run=RunConfig(fault_site="site-b", fault_kind="scale", fault_scale=100))
    got = injected_fault(mine, glob, _ctx(True), scale, "site-b").to_torch_state_dict()
    assert torch.allclose(got["w"], torch.full((3,), 1 + 100 * 0.5)) and int(got["n"]) == 0
    nan = AppConfig(run=RunConfig(fault_site="site-b", fault_kind="nan"))
    assert torch.isnan(injected_fault(mine, glob, _ctx(True), nan, "site-b").to_torch_state_dict()["w"]).all()
    for ctx, site in ((_ctx(False), "site-b"), (_ctx(True), "site-a")):  # a deployed site, another site
        assert injected_fault(mine, glob, ctx, nan, site) is mine
    with pytest.raises(ValueError, match="go together"):
        RunConfig(fault_site="site-b")


def test_pooled_site_keeps_indices_distinct_and_the_splits(synth_root) -> None:  # noqa: ANN001
    cfg = RunConfig(image_size=64)
    sites = [open_site(s, cfg, None) for s in discover_sites(synth_root)]
    pooled = pool_sites(sites)
    assert len(pooled.data) == sum(len(s.data) for s in sites)
    assert pooled.data.n_patients == sum(s.data.n_patients for s in sites)
    assert pooled.train_idx.size == sum(s.train_idx.size for s in sites)
    assert pooled.val_idx.size == sum(s.val_idx.size for s in sites)
    second = len(sites[0].data)
    j = int(sites[1].train_idx[0])
    assert np.array_equal(pooled.data.images[second + j], sites[1].data.images[j])
    assert np.array_equal(pooled.data.masks[second + j], sites[1].data.masks[j])
    # no patient in both splits
    assert not set(pooled.data.patient[pooled.train_idx]) & set(pooled.data.patient[pooled.val_idx])


def test_baselines_follow_the_federations_learning_rate_schedule(synth_root, monkeypatch) -> None:  # noqa: ANN001
    """Local-only and pooled models train round r with the rate the strategy sends in round r."""
    import fedscan.server.baselines as baselines

    seen: list[float] = []

    class Recorder:
        def train(self, model, data, idx, run, *, lr, **kw):  # noqa: ANN001, ANN003, ANN202
            seen.append(lr)
            return {"steps": 1.0}

    monkeypatch.setattr(baselines, "get_task", lambda task: Recorder())
    run = RunConfig(
        image_size=32,
        rounds=4,
        learning_rate=2e-3,
        lr_schedule="cosine",
        lr_final_fraction=0.25,
        device="cpu",
    )
    site = open_site(discover_sites(synth_root)[0], run, None)
    assert baselines.train_like_federation(nn.Linear(2, 2), site, run) == 4
    strategy = build_strategy(run, 3)
    sent = [
        float(
            next(
                iter(
                    strategy.configure_train(
                        r, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord({}), FixedNodes([1, 2, 3])
                    )
                )
            ).content["config"]["lr"]
        )
        for r in range(1, 5)
    ]
    assert seen == pytest.approx(sent) and sent[0] == pytest.approx(2e-3) and sent[-1] == pytest.approx(5e-4)


def test_pooled_exam_sites_offset_their_samples(exam_root) -> None:  # noqa: ANN001
    cfg = RunConfig(model="mil")
    sites = [open_site(s, cfg, None) for s in discover_sites(exam_root)]
    pooled = pool_sites(sites)
    assert pooled.data.n_samples == sum(s.data.n_samples for s in sites)
    first = sites[0].data.n_samples
    assert np.array_equal(pooled.data.target[first:], sites[1].data.target)
    assert len(pooled.data.slices_of()) == pooled.data.n_samples


def test_federated_gain_uses_the_personalized_model_under_fedbn() -> None:
    matrix = {
        "global": {"a": {"dice": 0.7}, "b": {"dice": 0.5}},
        "personalized:a": {"a": {"dice": 0.8}, "b": {"dice": 0.4}},
        "personalized:b": {"a": {"dice": 0.6}, "b": {"dice": 0.55}},
        "local:a": {"a": {"dice": 0.75}, "b": {"dice": 0.1}},
        "local:b": {"a": {"dice": 0.2}, "b": {"dice": 0.6}},
    }
    gain, used = federated_gain(matrix, ["a", "b"], "dice", fedbn=False)
    assert gain == pytest.approx({"a": -0.05, "b": -0.1}) and used == {"a": "global", "b": "global"}
    gain, used = federated_gain(matrix, ["a", "b"], "dice", fedbn=True)
    assert gain == pytest.approx({"a": 0.05, "b": -0.05}) and used["b"] == "personalized:b"


def test_heterogeneous_scenario() -> None:
    p = make_profiles(4, 0, scenario="heterogeneous")
    assert p[1].noise_hu >= 5 * p[0].noise_hu  # heavy noise
    assert (p[2].hu_scale, p[2].hu_offset) != (1.0, 0.0)  # another calibration
    assert p[3].n_patients < p[0].n_patients / 3  # small
    assert all(q.label_noise == 0 for q in p)
    with pytest.raises(FedscanError, match="at least 4 sites"):
        make_profiles(3, 0, scenario="heterogeneous")
    with pytest.raises(FedscanError, match="unknown scenario"):
        make_profiles(4, 0, scenario="chaos")


def test_the_site_snr_ranks_a_noisy_site_lower(tmp_path) -> None:  # noqa: ANN001
    from fedscan.common.data.synthetic import write_site

    profiles = make_profiles(4, 0, scenario="heterogeneous")
    cfg = RunConfig(image_size=64)
    snr = {}
    for i in (0, 1):
        prof = profiles[i].model_copy(update={"n_patients": 2})
        write_site(tmp_path, prof, 0, i)
        local = open_site(next(s for s in discover_sites(tmp_path) if s.name == prof.name), cfg, None)
        snr[i] = local.snr()
    assert snr[0] is not None and snr[1] is not None
    assert snr[1] < snr[0] / 3, snr
    assert quality_factor(snr[1], 30.0, 0.25) < quality_factor(snr[0], 30.0, 0.25)


def test_a_fedbn_site_never_sends_its_norm_layers_and_evaluates_its_own(synth_root, tmp_path) -> None:  # noqa: ANN001
    from fedscan.client.app import evaluate as client_evaluate
    from fedscan.client.app import train as client_train
    from fedscan.common.array_records import to_record
    from fedscan.common.models.registry import build_model

    run = RunConfig(
        strategy="fedbn",
        quality_weighting=True,
        data_root=synth_root,
        sites=2,
        rounds=2,
        local_epochs=1,
        image_size=32,
        base_channels=4,
        unet_depth=2,
        output=tmp_path / "out",
        cache_dir=tmp_path / "cache",
    )
    cfg = AppConfig(run=run, site_names=["hospital-a", "hospital-b"])
    model = build_model(run)
    local = norm_keys(model)
    assert local  # the U-Net's instance norms
    arrays = to_record(model)
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )
    conf = {"server-round": 1, "local-epochs": 1, "lr": 1e-3, "batch-size": 4}
    reply = client_train(
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}), dst_node_id=1, message_type="train"
        ),
        ctx,
    )
    sent = reply.content["arrays"]
    assert set(sent.keys()) == set(arrays.keys()) - local
    assert 0.25 <= reply.content["metrics"][QUALITY_FACTOR] <= 1.0
    store = LocalLayers(tmp_path / "cache", run, "hospital-a")
    assert store.path(1).is_file()
    kept = torch.load(store.path(1), weights_only=True)
    assert set(kept) == local
    # evaluation of round 1 uses the site's own layers: the same as evaluating that model by hand
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type="evaluate",
    )
    got = client_evaluate(msg, ctx).content["metrics"]
    from fedscan.common.tasks.local_training import evaluate_local

    own = build_model(run)
    own.load_state_dict({**arrays.to_torch_state_dict(), **kept})
    site = open_site(discover_sites(synth_root)[0], run, tmp_path / "cache")
    assert got["loss"] == pytest.approx(evaluate_local(own, site, run)["loss"], rel=1e-5)


def test_quality_weighting_leaves_the_evaluation_weighted_by_count() -> None:
    """Evaluation replies carry no quality weight: a whole round (train then evaluate) works, and a
    factor outside [floor, 1] or not finite is held to the bounds."""
    strategy = build_strategy(RunConfig(strategy="fedprox", quality_weighting=True, quality_floor=0.25), 3)
    start = ArrayRecord({"w": torch.zeros(2)})
    msgs = list(strategy.configure_train(1, start, ConfigRecord({}), FixedNodes([1, 2, 3])))
    factors = [float("inf"), -3.0, 0.5]
    replies = [
        _reply(m, i, {"w": torch.full((2,), float(i))}, {"num-examples": 100, QUALITY_FACTOR: q})
        for i, (m, q) in enumerate(zip(msgs, factors, strict=True))
    ]
    out, _ = strategy.aggregate_train(1, replies)
    # factors held to 1, 0.25 and 0.5; site-0's 1/1.75 then held at the cap of 0.5
    assert strategy.weight_shares[1] == pytest.approx({"site-0": 0.5, "site-1": 0.5 / 3, "site-2": 1 / 3})
    assert np.isfinite(out["w"].numpy()).all()
    evals = list(strategy.configure_evaluate(1, out, ConfigRecord({}), FixedNodes([1, 2, 3])))
    answers = []
    for i, m in enumerate(evals):
        m.metadata.__dict__["_message_id"] = f"e{i}"
        answers.append(
            Message(
                RecordDict(
                    {
                        "metrics": MetricRecord({"num-examples": 10 * (i + 1), "dice": 0.1 * i}),
                        "site": ConfigRecord({"name": f"site-{i}"}),
                    }
                ),
                reply_to=m,
            )
        )
    metrics = strategy.aggregate_evaluate(1, answers)
    assert metrics["dice"] == pytest.approx((0 * 10 + 0.1 * 20 + 0.2 * 30) / 60)


def test_trimmed_mean_still_cuts_a_site_when_one_was_rejected() -> None:
    strategy = build_strategy(RunConfig(strategy="fedtrimmedavg", sites=5), 5)
    start = ArrayRecord({"w": torch.zeros(2)})
    msgs = list(strategy.configure_train(1, start, ConfigRecord({}), FixedNodes([1, 2, 3, 4, 5])))
    values = [1.0, 2.0, 3.0, 1000.0, float("nan")]  # one NaN (rejected), one wild
    replies = [
        _reply(m, i, {"w": torch.full((2,), v)}, {"num-examples": 10})
        for i, (m, v) in enumerate(zip(msgs, values, strict=True))
    ]
    out, _ = strategy.aggregate_train(1, replies)
    assert list(strategy.rejected[1]) == ["site-4"]
    assert float(out["w"].numpy()[0]) == pytest.approx(2.5)  # 1 and 1000 cut: the mean of 2 and 3


def test_config_refuses_combinations_that_would_do_nothing() -> None:
    with pytest.raises(ValueError, match="turn secure aggregation off"):
        RunConfig(fault_site="hospital-a", fault_kind="nan", secagg=True)
    with pytest.raises(ValueError, match="does not weight the sites"):
        RunConfig(strategy="fedmedian", quality_weighting=True)
    with pytest.raises(ValueError, match="at least 3 sites"):
        RunConfig(strategy="fedtrimmedavg", sites=2)


def test_fedbn_run_key_is_stable_across_versions() -> None:
    """The key under which a site keeps its FedBN layers must not move when a setting is added at
    its default: runs and model files from before would lose their layers (pinned value)."""
    from fedscan.common.tasks.fedbn_layers import run_key

    assert run_key(RunConfig(strategy="fedbn")) == "3bb4a056ff69a982"
    assert (
        run_key(RunConfig(strategy="fedbn", data_root="/x", output="/y", device="cpu")) == "3bb4a056ff69a982"
    )
    assert run_key(RunConfig(strategy="fedbn", lr_schedule="cosine")) != "3bb4a056ff69a982"
    assert run_key(RunConfig(strategy="fedbn", ct_normalization="foreground")) != "3bb4a056ff69a982"


def test_fedbn_forgets_layers_of_rounds_not_yet_trained(tmp_path) -> None:  # noqa: ANN001
    store = LocalLayers(tmp_path, RunConfig(strategy="fedbn"), "site-a")
    for r in (1, 2, 3):
        store.save(r, _net())
    store.forget_from(2)  # training round 2 again (a rerun, or a resumed run)
    assert store.latest(10) == 1


def test_under_secagg_a_fedbn_site_masks_zero_for_its_norm_layers(synth_root, tmp_path) -> None:  # noqa: ANN001
    """What the secure path encodes: the trained shared layers, and the global values (a zero
    update) for every normalization layer; the site's own are stored locally first."""
    from fedscan.client.site_round import train as site_train
    from fedscan.common.array_records import to_record
    from fedscan.common.models.registry import build_model

    run = RunConfig(
        model="segnet",
        segnet_width=0.125,
        strategy="fedbn",
        data_root=synth_root,
        sites=2,
        local_epochs=1,
        image_size=32,
        output=tmp_path / "out",
        cache_dir=tmp_path / "cache",
    )
    cfg = AppConfig(run=run, site_names=["hospital-a", "hospital-b"])
    arrays = to_record(build_model(run))
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )
    conf = {"server-round": 1, "local-epochs": 1, "lr": 1e-3, "batch-size": 4}
    model, _, _ = site_train(arrays, conf, ctx, cfg, secure=True)
    state, glob = model.state_dict(), arrays.to_torch_state_dict()
    local = norm_keys(model)
    assert all(torch.equal(state[k], glob[k]) for k in local)
    assert any(not torch.equal(state[k], glob[k]) for k in state if k not in local)
    kept = torch.load(LocalLayers(tmp_path / "cache", run, "hospital-a").path(1), weights_only=True)
    assert any(
        not torch.equal(kept[k], glob[k]) for k in kept if k.endswith("running_mean")
    )  # trained, kept here
