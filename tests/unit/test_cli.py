"""The `fedscan` command package: its commands, the options `simulate` and `run` share, error
messages that name the flag a user typed, and the run events it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedscan.common.cli import app
from fedscan.common.cli import run_options as opt
from fedscan.common.cli.run_display import round_progress
from fedscan.common.errors import FedscanError
from fedscan.common.report_schema import RunReport
from fedscan.common.run_events import ReportUpdated, RoundFinished, RunStarted


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def test_the_commands_in_their_order() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fedscan.common.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "120", "PATH": ""},
        check=False,
    )
    assert res.returncode == 0, res.stderr
    names = [
        line.split()[1]
        for line in res.stdout.splitlines()
        if line.startswith("│ ") and len(line.split()) > 2 and not line.split()[1].startswith("-")
    ]
    assert names == ["synth", "simulate", "run", "report", "server", "site"]


@pytest.mark.parametrize(
    "command",
    [
        ["simulate"],
        ["run", "--superlink", "127.0.0.1:1", "--ca", "nowhere.crt"],
    ],
)
def test_setting_errors_name_the_flag_that_was_typed(command: list[str], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "out"), "--lr", "-1"])
    assert res.exit_code == 2, res.output
    assert "learning_rate (from --lr)" in _flat(res.output)


def test_resume_refuses_other_options_by_their_flags(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "--resume",
            str(tmp_path),
            "--out",
            str(tmp_path / "x"),
            "--lr",
            "0.1",
            "--no-secagg",
            "--overwrite",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "(got --out, --lr, --secagg/--no-secagg, --overwrite)" in _flat(res.output)


def test_both_commands_take_the_shared_settings() -> None:
    import typer.main

    def flags(name: str) -> set[str]:
        command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
        return {f for p in command.params for f in (*p.opts, *p.secondary_opts)}

    own = ("data_root", "wait_timeout", "round_timeout")
    shared = {f for key, flag in opt.FLAGS.items() if key not in own for f in flag.split("/")}
    assert shared <= flags("simulate") and shared <= flags("run")
    assert "--data-root" in flags("simulate") and {"--wait-timeout", "--round-timeout"} <= flags("run")


def test_the_progress_shows_each_event_s_text(capsys: pytest.CaptureFixture) -> None:
    report = RunReport.model_validate(
        {
            "status": "running",
            "task": "segmentation",
            "model": "unet",
            "strategy": "fedavg",
            "rounds": 2,
            "rounds_completed": 0,
            "seed": 0,
            "sites": [],
            "metrics": {"main": "dice", "names": ["dice"]},
            "history": [],
            "final": {"per_site": {}, "mean": {}, "worst": {}},
        }
    )
    with round_progress(2) as on_event:
        on_event(ReportUpdated(report=report))  # data only: nothing shown
        on_event(RunStarted(sites=2, rounds=2))
        on_event(RoundFinished(round=1, rounds=2, metric="dice", mean=0.5, per_site={"a": 0.5}))
    err = capsys.readouterr().err  # the bar and the lines are on stderr
    assert "run started: 2 sites, 2 rounds" in err and "round 1/2 done: mean dice 0.500 (a 0.500)" in err
    assert "fedscan_event" not in err


@pytest.mark.parametrize(
    ("toml", "flag", "secure"),
    [
        ("", [], True),  # deployment: on by default
        ("secagg = false\n", [], False),
        ("[secure_aggregation]\nenabled = false\n", [], False),  # the group's table says the same
        ("[secure_aggregation]\nenabled = false\n", ["--secagg"], True),
        ("", ["--no-secagg"], False),
    ],
)
def test_run_turns_secure_aggregation_on_unless_told_otherwise(
    toml: str, flag: list[str], secure: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedscan.common.config import RunConfig
    from fedscan.server import coordinator

    got: list[RunConfig] = []

    def run_deployment(cfg: RunConfig, *args: object, **kwargs: object) -> dict:
        got.append(cfg)
        raise FedscanError("stopped here")

    monkeypatch.setattr(coordinator, "run_deployment", run_deployment)
    config = tmp_path / "run.toml"
    config.write_text(toml)
    res = CliRunner().invoke(
        app,
        [
            "run",
            "--superlink",
            "h:1",
            "--ca",
            "ca.crt",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "out"),
            *flag,
        ],
    )
    assert res.exit_code == 2 and "stopped here" in res.output, res.output
    assert got[0].secagg is secure
