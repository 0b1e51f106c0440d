"""The `fedscan` command. Problems a user can fix are printed plainly, without a traceback."""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedscan.common import __version__
from fedscan.common.config import MODELS, STRATEGIES, TASKS, load_run_config
from fedscan.common.errors import FedscanError

console = Console(stderr=True)
out_console = Console()

app = typer.Typer(
    name="fedscan",
    help=(
        "fedscan trains one medical-imaging model across hospitals without moving any images.\n\n"
        "Each hospital keeps its DICOM data on its own machine and trains locally; only model "
        "weight updates leave the site. A coordinator combines them and sends the improved "
        "model back, and every hospital sees how the shared model performs on its own data.\n\n"
        "Start with `fedscan simulate` to try a whole federation on this machine, on built-in "
        "synthetic hospitals. Nothing here contacts the internet."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every started process is stopped


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a FedscanError as a plain message and exit 2; Ctrl-C or SIGTERM exits 130."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except FedscanError as exc:
        console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            console.print(f"  [dim]hint:[/] {exc.hint}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopped everything that was started[/]")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        out_console.print(f"fedscan {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages."),
) -> None:
    _setup_logging(verbose)


@app.command()
def synth(
    sites: int = typer.Option(3, "--sites", help="Number of hospitals to create."),
    out: Path = typer.Option(..., "--out", help="Folder to write the hospitals into."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    task: str = typer.Option("segmentation", "--task", help="segmentation (masks) or classification (labels.csv)."),
    label_level: str = typer.Option("exam", "--label-level",
                                    help="Classification: label whole exams (exam) or single images (image)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty --out."),
) -> None:
    """Create synthetic hospitals: CT-like DICOM series with labels, one folder per site.

    Segmentation writes lesion masks; classification writes exams of 6-16 slices with a
    label per exam (a lesion in any slice) or per image in labels/labels.csv. Sites differ
    like real hospitals do (noise, blur, calibration, slice thickness, scanner, size, lesion
    prevalence, and one site with noisy labels); manifest.json records how.
    """
    with user_errors():
        if sites < 1:
            raise FedscanError(f"--sites must be at least 1, got {sites}")
        from fedscan.common.data.synthetic import synthesize

        with console.status("writing synthetic hospitals") as status:
            manifest = synthesize(out, sites, seed, overwrite=overwrite, task=task.strip().lower(),
                                  label_level=label_level.strip().lower(),
                                  on_site=lambda name: status.update(f"writing {name}"))
        for prof in manifest.sites:
            c = manifest.counts[prof.name]
            if manifest.task == "classification":
                out_console.print(
                    f"{prof.name}: {c['exams']} exams, {c['slices']} slices, {c['labelled_positive']} "
                    f"exams labelled positive ({prof.manufacturer}, noise {prof.noise_hu} HU)"
                )
                continue
            out_console.print(
                f"{prof.name}: {c['patients']} patients, {c['slices']} slices, "
                f"{c['lesion_slices']} with lesions ({prof.manufacturer}, noise {prof.noise_hu} HU)"
            )
        out_console.print(f"wrote {len(manifest.sites)} sites to {out} (see {out}/manifest.json)")


_ROUND_RE = re.compile(r"round (\d+)/(\d+)")


@app.command()
def simulate(
    config: Path | None = typer.Option(None, "--config", help="Run configuration (TOML)."),
    sites: int | None = typer.Option(None, "--sites", help="Synthetic hospitals to create when no --data-root is given."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding one folder per site."),
    out: Path | None = typer.Option(None, "--out", help="Output folder for reports and weights."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    task: str | None = typer.Option(None, "--task", help=f"One of: {', '.join(TASKS)}."),
    model: str | None = typer.Option(None, "--model", help=f"One of: {', '.join(MODELS)}."),
    strategy: str | None = typer.Option(None, "--strategy", help=f"One of: {', '.join(STRATEGIES)}."),
    local_epochs: int | None = typer.Option(None, "--local-epochs", help="Local epochs per round."),
    learning_rate: float | None = typer.Option(None, "--lr", help="Learning rate."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size."),
    image_size: int | None = typer.Option(None, "--image-size", help="Image side in pixels (multiple of 16)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in --out."),
) -> None:
    """Simulate a federation of hospitals on this machine and report results per site.

    Without --data-root it first creates --sites synthetic hospitals. Writes report.json,
    per_site.csv, report.md, the final global weights and the resolved config into --out.
    """
    with user_errors():
        overrides: dict[str, Any] = {
            "sites": sites, "rounds": rounds, "data_root": data_root, "output": out, "seed": seed,
            "task": task, "model": model, "strategy": strategy, "local_epochs": local_epochs,
            "learning_rate": learning_rate, "batch_size": batch_size, "image_size": image_size,
            "device": device,
        }
        cfg = load_run_config(config, overrides)
        from fedscan.server.simulate import run_simulation

        progress = Progress(
            TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        )
        task_id = progress.add_task("rounds", total=cfg.rounds)

        def on_progress(line: str) -> None:
            if not progress.live.is_started:
                progress.start()  # the bar appears once Flower runs the first round
            progress.console.print(f"  {line}", highlight=False)
            m = _ROUND_RE.search(line)
            if m and "done" in line:
                progress.update(task_id, completed=int(m.group(1)))

        def on_stage(line: str) -> None:
            console.print(f"[dim]{line}[/]", highlight=False)

        try:
            report = run_simulation(cfg, overwrite=overwrite, on_progress=on_progress, on_stage=on_stage)
        finally:
            progress.stop()
        final = report["final"]
        out_dir = Path(cfg.output).resolve()
        out_console.print((out_dir / "report.md").read_text(), highlight=False)
        main = report["metrics"]["main"]
        mean = final["mean"].get(main)
        out_console.print(
            f"mean {main} over {len(final['per_site'])} sites: "
            f"{'n/a' if mean is None else f'{mean:.3f}'}; results in {out_dir}"
        )


def main() -> None:
    """Entry point of the `fedscan` console script."""
    app()


if __name__ == "__main__":
    main()
