"""Run reports: per-site history and final results as report.json, per_site.csv, report.md.

The metrics are the run task's (``fedscan.common.tasks``): Dice and friends for
segmentation, balanced accuracy, AUROC and friends for classification. Each hospital counts
once: ``mean`` is the unweighted mean over sites, and ``worst`` is the site with the lowest
main metric (Dice, or balanced accuracy). A metric that is undefined at a site (NaN) is written as
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
from fedscan.common.config import EXAM_MODELS, AppConfig
from fedscan.common.tasks.registry import task_metrics
from fedscan.server.checkpoint import atomic_write_bytes

REPORT_JSON = "report.json"
PER_SITE_CSV = "per_site.csv"
REPORT_MD = "report.md"

# How report.md labels the metrics; metrics not listed keep their own name.
_TITLES = {
    "dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "lesion_sensitivity": "lesion sensitivity",
    "lesion_fp_per_image": "lesion FP / image", "auroc": "AUROC",
    "balanced_accuracy": "balanced accuracy", "sensitivity": "sensitivity",
    "specificity": "specificity", "f1": "F1", "accuracy": "accuracy",
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def columns(task: str) -> tuple[str, ...]:
    """The per-site columns of a task's report, in order."""
    return (*task_metrics(task)[0], "loss", "num_examples")


def site_row(metrics: dict[str, float], task: str = "segmentation") -> dict[str, Any]:
    """A site's metrics under the report's names (``num-examples`` -> ``num_examples``).

    The task's metrics come first, in its order; other scalar metrics the site sent (for
    example per-class values) follow, sorted by name.
    """
    row: dict[str, Any] = {}
    cols = columns(task)
    extra = sorted(k for k in metrics if k.replace("-", "_") not in cols)
    for key in (*cols, *extra):
        src = "num-examples" if key == "num_examples" else key
        if src in metrics:
            val = metrics[src]
            row[key] = int(val) if key == "num_examples" else _clean(float(val))
    return row


def summarize(per_site: dict[str, dict[str, Any]], task: str = "segmentation") -> dict[str, Any]:
    """``mean`` over sites of each metric, and the ``worst`` site by the main metric."""
    names, main = task_metrics(task)
    mean: dict[str, Any] = {}
    keys = [k for r in per_site.values() for k in r if k != "num_examples"]
    for m in dict.fromkeys([*names, "loss", *keys]):
        vals = [r[m] for r in per_site.values() if r.get(m) is not None]
        mean[m] = sum(vals) / len(vals) if vals else None
    scored = [(r[main], s) for s, r in per_site.items() if r.get(main) is not None]
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
        # simulation knows its sites up front; a deployment learns them from the replies
        self.sites: list[str] = list(cfg.site_names)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def record_round(self, server_round: int, per_site: dict[str, dict[str, float]],
                     timing: dict[str, Any] | None = None,
                     aggregation: dict[str, Any] | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "round": server_round,
            "per_site": {s: site_row(m, self.cfg.run.task) for s, m in sorted(per_site.items())},
        }
        if timing:
            entry["timing"] = timing
        if aggregation:
            entry["aggregation"] = aggregation
        self.sites += sorted(s for s in per_site if s not in self.sites)
        missing = [s for s in self.sites if s not in per_site]
        if missing:  # a site that failed or dropped out is named, not silently absent
            entry["missing_sites"] = missing
        self.history = [h for h in self.history if h["round"] != server_round] + [entry]
        return summarize(entry["per_site"], self.cfg.run.task)

    def report(self, status: str) -> dict[str, Any]:
        run = self.cfg.run
        _, main = task_metrics(run.task)
        final = summarize(self.history[-1]["per_site"] if self.history else {}, run.task)
        return {
            "fedscan_version": __version__,
            "status": status,
            "task": run.task,
            "model": run.model,
            "strategy": run.strategy,
            "secagg": run.secagg,
            "rounds": run.rounds,
            "rounds_completed": len(self.history),
            "seed": run.seed,
            "sites": list(self.sites),
            "started": self.started,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": {"main": main, "names": list(task_metrics(run.task)[0]),
                        "mean": "unweighted over sites", "undefined": "null",
                        **({"hd95_unit": "mm"} if run.task == "segmentation" else {})},
            "history": self.history,
            "final": final,
        }

    def write(self, status: str = "running") -> dict[str, Any]:
        rep = self.report(status)
        write_report_files(self.out, rep)
        return rep


def write_report_files(out: Path, rep: dict[str, Any]) -> None:
    """report.json, per_site.csv and report.md, each written atomically."""
    atomic_write_bytes(Path(out) / REPORT_JSON, (json.dumps(rep, indent=2) + "\n").encode())
    atomic_write_bytes(Path(out) / PER_SITE_CSV, per_site_csv(rep).encode())
    atomic_write_bytes(Path(out) / REPORT_MD, report_markdown(rep).encode())


def per_site_csv(rep: dict[str, Any]) -> str:
    cols = list(columns(rep["task"]))
    for h in rep["history"]:  # per-class or other extra metrics, after the task's own
        for row in h["per_site"].values():
            cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["round", "site", *cols])
    for h in rep["history"]:
        for site, row in h["per_site"].items():
            writer.writerow([h["round"], site, *("" if row.get(c) is None else row[c] for c in cols)])
    return buf.getvalue()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _secagg_lines(rep: dict[str, Any]) -> list[str]:
    if not rep.get("secagg"):
        return ["- secure aggregation: off (the server saw each site's update)"]
    counts = [(h["round"], h.get("aggregation", {}).get("sites_aggregated")) for h in rep["history"]]
    lines = ["- secure aggregation (SecAgg+): on; the server saw only the sum of the sites' updates"]
    if counts:
        lines[0] += "; sites in each round's sum: " + ", ".join(_fmt(n) for _, n in counts)
    failed = [str(r) for r, n in counts if n == 0]
    if failed:
        lines.append(f"- round(s) {', '.join(failed)}: too few sites finished the secure aggregation; "
                     "the global model did not change")
    return lines


def report_markdown(rep: dict[str, Any]) -> str:
    final = rep["final"]
    task = rep["task"]
    names, main = task_metrics(task)
    unit = "validation slices"
    if task == "classification":
        unit = "validation exams" if rep["model"] in EXAM_MODELS else "validation images"
    lines = [
        "# fedscan run report",
        "",
        f"- task: **{task}**, model: **{rep['model']}**, strategy: **{rep['strategy']}**",
        f"- rounds: {rep['rounds_completed']} of {rep['rounds']} completed ({rep['status']}), seed {rep['seed']}",
        f"- sites: {', '.join(rep['sites'])}",
        *_secagg_lines(rep),
        "",
        "## Final global model, evaluated at each site",
        "",
        "| site | " + " | ".join(_TITLES.get(m, m) for m in names) + f" | {unit} |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    digits = {"hd95": 1}
    for site, row in final["per_site"].items():
        vals = [_fmt(row.get(m), digits.get(m, 3)) for m in names]
        lines.append(f"| {site} | " + " | ".join(vals) + f" | {_fmt(row.get('num_examples'))} |")
    mean = final["mean"]
    lines.append("| **mean** | " + " | ".join(_fmt(mean.get(m), digits.get(m, 3)) for m in names) + " | |")
    if any(row.get(m) is None for row in final["per_site"].values() for m in names):
        lines += ["", ("n/a: undefined at that site (for example AUROC on a validation set holding "
                       "one class, or Dice without any lesion); left out of the mean.")]
    worst = final["worst"]
    if worst:
        lines += ["", f"Worst site: **{worst['site']}** ({_TITLES.get(main, main)} {_fmt(worst.get(main))})."]
    if rep["history"]:
        sites = rep["sites"] or sorted(rep["history"][-1]["per_site"])
        lines += ["", f"## {_TITLES.get(main, main)} per round", "",
                  "| round | " + " | ".join(sites) + " | mean |",
                  "| ---: | " + " | ".join("---:" for _ in sites) + " | ---: |"]
        for h in rep["history"]:
            vals = [h["per_site"].get(s, {}).get(main) for s in sites]
            m = summarize(h["per_site"], task)["mean"][main]
            lines.append(f"| {h['round']} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(m)} |")
    lines.append("")
    return "\n".join(lines)
