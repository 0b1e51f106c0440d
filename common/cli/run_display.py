"""What `fedscan simulate` and `fedscan run` show while a run runs and when it ends: a progress bar
over the rounds with each run event's text above it, then the report and the mean."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedscan.common.cli.root import console, out_console
from fedscan.common.run_events import RoundFinished, RunEvent


@contextmanager
def round_progress(rounds: int, done: int = 0) -> Iterator[Callable[[RunEvent], None]]:
    """A progress bar over the rounds (``done`` of them before it starts), fed with the
    ServerApp's run events; each event's text is printed above it."""
    progress = Progress(
        TextColumn("[bold]federated rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task_id = progress.add_task("rounds", total=rounds, completed=done)

    def on_event(event: RunEvent) -> None:
        text = event.text()
        if text is None:
            return
        if not progress.live.is_started:
            progress.start()  # the bar appears once Flower runs the first round
        progress.console.print(f"  {text}", highlight=False)
        if isinstance(event, RoundFinished):
            progress.update(task_id, completed=event.round)

    try:
        yield on_event
    finally:
        progress.stop()


def stage(line: str) -> None:
    """A step of the command itself (checking sites, starting Flower), dimmed."""
    console.print(f"[dim]{line}[/]", highlight=False)


def print_result(report: dict[str, Any], out: Path) -> None:
    """The finished run's report.md and its mean main metric."""
    final = report["final"]
    out_dir = out.expanduser().resolve()
    out_console.print((out_dir / "report.md").read_text(), highlight=False)
    main = report["metrics"]["main"]
    mean = final["mean"].get(main)
    out_console.print(
        f"mean {main} over {len(final['per_site'])} sites: "
        f"{'n/a' if mean is None else f'{mean:.3f}'}; results in {out_dir}"
    )
