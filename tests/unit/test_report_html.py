"""The report files: report.md's optional sections, the figures, report.html and `fedscan report`."""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from typer.testing import CliRunner

from fedscan.common.cli import app
from fedscan.server import figures
from fedscan.server.report import ReportWriter, cross_site_table, summarize, write_report_files

SITES = ["site-a", "site-b", "site-c", "<b>bold</b>"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EMBEDDED = "data:image/png;base64,"


def seg_row(dice: float, n: int) -> dict[str, Any]:
    return {
        "dice": dice,
        "iou": dice * 0.8,
        "hd95": 10.0 - 5 * dice,
        "lesion_sensitivity": dice,
        "lesion_fp_per_image": 0.5,
        "loss": 1.0 - dice,
        "num_examples": n,
    }


def build_report(strategy: str = "fedbn") -> dict[str, Any]:
    """A segmentation run of 4 sites and 3 rounds with every optional key, as report.json holds it."""
    history = []
    for r in (1, 2, 3):
        per_site = {s: seg_row(0.2 * r + 0.05 * i, 10 + i) for i, s in enumerate(SITES)}
        history.append({"round": r, "per_site": per_site, "timing": {"round_s": 12.0}})
    metrics = ("dice", "iou", "hd95", "lesion_sensitivity", "lesion_fp_per_image")

    def cell(dice: float | None) -> dict[str, float | None]:
        return {m: None if dice is None else (dice if m != "hd95" else 4.0) for m in metrics}

    cross: dict[str, dict[str, dict[str, float | None]]] = {
        "global": {s: cell(0.70 + 0.02 * i) for i, s in enumerate(SITES)},
        "pooled": {s: cell(0.80 + 0.01 * i) for i, s in enumerate(SITES)},
    }
    for s in SITES:
        cross[f"local:{s}"] = {t: cell(0.60 if t == s else 0.30 + 0.01 * j) for j, t in enumerate(SITES)}
        cross[f"personalized:{s}"] = {t: cell(0.75 if t == s else None) for t in SITES}
    cross["local:site-c"]["site-c"] = cell(0.912)  # site-c does better alone
    gain = {s: round(0.75 - cross[f"local:{s}"][s]["dice"], 6) for s in SITES}  # type: ignore[operator]
    return {
        "fedscan_version": "0.1.0",
        "status": "complete",
        "task": "segmentation",
        "model": "unet",
        "strategy": strategy,
        "secagg": False,
        "rounds": 3,
        "rounds_completed": 3,
        "seed": 0,
        "sites": SITES,
        "started": "2025-01-01T00:00:00+00:00",
        "updated": "2025-01-01T00:10:00+00:00",
        "metrics": {
            "main": "dice",
            "names": list(metrics),
            "mean": "unweighted over sites",
            "undefined": "null",
            "hd95_unit": "mm",
        },
        "history": history,
        "final": summarize(history[-1]["per_site"]),
        "cross_site": cross,
        "federated_gain": gain,
        "federated_gain_model": {s: f"personalized:{s}" for s in SITES},
        "baselines": {
            "steps_per_site": {s: 100 + 10 * i for i, s in enumerate(SITES)},
            "pooled_steps": 460,
            "note": "same optimizer and epochs as the federated run",
        },
        "quality": {
            s: {
                "snr": 12.5 + i,
                "quality_factor": 0.9 - 0.1 * i,
                "weight_share": 0.25,
                "train_images": 40 + i,
            }
            for i, s in enumerate(SITES)
        },
        "strategy_comparison": {
            "fedavg": {s: 0.70 + 0.01 * i for i, s in enumerate(SITES)},
            "fedbn": {s: 0.75 for s in SITES},
        },
    }


def test_write_report_files_writes_all_files_and_figures(tmp_path: Path) -> None:
    written = write_report_files(tmp_path, build_report())
    names = [
        "report.json",
        "per_site.csv",
        "report.md",
        "report.html",
        "figures/curves.png",
        "figures/cross_site.png",
        "figures/quality.png",
    ]
    for name in names:
        assert (tmp_path / name).is_file(), name
    assert sorted(written) == sorted(tmp_path / n for n in names)
    for name in ("curves.png", "cross_site.png", "quality.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        img = matplotlib.image.imread(tmp_path / "figures" / name)
        h, w, channels = img.shape
        assert 200 <= h <= 1200 and 300 <= w <= 1600 and channels in (3, 4), (name, img.shape)
    # no temporary files left behind by the atomic writes
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


def test_html_is_self_contained_and_embeds_each_figure(tmp_path: Path) -> None:
    write_report_files(tmp_path, build_report())
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count(EMBEDDED) == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    # the embedded images are the figures written to figures/
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(s) for s in srcs) == sorted(
        (tmp_path / "figures" / n).read_bytes() for n in ("curves.png", "cross_site.png", "quality.png")
    )
    heatmap = re.search(r'<img id="cross-site-heatmap" src="data:image/png;base64,([^"]+)"', page)
    assert (
        heatmap and base64.b64decode(heatmap.group(1)) == (tmp_path / "figures/cross_site.png").read_bytes()
    )
    for heading in (
        "Final personalized models (FedBN",
        "Cross-site evaluation",
        "Federated gain per site",
        "Site quality",
        "Baselines",
        "Strategy comparison",
    ):
        assert heading in page


def test_site_names_are_escaped_in_html(tmp_path: Path) -> None:
    write_report_files(tmp_path, build_report())
    page = (tmp_path / "report.html").read_text()
    assert "<b>bold</b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>" not in page


def test_negative_gain_is_flagged_in_md_and_html(tmp_path: Path) -> None:
    write_report_files(tmp_path, build_report())
    md = (tmp_path / "report.md").read_text()
    assert "## Federated gain per site" in md
    assert "| site-c | ⚠ -0.162 | personalized:site-c |" in md
    assert "| site-a | +0.150 | personalized:site-a |" in md
    assert "⚠ Joining the federation did not help site-c" in md
    assert md.count("did not help") == 1
    page = (tmp_path / "report.html").read_text()
    assert page.count("Joining the federation did not help") == 1
    assert re.search(r'<tr class="warn"><td>site-c</td><td><span class="warn"[^>]*>&#9888; -0\.162', page)
    assert "Joining the federation did not help site-c: its own local model scores 0.162 Dice" in page


def test_md_cross_site_table_holds_the_heatmap_values(tmp_path: Path) -> None:
    rep = build_report()
    write_report_files(tmp_path, rep)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Cross-site evaluation", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert (
        header == "| model | site-a | site-b | site-c | &lt;b&gt;bold&lt;/b&gt; | mean |"
    )  # no raw HTML in report.md
    order = [html.unescape(r.split(" | ")[0][2:]) for r in body]
    assert order == [
        "global",
        *(f"personalized:{s}" for s in sorted(SITES)),
        "pooled",
        *(f"local:{s}" for s in sorted(SITES)),
    ]
    # the values the heatmap writes in its cells, as the table shows them
    models, sites, values = cross_site_table(rep)
    for model, row in zip(models, values, strict=True):
        line = next(r for r in body if html.unescape(r).startswith(f"| {model} |"))
        cells = line.strip("| ").split(" | ")[1:-1]
        assert cells == ["n/a" if v is None else f"{v:.3f}" for v in row]
    assert "| global | 0.700 | 0.720 | 0.740 | 0.760 | 0.730 |" in md
    assert "0.912" in section
    # the other optional sections
    assert "| site-a | 12.5 | 0.900 | 25.0% | 40 |" in md
    assert "Baselines: local models trained for 100 steps at site-a" in md and "pooled model for 460" in md
    assert "| fedbn | 0.750 | 0.750 | 0.750 | 0.750 | 0.750 | 0.750 |" in md


def test_report_without_optional_keys_is_unchanged(tmp_path: Path) -> None:
    rep = build_report()
    for key in (
        "cross_site",
        "federated_gain",
        "federated_gain_model",
        "baselines",
        "quality",
        "strategy_comparison",
    ):
        rep.pop(key)
    written = write_report_files(tmp_path, rep)
    md = (tmp_path / "report.md").read_text()
    assert md.rstrip().endswith("| 3 | 0.600 | 0.650 | 0.700 | 0.750 | 0.675 |")
    assert not (tmp_path / "figures/cross_site.png").exists()
    assert not (tmp_path / "figures/quality.png").exists()
    assert tmp_path / "figures/curves.png" in written
    assert (tmp_path / "report.html").read_text().count(EMBEDDED) == 1


def test_figure_failure_still_writes_the_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(rep: dict[str, Any]) -> bytes:
        raise RuntimeError("no canvas today")

    write_report_files(tmp_path, build_report())  # an earlier round drew it
    assert (tmp_path / "figures/cross_site.png").is_file()
    monkeypatch.setattr(figures, "cross_site_png", broken)
    with caplog.at_level(logging.WARNING, logger="fedscan.server.report"):
        write_report_files(tmp_path, build_report())
    assert "cross_site.png not drawn" in caplog.text and "no canvas today" in caplog.text
    assert json.loads((tmp_path / "report.json").read_text())["rounds_completed"] == 3
    assert "## Cross-site evaluation" in (tmp_path / "report.md").read_text()
    # no stale heatmap left beside the new report
    assert (tmp_path / "figures/curves.png").is_file() and not (tmp_path / "figures/cross_site.png").exists()
    page = (tmp_path / "report.html").read_text()
    assert page.count(EMBEDDED) == 2 and 'id="cross-site-heatmap"' not in page
    assert "Cross-site evaluation" in page  # the table is still there


def test_figures_cope_with_awkward_values() -> None:
    rep = build_report()
    rep["sites"] = ["$x$", "a_b", "50%"]
    rep["history"] = [{"round": 1, "per_site": {"$x$": {"dice": None}, "a_b": {"dice": 0.5}}}]
    rep["cross_site"] = {"global": {"$x$": {"dice": None}, "a_b": {"dice": 0.5}, "50%": {}}}
    rep["quality"] = {"$x$": {"snr": None, "quality_factor": None}}
    assert figures.curves_png(rep).startswith(PNG_MAGIC)  # type: ignore[union-attr]
    assert figures.cross_site_png(rep).startswith(PNG_MAGIC)  # type: ignore[union-attr]
    assert figures.quality_png(rep) is None  # nothing to draw


def _output(result: Any) -> str:
    return " ".join(result.output.split())


def test_report_command_regenerates_files(tmp_path: Path) -> None:
    write_report_files(tmp_path, build_report())
    before = (tmp_path / "report.json").read_bytes()
    derived = [
        "report.md",
        "per_site.csv",
        "report.html",
        "figures/curves.png",
        "figures/cross_site.png",
        "figures/quality.png",
    ]
    md = (tmp_path / "report.md").read_text()
    for name in derived:
        (tmp_path / name).unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in derived:
        assert (tmp_path / name).is_file(), name
    assert result.output.count("wrote ") == len(derived)
    assert Path(tmp_path.name, "figures").as_posix() in result.output.replace("\n", "")
    assert (tmp_path / "report.json").read_bytes() == before
    assert (tmp_path / "report.md").read_text() == md
    assert (tmp_path / "report.html").read_text().count(EMBEDDED) == 3


def test_report_command_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such folder" in _output(result)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "report.json does not exist" in _output(result)
    (tmp_path / "report.json").write_text('{"task": "segmentation", "history": [')
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not valid JSON" in _output(result)
    assert "Traceback" not in result.output
    (tmp_path / "report.json").write_text('{"task": "segmentation"}')
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a fedscan report" in _output(result)
    assert not (tmp_path / "report.md").exists()


def test_a_running_report_redraws_its_derived_files_at_most_every_refresh(tmp_path: Path) -> None:
    """report.json follows every update; report.md and the figures at most every refresh_s while
    the run goes on, and always at its end."""
    now = [0.0]
    write = ReportWriter(tmp_path, refresh_s=10.0, clock=lambda: now[0])
    rep = build_report()
    full = write({**rep, "status": "running", "rounds_completed": 1})
    assert {p.name for p in full} >= {"report.json", "report.md", "report.html", "per_site.csv"}
    md_first = (tmp_path / "report.md").read_text()

    now[0] = 5.0
    assert [p.name for p in write({**rep, "status": "running", "rounds_completed": 2})] == ["report.json"]
    assert json.loads((tmp_path / "report.json").read_text())["rounds_completed"] == 2
    assert (tmp_path / "report.md").read_text() == md_first  # not yet redrawn

    now[0] = 10.0
    assert "report.md" in {p.name for p in write({**rep, "status": "running", "rounds_completed": 3})}
    now[0] = 11.0
    ended = write({**rep, "status": "complete", "rounds_completed": 3})
    assert {"report.md", "report.html"} <= {p.name for p in ended}
    assert (tmp_path / "report.md").read_text() != md_first
