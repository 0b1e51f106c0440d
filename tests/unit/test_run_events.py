"""Run events between the ServerApp and the command that follows it: typed, one JSON object a line,
found among other output; and report.json's model."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from fedscan.common import flower_runtime
from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.errors import FedscanError
from fedscan.common.flower_runtime import FlowerProcess, event_reader
from fedscan.common.report_schema import RunReport
from fedscan.common.run_events import (
    EvaluationsMissing,
    ReportUpdated,
    RoundFinished,
    RunEvent,
    RunFailed,
    RunFinished,
    RunStarted,
    RunWarning,
    SecureAggregation,
    UpdateRejected,
    WaitingForSites,
    decode,
    encode,
    write_event,
)
from fedscan.server.report import RunRecorder, load_report, write_report_files


def _report(tmp_path: Path) -> dict:
    cfg = AppConfig(run=RunConfig(rounds=2, output=tmp_path), site_names=["a", "b"])
    rec = RunRecorder(tmp_path, cfg)
    rec.record_round(
        1,
        {
            "a": {"dice": 0.25, "iou": 0.1, "hd95": float("nan"), "loss": 1.0, "num-examples": 12},
            "b": {"dice": 0.5, "loss": 0.7, "num-examples": 24},
        },
        timing={"round_seconds": 3.5},
        aggregation={"secure": False, "rejected": {}},
    )
    rec.record_round(2, {"a": {"dice": 0.75, "num-examples": 12}})
    return rec.report("running")


EVENTS: list[RunEvent] = [
    RunStarted(sites=3, rounds=4),
    RunStarted(sites=3, rounds=4, resumed_after=2, checkpoint="/out/checkpoints/round-002.pt"),
    WaitingForSites(connected=1, needed=3, timeout=600.0),
    SecureAggregation(sites=3, threshold=2, clipping_range=8.0, quantization_bits=30),
    RunWarning(message="round 2: 1 of 3 sites dropped out during SecAgg+"),
    UpdateRejected(round=2, site="hospital-c", reason="its update holds NaN or infinite values"),
    EvaluationsMissing(round=2, sites=["hospital-b", "hospital-c"]),
    RoundFinished(round=2, rounds=4, metric="dice", mean=0.5, per_site={"a": 0.25, "b": None}),
    RunFinished(metric="dice", mean=0.123456789),
    RunFailed(message="only 2 of the 3 sites were connected", hint="start the missing sites"),
    RunFailed(),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_survives_a_line_of_json(event: RunEvent) -> None:
    line = encode(event)
    assert "\n" not in line and json.loads(line)["fedscan_event"]
    assert decode(line) == event
    assert decode(f"  {line}  ") == event  # surrounding blanks do not matter


def test_what_a_user_sees_of_each_event() -> None:
    texts = [e.text() for e in EVENTS]
    assert texts == [
        "run started: 3 sites, 4 rounds",
        "resuming from round 2 (/out/checkpoints/round-002.pt): 3 sites, rounds 3 to 4",
        "waiting for sites: 1 of 3 connected (up to 600s)",
        "secure aggregation (SecAgg+): each round over the sites it reaches (with 3: 2 needed to unmask); "
        "updates clipped to +-8, quantized to 2^30 levels",
        "round 2: 1 of 3 sites dropped out during SecAgg+",
        "round 2: rejected the update of hospital-c: its update holds NaN or infinite values",
        "round 2: no evaluation from hospital-b, hospital-c",
        "round 2/4 done: mean dice 0.500 (a 0.250, b n/a)",
        "run complete: final mean dice 0.123456789",
        "run failed: only 2 of the 3 sites were connected | start the missing sites",
        "run failed",
    ]


def test_other_output_is_no_event() -> None:
    for line in [
        "",
        "INFO :      Starting logstream for run_id `12`",
        "{not json",
        "[1, 2]",
        '{"a": 1}',
        "round 1/2 done: mean dice 0.5",
        '(ClientAppActor pid=7) {"x": 1}',
    ]:
        assert decode(line) is None, line


def test_an_event_of_another_shape_is_an_error_not_silence() -> None:
    with pytest.raises(ValidationError):
        decode('{"fedscan_event": "round_finished", "round": "two"}')
    with pytest.raises(ValidationError):
        decode('{"fedscan_event": "no_such_event"}')


def test_written_events_stand_on_their_own_line() -> None:
    out = io.StringIO()
    out.write("a line other output left open")
    write_event(RunStarted(sites=2, rounds=1), out)
    write_event(RoundFinished(round=1, rounds=1, metric="dice", mean=None, per_site={}), out)
    events = [e for e in map(decode, out.getvalue().splitlines()) if e is not None]
    assert [type(e) for e in events] == [RunStarted, RoundFinished]


def test_the_report_goes_through_its_model_unchanged(tmp_path: Path) -> None:
    rep = _report(tmp_path)
    rep["cross_site"] = {"global": {"a": {"dice": 0.75}}}  # an optional section, after the others
    event = decode(encode(ReportUpdated(report=RunReport.model_validate(rep))))
    assert isinstance(event, ReportUpdated)
    again = event.report.as_dict()
    assert json.dumps(again) == json.dumps(rep)  # the same keys, in the same order, the same values
    assert isinstance(again["history"][0]["per_site"]["a"]["num_examples"], int)
    assert again["history"][0]["per_site"]["a"]["hd95"] is None


def test_load_report_checks_the_model(tmp_path: Path) -> None:
    rep = _report(tmp_path)
    write_report_files(tmp_path, rep)
    assert load_report(tmp_path) == json.loads((tmp_path / "report.json").read_text())
    for broken, message in [
        ({k: v for k, v in rep.items() if k not in ("history", "seed")}, "it lacks seed, history"),
        ({**rep, "status": "paused"}, "status: Input should be"),
        ({**rep, "history": [{"round": 1}]}, "history.0.per_site: Field required"),
        ({**rep, "task": "restoration"}, "unknown task 'restoration'"),
    ]:
        (tmp_path / "report.json").write_text(json.dumps(broken))
        with pytest.raises(FedscanError, match=message):
            load_report(tmp_path)
    # a report whose metrics block is damaged gets the task's own
    (tmp_path / "report.json").write_text(json.dumps({**rep, "metrics": "?"}))
    assert load_report(tmp_path)["metrics"]["main"] == "dice"


def test_a_process_s_events_are_found_among_its_other_output(tmp_path: Path) -> None:
    """What `follow_run` does with `flwr log --stream`: a child's output, logged whole; the events in it
    handed over in order, other lines and a broken event left out."""
    code = (
        "import sys\n"
        "from fedscan.common.run_events import RunStarted, RoundFinished, write_event\n"
        "print('INFO :      Starting logstream', flush=True)\n"
        "sys.stdout.write('(ClientAppActor pid=1) partial line without its end')\n"
        "write_event(RunStarted(sites=2, rounds=1))\n"
        'print(\'{"fedscan_event": "round_finished"}\', flush=True)\n'
        "write_event(RoundFinished(round=1, rounds=1, metric='dice', mean=0.5, per_site={'a': 0.5}))\n"
    )
    got: list[RunEvent] = []
    log_path = tmp_path / "logs" / "flower.log"
    cmd = [sys.executable, "-c", code]
    with FlowerProcess(cmd, dict(os.environ), log_path, event_reader(got.append)) as proc:
        assert proc.wait() == 0
        proc.stop()
    assert got == [
        RunStarted(sites=2, rounds=1),
        RoundFinished(round=1, rounds=1, metric="dice", mean=0.5, per_site={"a": 0.5}),
    ]
    text = log_path.read_text()
    assert "Starting logstream" in text and "partial line without its end" in text


def test_following_until_finished_ends_at_the_servers_last_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedscan simulate` follows a run until the ServerApp's RunFinished, not until Flower's run ends
    (the simulation engine's Ray shutdown): a `flwr log` that never ends is stopped once that event
    has been handed over, with every event before it."""
    fake = tmp_path / "flwr"
    pid_file = tmp_path / "pid"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, threading\n"
        "from fedscan.common.run_events import RunFinished, RunStarted, write_event\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "write_event(RunStarted(sites=2, rounds=1))\n"
        "write_event(RunFinished(metric='dice', mean=0.5))\n"
        "threading.Event().wait()  # Flower still shutting down: this never ends by itself\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(flower_runtime, "flower_exe", lambda name: str(fake))
    got: list[RunEvent] = []
    log_path = tmp_path / "flower.log"
    flower_runtime.follow_run(7, "conn", tmp_path / "home", log_path, got.append, until_finished=True)
    assert got == [RunStarted(sites=2, rounds=1), RunFinished(metric="dice", mean=0.5)]
    assert not psutil.pid_exists(int(pid_file.read_text())) or (
        psutil.Process(int(pid_file.read_text())).status() == psutil.STATUS_ZOMBIE
    )
    assert '"run_finished"' in log_path.read_text()
