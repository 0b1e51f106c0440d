"""`fedscan report`: a run's report files rebuilt from its report.json."""

from __future__ import annotations

from pathlib import Path

import typer

from fedscan.common.cli.root import app, out_console, user_errors


@app.command("report")
def report_cmd(
    out: Path = typer.Argument(..., help="A run's output folder, holding its report.json."),
) -> None:
    """Rebuild a run's report files from its report.json.

    Rewrites report.md, per_site.csv, report.html (one self-contained page, figures
    embedded) and the figures in OUT/figures from OUT/report.json; report.json is not changed.
    """
    with user_errors():
        from fedscan.server.report import regenerate_report

        for path in regenerate_report(out):
            out_console.print(f"wrote {path}", highlight=False)
