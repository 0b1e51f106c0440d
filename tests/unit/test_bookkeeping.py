"""Per-site evaluation bookkeeping: the strategy keeps each site's metrics, the report keeps them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedscan.common.config import AppConfig, RunConfig
from fedscan.server.report import RunRecorder, summarize
from fedscan.server.strategies import PerSiteFedAvg, build_strategy


@pytest.fixture(autouse=True)
def _flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages need a run id, which Flower sets in a running app
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reply(node: int, site: str | None, **metrics: float) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if site is not None:
        content["site"] = ConfigRecord({"name": site})
    return Message(content, reply_to=ins)


def failure(node: int) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(Error(code=1, reason="site evaluation failed"), reply_to=ins)


def test_per_site_metrics_are_kept_not_averaged_away() -> None:
    strategy = build_strategy(RunConfig(), n_sites=3)
    assert isinstance(strategy, PerSiteFedAvg)
    replies = [
        reply(11, "hospital-a", dice=0.9, iou=0.8, hd95=3.0, loss=0.2, **{"num-examples": 10}),
        reply(12, "hospital-b", dice=0.5, iou=0.4, hd95=9.0, loss=0.6, **{"num-examples": 30}),
        failure(13),
    ]
    averaged = strategy.aggregate_evaluate(2, replies)
    assert averaged is not None
    assert averaged["dice"] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)  # Flower's weighted mean
    kept = strategy.site_history[2]
    assert set(kept) == {"hospital-a", "hospital-b"}  # the failed node is absent, not zero
    assert kept["hospital-a"]["dice"] == pytest.approx(0.9)
    assert kept["hospital-b"]["num-examples"] == 30


def test_reply_without_site_name_is_keyed_by_node() -> None:
    strategy = build_strategy(RunConfig(), n_sites=1)
    strategy.aggregate_evaluate(1, [reply(42, None, dice=0.3, **{"num-examples": 1})])
    assert list(strategy.site_history[1]) == ["node-42"]


def test_recorder_writes_history_final_mean_and_worst(tmp_path: Path) -> None:
    cfg = AppConfig(run=RunConfig(rounds=2, output=tmp_path), site_names=["a", "b"])
    rec = RunRecorder(tmp_path, cfg)
    rec.record_round(
        1,
        {
            "a": {"dice": 0.2, "iou": 0.1, "hd95": 30.0, "loss": 1.0, "num-examples": 12},
            "b": {"dice": 0.1, "iou": 0.05, "hd95": 40.0, "loss": 1.1, "num-examples": 24},
        },
    )
    rec.record_round(
        2,
        {
            "a": {"dice": 0.8, "iou": 0.7, "hd95": 4.0, "loss": 0.3, "num-examples": 12},
            "b": {"dice": 0.6, "iou": 0.5, "hd95": float("nan"), "loss": 0.5, "num-examples": 24},
        },
    )
    rec.write("complete")
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "missing_sites" not in rep["history"][0]
    rec.record_round(3, {"a": {"dice": 0.5, "num-examples": 12}})
    assert rec.history[-1]["missing_sites"] == ["b"]
    rec.history.pop()
    assert rep["status"] == "complete" and rep["rounds_completed"] == 2
    assert [h["round"] for h in rep["history"]] == [1, 2]
    assert rep["history"][0]["per_site"]["b"] == {
        "dice": 0.1,
        "iou": 0.05,
        "hd95": 40.0,
        "loss": 1.1,
        "num_examples": 24,
    }
    final = rep["final"]
    assert final["per_site"]["b"]["hd95"] is None  # undefined stays undefined, not 0
    assert final["mean"]["dice"] == pytest.approx(0.7)  # each site counts once
    assert final["mean"]["hd95"] == pytest.approx(4.0)  # mean over the sites where it is defined
    assert final["worst"]["site"] == "b" and final["worst"]["dice"] == pytest.approx(0.6)
    rows = list(csv.DictReader((tmp_path / "per_site.csv").open()))
    assert [(r["round"], r["site"]) for r in rows] == [("1", "a"), ("1", "b"), ("2", "a"), ("2", "b")]
    assert rows[3]["hd95"] == "" and rows[3]["num_examples"] == "24"
    md = (tmp_path / "report.md").read_text()
    assert "| b | 0.600 | 0.500 | n/a | n/a | n/a | 24 |" in md  # no lesion metrics sent: n/a
    assert "| **mean** | 0.700 |" in md and "Worst site: **b**" in md


def test_summary_of_no_sites() -> None:
    s = summarize({})
    assert s["worst"] == {} and all(v is None for v in s["mean"].values())
    assert not any(isinstance(v, float) and math.isnan(v) for v in s["mean"].values())


def test_classification_report_keeps_undefined_auroc_undefined(tmp_path: Path) -> None:
    cfg = AppConfig(run=RunConfig(task="classification", rounds=1, output=tmp_path), site_names=["a", "b"])
    rec = RunRecorder(tmp_path, cfg)
    common = {
        "sensitivity": 1.0,
        "specificity": float("nan"),
        "f1": 1.0,
        "accuracy": 1.0,
        "ece": 0.1,
        "loss": 0.2,
    }
    rec.record_round(
        1,
        {
            "a": {"auroc": float("nan"), "balanced_accuracy": 1.0, **common, "num-examples": 3},  # one class
            "b": {
                "auroc": 0.75,
                "balanced_accuracy": 0.625,
                "sensitivity": 0.5,
                "specificity": 0.75,
                "f1": 0.4,
                "accuracy": 0.7,
                "ece": 0.25,
                "loss": 0.6,
                "num-examples": 10,
            },
        },
    )
    rep = rec.write("complete")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["metrics"]["main"] == "balanced_accuracy"
    assert saved["final"]["per_site"]["a"]["auroc"] is None  # undefined: not 0, not 0.5
    assert rep["final"]["mean"]["auroc"] == pytest.approx(0.75)  # the mean skips it
    assert rep["final"]["mean"]["balanced_accuracy"] == pytest.approx(0.8125)
    assert rep["final"]["worst"]["site"] == "b"
    header = next(csv.reader((tmp_path / "per_site.csv").open()))
    assert header[:10] == [
        "round",
        "site",
        "auroc",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "f1",
        "accuracy",
        "ece",
        "loss",
    ]
    md = (tmp_path / "report.md").read_text()
    assert "| a | n/a | 1.000 | 1.000 | n/a | 1.000 | 1.000 | 0.100 | 3 |" in md
    assert "n/a: undefined at that site" in md and "validation exams" in md
    assert "Worst site: **b** (balanced accuracy 0.625)" in md
