"""Run reports: per-site history and final results as report.json, per_site.csv, report.md,
report.html and figures/*.png.

The metrics are the run task's (``fedscan.common.tasks``): Dice and friends for
segmentation, balanced accuracy, AUROC and friends for classification. Each hospital counts
once: ``mean`` is the unweighted mean over sites, and ``worst`` is the site with the lowest
main metric (Dice, or balanced accuracy). A metric that is undefined at a site (NaN) is written as
null in JSON, empty in CSV and "n/a" in Markdown, and left out of the mean.
The files are rewritten after every round, each atomically. The figures (``server/figures.py``)
are best effort: a figure that cannot be drawn is logged and left out, never failing the run.

Optional report.json keys, rendered when present: ``cross_site`` (each model's metrics at each
site), ``federated_gain`` and ``federated_gain_model`` (the federated model's main metric at a
site minus the site's own local model's), ``baselines`` (how the local and pooled models were
trained), ``quality`` (each site's quality profile summary) and ``strategy_comparison`` (the
main metric per strategy and site, merged from several runs).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedscan.common import __version__
from fedscan.common.atomic import atomic_write_bytes
from fedscan.common.config import EXAM_MODELS, AppConfig
from fedscan.common.errors import FedscanError
from fedscan.common.report_schema import RunReport
from fedscan.common.tasks.registry import SCORE_TITLES, task_metrics, task_scores

REPORT_JSON = "report.json"
PER_SITE_CSV = "per_site.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"

log = logging.getLogger(__name__)

# How report.md labels the metrics; metrics not listed keep their own name.
_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "hd95": "HD95 (mm)",
    "lesion_sensitivity": "lesion sensitivity",
    "lesion_fp_per_image": "lesion FP / image",
    "auroc": "AUROC",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
    "accuracy": "accuracy",
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


def explanation_scores(per_site: dict[str, dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """The shareable explanation scores each site sent with its final evaluation (single numbers)."""
    names = task_scores(task)
    return {
        site: {k: row[k] for k in names if k in row}
        for site, row in per_site.items()
        if any(k in row for k in names)
    }


class RunRecorder:
    """Collects per-round, per-site results and writes the report files."""

    def __init__(self, out: Path, cfg: AppConfig) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        # simulation knows its sites up front; a deployment learns them from the replies
        self.sites: list[str] = list(cfg.site_names)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def record_round(
        self,
        server_round: int,
        per_site: dict[str, dict[str, float]],
        timing: dict[str, Any] | None = None,
        aggregation: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
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
        if aggregation and "sites_trained" in aggregation:  # plaintext: whose update is in the model
            trained = set(aggregation["sites_trained"])
            untrained = [s for s in self.sites if s not in trained]
            if untrained:  # failed, timed out or rejected: this round's model is the others'
                entry["missed_training"] = untrained
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
            "metrics": {
                "main": main,
                "names": list(task_metrics(run.task)[0]),
                "mean": "unweighted over sites",
                "undefined": "null",
                **({"hd95_unit": "mm"} if run.task == "segmentation" else {}),
            },
            "history": self.history,
            "final": final,
            # the sites' explanation scores, once the final round is in
            **(
                {"explanation_scores": scores}
                if self.history
                and self.history[-1]["round"] >= run.rounds
                and (scores := explanation_scores(final["per_site"], run.task))
                else {}
            ),
        }

    def write(self, status: str = "running") -> dict[str, Any]:
        rep = self.report(status)
        write_report_files(self.out, rep)
        return rep


DERIVED_REFRESH_S = 10.0  # the most a running report's derived files lag behind its report.json


class ReportWriter:
    """Writes a run's report files each time its report changes: report.json every time; while
    the run goes on (status "running"), the files made from it (report.md, per_site.csv, the
    figures, report.html) at most every ``refresh_s`` seconds, since drawing the figures costs
    about 0.3 s, a tenth of a small simulated round; at a run's end (any other status), all."""

    def __init__(
        self, out: Path, refresh_s: float = DERIVED_REFRESH_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.out = Path(out)
        self.refresh_s = refresh_s
        self.clock = clock
        self._derived_at: float | None = None

    def __call__(self, rep: dict[str, Any]) -> list[Path]:
        now = self.clock()
        derived = (
            rep.get("status") != "running"
            or self._derived_at is None
            or now - self._derived_at >= self.refresh_s
        )
        if derived:
            self._derived_at = now
        return write_report_files(self.out, rep, derived=derived)


def write_report_files(out: Path, rep: dict[str, Any], *, derived: bool = True) -> list[Path]:
    """report.json, then (unless ``derived`` is off) everything made from it (see
    :func:`write_derived_files`), each atomically. Returns the paths written.
    """
    path = Path(out) / REPORT_JSON
    atomic_write_bytes(path, (json.dumps(rep, indent=2) + "\n").encode())
    return [path, *(write_derived_files(out, rep) if derived else [])]


def write_derived_files(out: Path, rep: dict[str, Any]) -> list[Path]:
    """per_site.csv, report.md, figures/*.png and report.html from a report, each atomically.

    A figure that cannot be drawn is logged as a warning and left out of report.html; the other
    files are still written. A figure with nothing to show (no cross-site matrix, say) or that
    failed is removed, so that figures/ never holds one from an earlier report. Returns the paths
    written.
    """
    from fedscan.server.report_html import report_html

    out = Path(out)
    written: list[Path] = []
    for name, text in ((PER_SITE_CSV, per_site_csv(rep)), (REPORT_MD, report_markdown(rep))):
        atomic_write_bytes(out / name, text.encode())
        written.append(out / name)
    figures = render_figures(rep)
    for name, data in figures.items():
        if data is None:
            (out / FIGURES_DIR / name).unlink(missing_ok=True)
            continue
        atomic_write_bytes(out / FIGURES_DIR / name, data)
        written.append(out / FIGURES_DIR / name)
    drawn = {name: data for name, data in figures.items() if data is not None}
    atomic_write_bytes(out / REPORT_HTML, report_html(rep, drawn).encode())
    written.append(out / REPORT_HTML)
    return written


def render_figures(rep: dict[str, Any]) -> dict[str, bytes | None]:
    """The report's figures as PNG bytes by file name; ``None`` for a figure with nothing to show.

    Never raises for a figure: one that fails is logged and ``None``; without matplotlib, none.
    """
    try:
        from fedscan.server import figures
    except Exception as exc:  # matplotlib missing or broken: the text reports still matter
        log.warning("report figures skipped: matplotlib could not be loaded (%s)", exc)
        return {}
    drawn: dict[str, bytes | None] = {}
    for name, func in figures.FIGURES.items():
        try:
            drawn[name] = getattr(figures, func)(rep)
        except Exception as exc:  # a figure must never fail the run
            log.warning("report figure %s not drawn: %s: %s", name, type(exc).__name__, exc)
            log.debug("figure %s failed", name, exc_info=True)
            drawn[name] = None
    return drawn


def load_report(out: Path) -> dict[str, Any]:
    """A run's report.json, checked against :class:`RunReport`; a problem is a :class:`FedscanError`."""
    out = Path(out)
    hint = "give the output folder of a run: the --out of `fedscan simulate` or `fedscan run`"
    if not out.exists():
        raise FedscanError(f"{out}: no such folder", hint=hint)
    if not out.is_dir():
        raise FedscanError(f"{out} is not a folder", hint=hint)
    path = out / REPORT_JSON
    if not path.is_file():
        raise FedscanError(f"{path} does not exist; a run writes it after its first round", hint=hint)
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedscanError(
            f"{path} is not valid JSON ({exc})",
            hint="the file is damaged; a run rewrites it after every round, or rerun the run",
        ) from None
    if not isinstance(rep, dict):
        raise FedscanError(
            f"{path} is not a fedscan report: it holds a JSON {type(rep).__name__}, not an object"
        )
    metrics = rep.get("metrics")
    if "task" in rep and "metrics" in rep and not (isinstance(metrics, dict) and "main" in metrics):
        names, main = task_metrics(str(rep["task"]))  # an unknown task is a FedscanError
        rep["metrics"] = {"main": main, "names": list(names)}
    try:
        report = RunReport.model_validate(rep)
    except ValidationError as err:
        missing = [str(e["loc"][0]) for e in err.errors() if e["type"] == "missing" and len(e["loc"]) == 1]
        if missing:
            raise FedscanError(f"{path} is not a fedscan report: it lacks {', '.join(missing)}") from None
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FedscanError(
            f"{path} is not a fedscan report: {where}: {first['msg']}",
            hint="it may come from another fedscan version; rerun the run to write it again",
        ) from None
    task_metrics(report.task)  # an unknown task is a FedscanError
    return report.as_dict()


def regenerate_report(out: Path) -> list[Path]:
    """Rewrite per_site.csv, report.md, report.html and figures/ from OUT/report.json."""
    rep = load_report(out)
    try:
        return write_derived_files(out, rep)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FedscanError(
            f"{Path(out) / REPORT_JSON} does not have the shape of a fedscan report "
            f"({type(exc).__name__}: {exc})",
            hint="it may come from another fedscan version; rerun the run to write it again",
        ) from None


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
        lines.append(
            f"- round(s) {', '.join(failed)}: too few sites finished the secure aggregation; "
            "the global model did not change"
        )
    return lines


def metric_title(name: str) -> str:
    """How the reports label a metric."""
    return _TITLES.get(name, name)


def number(value: Any) -> float | None:
    """A finite real number as a float; anything else (null, NaN, text) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def mean_of(values: list[Any]) -> float | None:
    """The unweighted mean of the defined values, None when there are none."""
    vals = [v for v in map(number, values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def model_order(keys: Any) -> list[str]:
    """Cross-site model keys in report order: global, personalized:*, pooled, local:*, then others."""

    def rank(key: str) -> tuple[int, str]:
        if key == "global":
            return (0, "")
        if key.startswith("personalized:"):
            return (1, key)
        if key == "pooled":
            return (2, "")
        if key.startswith("local:"):
            return (3, key)
        return (4, key)

    return sorted(dict.fromkeys(str(k) for k in keys), key=rank)


def report_sites(rep: dict[str, Any], *tables: Any) -> list[str]:
    """The run's sites in its order, then other sites the tables ({row: {site: ...}}) name."""
    sites = [str(s) for s in dict.fromkeys(rep.get("sites") or [])]
    for table in tables:
        for row in (table or {}).values():
            if isinstance(row, dict):
                sites += [str(s) for s in row if str(s) not in sites]
    return sites


# What each kind of cross-site model is: (key prefix, how it is written, what it is).
MODEL_KINDS = (
    ("global", "global", "the federated model, trained across all sites"),
    (
        "personalized:",
        "personalized:<site>",
        "the federated model with that site's own normalization layers (FedBN)",
    ),
    (
        "pooled",
        "pooled",
        "one model trained on all sites' training data put together (a reference: "
        "a federation exists because this pooling is not allowed)",
    ),
    ("local:", "local:<site>", "trained on that site's training data alone"),
)


def model_kinds(models: list[str]) -> list[tuple[str, str]]:
    """(label, description) of each kind of model present in a cross-site matrix."""
    return [
        (label, text)
        for prefix, label, text in MODEL_KINDS
        if any(m == prefix or (prefix.endswith(":") and m.startswith(prefix)) for m in models)
    ]


def cross_site_table(rep: dict[str, Any]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Models (rows, in report order), sites (columns) and the main metric of each at each."""
    cross = rep.get("cross_site") or {}
    main = rep["metrics"]["main"]
    models = model_order(cross)
    sites = report_sites(rep, cross)
    values = []
    for model in models:
        row = found if isinstance(found := cross.get(model), dict) else {}
        cells = [row.get(s) for s in sites]
        values.append([number(c.get(main)) if isinstance(c, dict) else None for c in cells])
    return models, sites, values


def federated_gains(rep: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """(site, gain, federated model used) for each site with a federated gain, in site order."""
    gains = rep.get("federated_gain") or {}
    used = rep.get("federated_gain_model") or {}
    sites = [s for s in report_sites(rep, {"gain": gains}) if s in gains]
    return [(s, number(gains[s]), str(used.get(s, "global"))) for s in sites]


def gain_warning(site: str, gain: float, model: str, main: str) -> str:
    """The sentence that flags a site the federation did not help."""
    return (
        f"Joining the federation did not help {site}: its own local model scores {abs(gain):.3f} "
        f"{metric_title(main)} higher there than the federated model ({model})."
    )


# The quality columns: (key, title, format).
QUALITY_COLUMNS = (
    ("snr", "SNR", ".1f"),
    ("quality_factor", "quality factor", ".3f"),
    ("weight_share", "aggregation weight share", "%"),
    ("train_images", "training images", "d"),
)


def format_quality(value: Any, spec: str) -> str:
    v = number(value)
    if v is None:
        return "n/a"
    if spec == "%":
        return f"{100 * v:.1f}%"
    if spec == "d":
        return str(int(v))
    return f"{v:{spec}}"


def quality_table(rep: dict[str, Any]) -> tuple[list[tuple[str, str, str]], list[tuple[str, list[str]]]]:
    """The quality columns that hold a value somewhere, and a formatted row per site."""
    quality = rep.get("quality") or {}
    sites = [s for s in report_sites(rep, {"quality": quality}) if s in quality]
    cols = [
        c for c in QUALITY_COLUMNS if any(number((quality[s] or {}).get(c[0])) is not None for s in sites)
    ]
    rows = [(s, [format_quality((quality[s] or {}).get(key), spec) for key, _, spec in cols]) for s in sites]
    return cols, rows


def baselines_text(rep: dict[str, Any]) -> str:
    """One paragraph on how the local and pooled baselines were trained, '' without baselines."""
    base = rep.get("baselines") or {}
    parts = []
    steps = base.get("steps_per_site") or {}
    if steps:
        parts.append(
            "local models trained for "
            + ", ".join(f"{steps[s]} steps at {s}" for s in report_sites(rep, {"steps": steps}) if s in steps)
        )
    if base.get("pooled_steps") is not None:
        parts.append(f"the pooled model for {base['pooled_steps']} steps")
    text = ("Baselines: " + "; ".join(parts) + ".") if parts else ""
    if base.get("note"):
        text = f"{text} Note: {base['note']}".strip()
    return text


EXPLANATION_NOTE = (
    "Computed by each site on its own validation data with the final model; only these numbers left the "
    "site. Uncertainty AUROC: how well the test-time-augmentation uncertainty separates wrong voxels from "
    "right ones (0.5 is chance). Expected calibration error: the gap between confidence and accuracy (0 is "
    "calibrated). Grad-CAM energy in lesion: the share of the map inside the lesion, against the lesion's "
    "share of the image, what a map blind to the lesion would get (sites with lesion masks only)."
)


def explanation_table(rep: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """Score titles, and per site its explanation scores in that order."""
    scores = rep.get("explanation_scores") or {}
    names = list(dict.fromkeys(k for row in scores.values() if isinstance(row, dict) for k in row))
    rows = [
        (str(site), [number(row.get(k)) for k in names])
        for site, row in scores.items()
        if isinstance(row, dict)
    ]
    return [SCORE_TITLES.get(k, k) for k in names], rows


def strategy_comparison(rep: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """Sites and, per strategy, its main metric at each site."""
    comp = rep.get("strategy_comparison") or {}
    sites = report_sites(rep, comp)
    sites = [s for s in sites if any(isinstance(r, dict) and s in r for r in comp.values())]
    rows = [
        (str(name), [number((r if isinstance(r, dict) else {}).get(s)) for s in sites])
        for name, r in comp.items()
    ]
    return sites, rows


def _md_cell(text: Any) -> str:
    """Text for a Markdown table cell: no cell break, no line break, no raw HTML."""
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("|", "\\|")
        .replace("\n", " ")
        .replace("\r", " ")
    )


def _optional_sections(rep: dict[str, Any]) -> list[str]:
    """The Markdown of the optional report keys, each section only when its key is present."""
    main = rep["metrics"]["main"]
    title = metric_title(main)
    lines: list[str] = []
    if rep.get("cross_site"):
        models, sites, values = cross_site_table(rep)
        lines += [
            "",
            "## Cross-site evaluation",
            "",
            f"{title} of each model (rows) on each site's validation data (columns); the mean is "
            "unweighted over sites.",
            "",
        ]
        lines += [f"- `{label}`: {text}" for label, text in model_kinds(models)]
        lines += [
            "",
            "| model | " + " | ".join(_md_cell(s) for s in sites) + " | mean |",
            "| --- | " + " | ".join("---:" for _ in sites) + " | ---: |",
        ]
        for model, row in zip(models, values, strict=False):
            lines.append(
                f"| {_md_cell(model)} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(mean_of(row))} |"
            )
    gains = federated_gains(rep)
    if gains:
        lines += [
            "",
            "## Federated gain per site",
            "",
            f"{title} of the federated model at each site minus that of the site's own local model "
            "there: above 0, joining the federation helped the site.",
            "",
            "| site | gain | federated model |",
            "| --- | ---: | --- |",
        ]
        for site, gain, model in gains:
            val = "n/a" if gain is None else f"{gain:+.3f}"
            flag = "⚠ " if gain is not None and gain < 0 else ""
            lines.append(f"| {_md_cell(site)} | {flag}{val} | {_md_cell(model)} |")
        warnings = [gain_warning(s, g, m, main) for s, g, m in gains if g is not None and g < 0]
        if warnings:
            lines += [""] + [f"⚠ {w}" for w in warnings]
    if rep.get("quality"):
        cols, quality_rows = quality_table(rep)
        if quality_rows and cols:
            lines += [
                "",
                "## Site quality",
                "",
                "| site | " + " | ".join(t for _, t, _ in cols) + " |",
                "| --- | " + " | ".join("---:" for _ in cols) + " |",
            ]
            lines += [f"| {_md_cell(s)} | " + " | ".join(vals) + " |" for s, vals in quality_rows]
    if rep.get("explanation_scores"):
        head, rows = explanation_table(rep)
        lines += [
            "",
            "## Explanation scores",
            "",
            EXPLANATION_NOTE,
            "",
            "| site | " + " | ".join(head) + " |",
            "| --- | " + " | ".join("---:" for _ in head) + " |",
        ]
        lines += [f"| {_md_cell(site)} | " + " | ".join(_fmt(v) for v in vals) + " |" for site, vals in rows]
    text = baselines_text(rep)
    if text:
        lines += ["", "## Baselines", "", text]
    if rep.get("strategy_comparison"):
        sites, rows = strategy_comparison(rep)
        lines += [
            "",
            "## Strategy comparison",
            "",
            f"{title} of each strategy's federated model at each site.",
            "",
            "| strategy | " + " | ".join(_md_cell(s) for s in sites) + " | mean | worst |",
            "| --- | " + " | ".join("---:" for _ in sites) + " | ---: | ---: |",
        ]
        for name, vals in rows:
            defined = [v for v in vals if v is not None]
            lines.append(
                f"| {_md_cell(name)} | "
                + " | ".join(_fmt(v) for v in vals)
                + f" | {_fmt(mean_of(vals))} | {_fmt(min(defined) if defined else None)} |"
            )
    return lines


def evaluated_model(rep: dict[str, Any]) -> str:
    """What the sites evaluated each round: the global model, or under FedBN each site's own."""
    if rep.get("strategy") == "fedbn":
        return "personalized models (FedBN: the global model with each site's own normalization layers)"
    return "global model"


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
        f"- rounds: {rep['rounds_completed']} of {rep['rounds']} completed ({rep['status']}), "
        f"seed {rep['seed']}",
        f"- sites: {', '.join(rep['sites'])}",
        *_secagg_lines(rep),
        "",
        f"## Final {evaluated_model(rep)}, evaluated at each site",
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
        lines += [
            "",
            (
                "n/a: undefined at that site (for example AUROC on a validation set holding "
                "one class, or Dice without any lesion); left out of the mean."
            ),
        ]
    worst = final["worst"]
    if worst:
        lines += ["", f"Worst site: **{worst['site']}** ({_TITLES.get(main, main)} {_fmt(worst.get(main))})."]
    if rep["history"]:
        sites = rep["sites"] or sorted(rep["history"][-1]["per_site"])
        lines += [
            "",
            f"## {_TITLES.get(main, main)} per round",
            "",
            "| round | " + " | ".join(sites) + " | mean |",
            "| ---: | " + " | ".join("---:" for _ in sites) + " | ---: |",
        ]
        for h in rep["history"]:
            vals = [h["per_site"].get(s, {}).get(main) for s in sites]
            m = summarize(h["per_site"], task)["mean"][main]
            lines.append(f"| {h['round']} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(m)} |")
    lines += _optional_sections(rep)
    lines.append("")
    return "\n".join(lines)
