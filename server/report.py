"""Run reports: per-site history and final results as report.json, per_site.csv, report.md.

Each hospital counts once: ``mean`` is the unweighted mean over sites, and ``worst`` is
the site with the lowest Dice. A metric that is undefined at a site (NaN) is written as
null in JSON, empty in CSV and "n/a" in Markdown, and left out of the mean.
The files are rewritten after every round, each atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedscan.common import __version__
from fedscan.common.config import AppConfig
from fedscan.common.tasks.segmentation import METRICS
from fedscan.server.checkpoint import atomic_write_bytes

REPORT_JSON = "report.json"
PER_SITE_CSV = "per_site.csv"
REPORT_MD = "report.md"
COLUMNS = (*METRICS, "loss", "num_examples")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def site_row(metrics: dict[str, float]) -> dict[str, Any]:
    """A site's metrics under the report's names (``num-examples`` -> ``num_examples``)."""
    row: dict[str, Any] = {}
    for key in COLUMNS:
        src = "num-examples" if key == "num_examples" else key
        if src in metrics:
            val = metrics[src]
            row[key] = int(val) if key == "num_examples" else _clean(float(val))
    return row


def summarize(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``mean`` over sites of each metric, and the ``worst`` site by Dice with its metrics."""
    mean: dict[str, Any] = {}
    for m in (*METRICS, "loss"):
        vals = [r[m] for r in per_site.values() if r.get(m) is not None]
        mean[m] = sum(vals) / len(vals) if vals else None
    scored = [(r["dice"], s) for s, r in per_site.items() if r.get("dice") is not None]
    worst: dict[str, Any] = {}
    if scored:
        site = min(scored)[1]
        worst = {"site": site, **{k: v for k, v in per_site[site].items() if k != "num_examples"}}
    return {"per_site": per_site, "mean": mean, "worst": worst}


class RunRecorder:
    """Collects per-round, per-site results and writes the report files."""

    def __init__(self, out: Path, cfg: AppConfig) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def record_round(self, server_round: int, per_site: dict[str, dict[str, float]]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "round": server_round,
            "per_site": {s: site_row(m) for s, m in sorted(per_site.items())},
        }
        missing = [s for s in self.cfg.site_names if s not in per_site]
        if missing:  # a site that failed or dropped out is named, not silently absent
            entry["missing_sites"] = missing
        self.history = [h for h in self.history if h["round"] != server_round] + [entry]
        return summarize(entry["per_site"])

    def report(self, status: str) -> dict[str, Any]:
        run = self.cfg.run
        final = summarize(self.history[-1]["per_site"]) if self.history else summarize({})
        return {
            "fedscan_version": __version__,
            "status": status,
            "task": run.task,
            "model": run.model,
            "strategy": run.strategy,
            "rounds": run.rounds,
            "rounds_completed": len(self.history),
            "seed": run.seed,
            "sites": list(self.cfg.site_names),
            "started": self.started,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": {"main": "dice", "hd95_unit": "mm", "mean": "unweighted over sites"},
            "history": self.history,
            "final": final,
        }

    def write(self, status: str = "running") -> dict[str, Any]:
        rep = self.report(status)
        atomic_write_bytes(self.out / REPORT_JSON, (json.dumps(rep, indent=2) + "\n").encode())
        atomic_write_bytes(self.out / PER_SITE_CSV, per_site_csv(rep).encode())
        atomic_write_bytes(self.out / REPORT_MD, report_markdown(rep).encode())
        return rep


def per_site_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["round", "site", *COLUMNS])
    for h in rep["history"]:
        for site, row in h["per_site"].items():
            writer.writerow([h["round"], site, *("" if row.get(c) is None else row[c] for c in COLUMNS)])
    return buf.getvalue()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def report_markdown(rep: dict[str, Any]) -> str:
    final = rep["final"]
    lines = [
        "# fedscan run report",
        "",
        f"- task: **{rep['task']}**, model: **{rep['model']}**, strategy: **{rep['strategy']}**",
        f"- rounds: {rep['rounds_completed']} of {rep['rounds']} completed ({rep['status']}), seed {rep['seed']}",
        f"- sites: {', '.join(rep['sites'])}",
        "",
        "## Final global model, evaluated at each site",
        "",
        "| site | Dice | IoU | HD95 (mm) | validation slices |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for site, row in final["per_site"].items():
        lines.append(
            f"| {site} | {_fmt(row.get('dice'))} | {_fmt(row.get('iou'))} | "
            f"{_fmt(row.get('hd95'), 1)} | {_fmt(row.get('num_examples'))} |"
        )
    mean = final["mean"]
    lines.append(
        f"| **mean** | {_fmt(mean.get('dice'))} | {_fmt(mean.get('iou'))} | {_fmt(mean.get('hd95'), 1)} | |"
    )
    worst = final["worst"]
    if worst:
        lines += ["", f"Worst site: **{worst['site']}** (Dice {_fmt(worst.get('dice'))})."]
    if rep["history"]:
        sites = rep["sites"] or sorted(rep["history"][-1]["per_site"])
        lines += ["", "## Dice per round", "", "| round | " + " | ".join(sites) + " | mean |",
                  "| ---: | " + " | ".join("---:" for _ in sites) + " | ---: |"]
        for h in rep["history"]:
            vals = [h["per_site"].get(s, {}).get("dice") for s in sites]
            m = summarize(h["per_site"])["mean"]["dice"]
            lines.append(f"| {h['round']} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(m)} |")
    lines.append("")
    return "\n".join(lines)
