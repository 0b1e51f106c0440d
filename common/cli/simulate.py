"""`fedscan simulate`: a whole federation on this machine, or the rest of a stopped one (--resume)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedscan.common.cli import run_options as opt
from fedscan.common.cli.root import app, user_errors
from fedscan.common.cli.run_display import print_result, round_progress, stage
from fedscan.common.errors import FedscanError


@app.command()
def simulate(
    ctx: typer.Context,
    config: Path | None = opt.CONFIG,
    sites: int | None = opt.option("sites", "Synthetic hospitals to create when no --data-root is given."),
    rounds: int | None = opt.ROUNDS,
    data_root: Path | None = opt.option("data_root", "Folder holding one folder per site."),
    output: Path | None = opt.option("output", "Output folder for reports and weights."),
    seed: int | None = opt.SEED,
    task: str | None = opt.TASK,
    model: str | None = opt.MODEL,
    strategy: str | None = opt.STRATEGY,
    local_epochs: int | None = opt.LOCAL_EPOCHS,
    learning_rate: float | None = opt.LEARNING_RATE,
    batch_size: int | None = opt.BATCH_SIZE,
    image_size: int | None = opt.IMAGE_SIZE,
    device: str | None = opt.option("device", "auto, cpu or cuda."),
    secagg: bool | None = opt.option(
        "secagg", "Secure aggregation (SecAgg+): the server learns only the sum. Default: off."
    ),
    baselines: bool = typer.Option(
        False,
        "--baselines",
        help="Also train each site alone and all data pooled, at the same compute, and evaluate every model "
        "at every site (cross-site matrix, federated gain).",
    ),
    overwrite: bool = opt.OVERWRITE,
    resume: Path | None = typer.Option(
        None,
        "--resume",
        metavar="OUT",
        help="Continue the stopped run in the output folder OUT after its last completed round, with the "
        "settings it was started with (OUT/run_config.toml).",
    ),
) -> None:
    """Simulate a federation of hospitals on this machine and report results per site.

    Without --data-root it first creates --sites synthetic hospitals. Writes report.json,
    per_site.csv, report.md, the final global weights and the resolved config into --out.
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
            _resume(resume, given, baselines)
            return
        cfg = opt.run_config(config, settings)
        from fedscan.server.simulate import run_simulation

        with round_progress(cfg.rounds) as on_event:
            report = run_simulation(
                cfg, overwrite=overwrite, on_event=on_event, on_stage=stage, baselines=baselines
            )
        print_result(report, Path(cfg.output))


def _resume(out: Path, given: list[str], baselines: bool) -> None:
    """`fedscan simulate --resume OUT`: the run's own settings only, so that it ends as it would have."""
    if given:
        raise FedscanError(
            "--resume continues a run with the settings it was started with; it takes no other options "
            f"(got {opt.flags_of(given)})",
            hint=f"drop them, or start a new run; the run's settings are in {out / 'run_config.toml'}",
        )
    from fedscan.server.simulate import find_resume, run_simulation

    cfg, ckpt, done = find_resume(out)
    stage(f"resuming the run in {cfg.output} after round {done} of {cfg.rounds} ({ckpt.name})")
    with round_progress(cfg.rounds, done) as on_event:
        report = run_simulation(cfg, on_event=on_event, baselines=baselines, resume_from=ckpt, on_stage=stage)
    print_result(report, Path(cfg.output))
