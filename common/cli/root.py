"""The root `fedscan` command: its Typer app, the two consoles, --version and --verbose, and how a
problem a user can fix is shown (plainly, without a traceback)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedscan.common import __version__
from fedscan.common.errors import FedscanError

console = Console(stderr=True)  # progress, stages, errors
out_console = Console()  # results

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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages."),
) -> None:
    _setup_logging(verbose)
