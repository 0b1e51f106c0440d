"""`fedscan run`: the coordinator's command, a federation on a live SuperLink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fedscan.common.cli import run_options as opt
from fedscan.common.cli.root import app, console, user_errors
from fedscan.common.cli.run_display import print_result, round_progress
from fedscan.common.config import RunConfig


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's SuperLink, HOST:PORT."),
    ca: Path = typer.Option(
        ..., "--ca", help="The federation's CA certificate (ca.crt from `fedscan server init`)."
    ),
    config: Path | None = opt.CONFIG,
    sites: int | None = opt.option("sites", "Registered sites to wait for before round 1."),
    rounds: int | None = opt.ROUNDS,
    output: Path | None = opt.option("output", "Output folder for the reports."),
    seed: int | None = opt.SEED,
    task: str | None = opt.TASK,
    model: str | None = opt.MODEL,
    strategy: str | None = opt.STRATEGY,
    local_epochs: int | None = opt.LOCAL_EPOCHS,
    learning_rate: float | None = opt.LEARNING_RATE,
    batch_size: int | None = opt.BATCH_SIZE,
    image_size: int | None = opt.IMAGE_SIZE,
    device: str | None = opt.option("device", "auto, cpu or cuda (at each site)."),
    wait_timeout: float | None = opt.option(
        "wait_timeout", "Seconds to wait for the sites a round needs (default 600)."
    ),
    round_timeout: float | None = opt.option(
        "round_timeout", "Seconds a round waits for the sites' replies (default 3600)."
    ),
    secagg: bool | None = opt.option("secagg", "Secure aggregation (SecAgg+). Default: on in deployment."),
    overwrite: bool = opt.OVERWRITE,
    resume: Path | None = typer.Option(
        None,
        "--resume",
        metavar="OUT",
        help="Continue the stopped run in the output folder OUT after its last completed round, with the "
        "settings it was started with (OUT/run_config.toml), e.g. after the SuperLink was restarted.",
    ),
) -> None:
    """Run a federation on a live SuperLink: the coordinator's command.

    Waits for --sites registered sites (up to --wait-timeout), trains for --rounds rounds,
    streams progress per round, and writes report.json, per_site.csv and report.md into --out.
    With --resume OUT it continues a stopped run from its last checkpoint instead.
    """
    with user_errors():
        settings = opt.given_settings(ctx.params)
        if resume is not None:
            given = [
                k
                for k, v in {**settings, "config": config, "overwrite": overwrite or None}.items()
                if v is not None
            ]
            _resume(resume, given, superlink, ca)
            return
        if secagg is None and not opt.config_sets(config, "secagg"):
            settings["secagg"] = True  # deployment: on unless the config or --no-secagg says otherwise
        _deploy(opt.run_config(config, settings), superlink, ca, overwrite=overwrite)


def _deploy(cfg: RunConfig, superlink: str, ca: Path, done: int = 0, **kw: Any) -> None:
    """Run ``cfg`` on the SuperLink (after round ``done`` of a resumed run), showing its progress."""
    from fedscan.server.coordinator import run_deployment

    with round_progress(cfg.rounds, done) as on_event:
        report = run_deployment(
            cfg,
            superlink,
            ca,
            on_event=on_event,
            on_stage=lambda line: console.print(f"  {line}", highlight=False),
            **kw,
        )
    print_result(report, Path(cfg.output))


def _resume(out: Path, given: list[str], superlink: str, ca: Path) -> None:
    """`fedscan run --resume OUT`: the run's own settings only, so that it ends as it would have."""
    from fedscan.common.errors import FedscanError

    if given:
        raise FedscanError(
            "--resume continues a run with the settings it was started with; it takes no other options "
            f"than --superlink and --ca (got {opt.flags_of(given)})",
            hint=f"drop them, or start a new run; the run's settings are in {out / 'run_config.toml'}",
        )
    from fedscan.server.checkpoint import find_resume_point

    cfg, ckpt, resumed = find_resume_point(out, "fedscan run")
    done = resumed.server_round
    console.print(
        f"  resuming the run in {cfg.output} after round {done} of {cfg.rounds} ({ckpt.name})",
        highlight=False,
    )
    _deploy(cfg, superlink, ca, done, resume_from=ckpt)
