"""The `fedscan` command, one module per command group: ``synth``, ``simulate``, ``run``,
``report``, ``server`` and ``site``, each adding its commands to the root app (``root``);
``run_options`` and ``run_display`` are what `simulate` and `run` share. Importing this package
registers every command; ``main`` is the console script's entry point."""

from __future__ import annotations

import importlib

from fedscan.common.cli.root import app

__all__ = ["app", "main"]

# the command modules, in the order `fedscan --help` lists their commands
COMMAND_MODULES = ("synth", "simulate", "run", "report", "server", "site")
for _module in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_module}")


def main() -> None:
    """Entry point of the `fedscan` console script."""
    app()
