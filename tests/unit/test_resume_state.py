"""Resuming a run, without Flower processes: the server optimizer's state (FedAdam's and FedYogi's
moments, FedAvgM's momentum) through a checkpoint file and back gives the rounds after it exactly
as an uninterrupted run; and what `fedscan simulate --resume` refuses, with its messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FixedNodes
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from typer.testing import CliRunner

from fedscan.common.cli import app as cli
from fedscan.common.config import RunConfig
from fedscan.server import checkpoint
from fedscan.server.strategies import PerSiteEvaluation, build_strategy

NODES = [1, 2, 3]


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _initial() -> ArrayRecord:
    gen = torch.Generator().manual_seed(0)
    # "s" is 0-d, as BatchNorm's buffers can be: Flower's optimizer state then holds numpy scalars
    return ArrayRecord(
        {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen), "s": torch.tensor(0.5)}
    )


def _rounds(strategy: PerSiteEvaluation, arrays: ArrayRecord, n: int) -> tuple[ArrayRecord, list[int]]:
    """``n`` rounds as Flower's ``start()`` counts them (from 1). Each site's update depends on the
    round it is told (``server-round``), as the real sites' seeds do. Returns the arrays and the
    rounds the sites were told."""
    told = []
    for flower_round in range(1, n + 1):
        msgs = list(strategy.configure_train(flower_round, arrays, ConfigRecord({}), FixedNodes(NODES)))
        replies = []
        for i, msg in enumerate(msgs):
            msg.metadata.__dict__["_message_id"] = f"m{flower_round}-{i}"
            server_round = int(msg.content["config"]["server-round"])
            told.append(server_round)
            gen = torch.Generator().manual_seed(1000 * server_round + i)
            local = {
                k: torch.from_numpy(v.numpy().copy()) + 0.1 * torch.randn(v.shape, generator=gen) * (i + 1)
                for k, v in msg.content["arrays"].items()
            }
            content = RecordDict(
                {
                    "arrays": ArrayRecord(local),
                    "metrics": MetricRecord({"num-examples": 10 * (i + 1)}),
                    "site": ConfigRecord({"name": f"site-{i}"}),
                }
            )
            replies.append(Message(content, reply_to=msg))
        new, _ = strategy.aggregate_train(flower_round, replies)
        assert new is not None
        arrays = new
    return arrays, told


def _equal(a: ArrayRecord, b: ArrayRecord) -> bool:
    sa, sb = a.to_torch_state_dict(), b.to_torch_state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm", "fedavg"])
def test_strategy_state_through_a_checkpoint_continues_the_run_exactly(name: str, tmp_path: Path) -> None:
    cfg = RunConfig(strategy=name, rounds=4, server_learning_rate=0.1)
    uninterrupted, _ = _rounds(build_strategy(cfg, len(NODES)), _initial(), 4)

    first = build_strategy(cfg, len(NODES))
    after_two, told = _rounds(first, _initial(), 2)
    assert told == [1, 1, 1, 2, 2, 2]
    state = first.state()
    if name in ("fedadam", "fedyogi"):
        assert set(state) == {"m_t", "v_t"} and state["m_t"] and state["v_t"]
    elif name == "fedavgm":
        assert set(state) == {"momentum_vector"} and state["momentum_vector"] is not None
    else:
        assert state == {}
    history = [{"round": r, "per_site": {"site-0": {"dice": 0.5, "hd95": None}}} for r in (1, 2)]
    path = checkpoint.save_round(tmp_path, 2, after_two, cfg, state, history)
    assert path == tmp_path / "checkpoints" / "round-002.pt"
    assert checkpoint.latest_checkpoint(tmp_path) == path
    raw = torch.load(path, weights_only=True)  # tensors and plain values only
    assert raw["strategy"] == name and raw["round"] == 2
    assert "strategy_state" not in torch.load(tmp_path / "global_model.pt", weights_only=True)

    resumed = checkpoint.load_resume(path)
    assert resumed.server_round == 2 and resumed.history == history and resumed.strategy == name
    second = build_strategy(cfg, len(NODES))
    second.load_state(resumed.strategy_state)
    second.round_offset = resumed.server_round
    final, told = _rounds(second, resumed.arrays, 2)
    assert told == [3, 3, 3, 4, 4, 4]  # the sites hear the run's rounds, not Flower's
    assert _equal(final, uninterrupted)

    if name != "fedavg":  # without its optimizer state the run goes elsewhere
        blank = build_strategy(cfg, len(NODES))
        blank.round_offset = 2
        assert not _equal(_rounds(blank, resumed.arrays, 2)[0], uninterrupted)


def test_load_state_refuses_another_strategys_state() -> None:
    with pytest.raises(ValueError, match="no optimizer state"):
        build_strategy(RunConfig(strategy="fedavg"), 2).load_state({"m_t": {}})


def _stopped_run(tmp_path: Path, rounds: int, last: int | None, data_root: Path | None = None) -> Path:
    out = tmp_path / "out"
    data_root = data_root or tmp_path / "sites"
    (data_root / "hospital-a").mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(strategy="fedadam", rounds=rounds, output=out, data_root=data_root)
    checkpoint.save_run_config(out, cfg)
    if last is not None:
        checkpoint.save_round(out, last, _initial(), cfg, {}, [])
    return out


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("missing", [], "cannot resume: {out} does not exist"),
        ("no-checkpoint", [], "has no checkpoint (it stopped before its first round ended)"),
        ("complete", [], "is already complete: its last checkpoint is of round 4 of 4"),
        ("no-data", [], "its data_root {tmp}/gone is missing"),
        ("corrupt", [], "cannot read the checkpoint {out}/checkpoints/round-002.pt"),
        ("round-2", ["--rounds", "6", "--lr", "0.1"], "it takes no other options (got --rounds, --lr)"),
    ],
)
def test_resume_refusals(setup: str, args: list[str], message: str, tmp_path: Path) -> None:
    if setup == "missing":
        out = tmp_path / "out"
    elif setup == "no-checkpoint":
        out = _stopped_run(tmp_path, 4, None)
    elif setup == "complete":
        out = _stopped_run(tmp_path, 4, 4)
    elif setup == "no-data":
        out = _stopped_run(tmp_path, 4, 2, tmp_path / "gone")
        (tmp_path / "gone" / "hospital-a").rmdir()
        (tmp_path / "gone").rmdir()
    else:
        out = _stopped_run(tmp_path, 4, 2)
        if setup == "corrupt":
            (out / "checkpoints" / "round-002.pt").write_bytes(b"not a checkpoint")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(out), *args])
    assert result.exit_code == 2, result.output
    flat = "".join(result.output.split())  # rich wraps long lines, paths too
    assert "".join(message.format(out=out.resolve(), tmp=tmp_path.resolve()).split()) in flat
    assert (
        sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    )  # nothing written or removed
