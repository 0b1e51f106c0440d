"""report.html: the run report as one self-contained HTML page (``fedscan.common.html_page``).

Every piece of text from the report (site names above all: they are user data) is escaped.
"""

from __future__ import annotations

from typing import Any

from fedscan.common.config import EXAM_MODELS
from fedscan.common.html_page import escape, figure, page, table
from fedscan.common.tasks.registry import task_metrics
from fedscan.server.report import (
    EXPLANATION_NOTE,
    baselines_text,
    cross_site_table,
    evaluated_model,
    explanation_table,
    federated_gains,
    gain_warning,
    mean_of,
    metric_title,
    model_kinds,
    number,
    quality_table,
    strategy_comparison,
    summarize,
)


def _fmt(value: Any, digits: int = 3) -> str:
    """A value for a table cell, escaped: numbers rounded, missing or undefined as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return escape(value)
    if isinstance(value, int):
        return str(value)
    v = number(value)
    if v is None:
        return escape(value) if not isinstance(value, float) else "n/a"
    return f"{v:.{digits}f}"


def _img(figures: dict[str, bytes], name: str, alt: str, caption: str, img_id: str | None = None) -> str:
    return figure(figures.get(name), alt, caption, img_id)


def _summary(rep: dict[str, Any]) -> str:
    secagg = (
        "on (SecAgg+): the server saw only the sum of the sites' updates"
        if rep.get("secagg")
        else "off: the server saw each site's update"
    )
    items = [
        ("task", rep["task"]),
        ("model", rep["model"]),
        ("strategy", rep["strategy"]),
        ("rounds", f"{rep['rounds_completed']} of {rep['rounds']} completed ({rep['status']})"),
        ("seed", rep["seed"]),
        ("sites", ", ".join(str(s) for s in rep["sites"])),
        ("secure aggregation", secagg),
    ]
    items += [(k, rep[k]) for k in ("started", "updated") if rep.get(k)]
    return (
        '<dl class="summary">\n'
        + "\n".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
        + "\n</dl>"
    )


def _final(rep: dict[str, Any]) -> str:
    final = rep["final"]
    names, main = task_metrics(rep["task"])
    unit = "validation slices"
    if rep["task"] == "classification":
        unit = "validation exams" if rep["model"] in EXAM_MODELS else "validation images"
    digits = {"hd95": 1}
    head = ["site", *(escape(metric_title(m)) for m in names), escape(unit)]
    rows = [
        (
            [
                escape(site),
                *(_fmt(row.get(m), digits.get(m, 3)) for m in names),
                _fmt(row.get("num_examples")),
            ],
            "",
        )
        for site, row in final["per_site"].items()
    ]
    mean = final["mean"]
    rows.append((["mean", *(_fmt(mean.get(m), digits.get(m, 3)) for m in names), ""], "mean"))
    parts = [f"<h2>Final {escape(evaluated_model(rep))}, evaluated at each site</h2>", table(head, rows)]
    if any(row.get(m) is None for row in final["per_site"].values() for m in names):
        parts.append(
            '<p class="note">n/a: undefined at that site (for example AUROC on a validation set '
            "holding one class, or Dice without any lesion); left out of the mean.</p>"
        )
    worst = final.get("worst") or {}
    if worst:
        parts.append(
            f"<p>Worst site: <strong>{escape(worst['site'])}</strong> "
            f"({escape(metric_title(main))} {_fmt(worst.get(main))}).</p>"
        )
    return "\n".join(parts)


def _rounds(rep: dict[str, Any], figures: dict[str, bytes]) -> str:
    history = rep["history"]
    if not history:
        return ""
    main = rep["metrics"]["main"]
    title = metric_title(main)
    sites = rep["sites"] or sorted(history[-1]["per_site"])
    rows = []
    for h in history:
        vals = [h["per_site"].get(s, {}).get(main) for s in sites]
        m = summarize(h["per_site"], rep["task"])["mean"][main]
        rows.append(([escape(h["round"]), *(_fmt(v) for v in vals), _fmt(m)], ""))
    return "\n".join(
        [
            f"<h2>{escape(title)} per round</h2>",
            _img(
                figures,
                "curves.png",
                f"{title} at each site per round",
                f"{title} of the {evaluated_model(rep)} at each site after each round; "
                "dashed: the mean over sites.",
            ),
            table(["round", *(escape(s) for s in sites), "mean"], rows),
        ]
    )


def _cross_site(rep: dict[str, Any], figures: dict[str, bytes]) -> str:
    if not rep.get("cross_site"):
        return ""
    title = metric_title(rep["metrics"]["main"])
    models, sites, values = cross_site_table(rep)
    rows = [
        ([escape(m), *(_fmt(v) for v in row), _fmt(mean_of(row))], "")
        for m, row in zip(models, values, strict=True)
    ]
    kinds = "".join(
        f"<li><code>{escape(label)}</code>: {escape(text)}</li>" for label, text in model_kinds(models)
    )
    return "\n".join(
        [
            "<h2>Cross-site evaluation</h2>",
            f"<p>{escape(title)} of each model (rows) on each site's validation data (columns); "
            "the mean is unweighted over sites.</p>",
            f"<ul>{kinds}</ul>",
            _img(
                figures,
                "cross_site.png",
                f"cross-site {title} heatmap",
                f"Cross-site {title}: models on rows, the sites they are evaluated at on columns.",
                img_id="cross-site-heatmap",
            ),
            table(["model", *(escape(s) for s in sites), "mean"], rows),
        ]
    )


def _gain(rep: dict[str, Any]) -> str:
    gains = federated_gains(rep)
    if not gains:
        return ""
    main = rep["metrics"]["main"]
    rows = []
    warnings = []
    for site, gain, model in gains:
        negative = gain is not None and gain < 0
        val = "n/a" if gain is None else f"{gain:+.3f}"
        if gain is not None and gain < 0:  # negative, spelled out so that mypy sees gain is a float
            val = f'<span class="warn" title="joining did not help this site">&#9888; {val}</span>'
            warnings.append(gain_warning(site, gain, model, main))
        rows.append(([escape(site), val, escape(model)], "warn" if negative else ""))
    return "\n".join(
        [
            "<h2>Federated gain per site</h2>",
            f"<p>{escape(metric_title(main))} of the federated model at each site minus that of the "
            "site's own local model there: above 0, joining the federation helped the site.</p>",
            table(["site", "gain", "federated model"], rows),
            *(f'<p class="warn">&#9888; {escape(w)}</p>' for w in warnings),
        ]
    )


def _quality(rep: dict[str, Any], figures: dict[str, bytes]) -> str:
    if not rep.get("quality"):
        return ""
    cols, rows = quality_table(rep)
    parts = ["<h2>Site quality</h2>"]
    if cols and rows:
        parts.append(
            table(
                ["site", *(escape(t) for _, t, _ in cols)],
                [([escape(s), *(escape(v) for v in vals)], "") for s, vals in rows],
            )
        )
    parts.append(
        _img(
            figures,
            "quality.png",
            "site quality per site",
            "Each site's image quality: the SNR estimate and the quality factor.",
        )
    )
    return "\n".join(parts)


def _baselines(rep: dict[str, Any]) -> str:
    text = baselines_text(rep)
    return f"<h2>Baselines</h2>\n<p>{escape(text)}</p>" if text else ""


def _comparison(rep: dict[str, Any]) -> str:
    if not rep.get("strategy_comparison"):
        return ""
    sites, rows = strategy_comparison(rep)
    body = []
    for name, vals in rows:
        defined = [v for v in vals if v is not None]
        body.append(
            (
                [
                    escape(name),
                    *(_fmt(v) for v in vals),
                    _fmt(mean_of(vals)),
                    _fmt(min(defined) if defined else None),
                ],
                "",
            )
        )
    return "\n".join(
        [
            "<h2>Strategy comparison</h2>",
            f"<p>{escape(metric_title(rep['metrics']['main']))} of each strategy's federated model "
            "at each site.</p>",
            table(["strategy", *(escape(s) for s in sites), "mean", "worst"], body),
        ]
    )


def _explanations(rep: dict[str, Any]) -> str:
    if not rep.get("explanation_scores"):
        return ""
    head, rows = explanation_table(rep)
    body = [([escape(site), *(_fmt(v) for v in vals)], "") for site, vals in rows]
    return (
        "<h2>Explanation scores</h2>"
        + f'<p class="note">{escape(EXPLANATION_NOTE)}</p>'
        + table(["site", *(escape(h) for h in head)], body)
    )


def report_html(rep: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The report as a self-contained HTML5 page; ``figures`` maps file names to PNG bytes."""
    sections = [
        _summary(rep),
        _final(rep),
        _rounds(rep, figures),
        _cross_site(rep, figures),
        _gain(rep),
        _quality(rep, figures),
        _explanations(rep),
        _baselines(rep),
        _comparison(rep),
    ]
    version = rep.get("fedscan_version")
    footer = (
        f"Written by fedscan {escape(version)} from report.json." if version else "Written from report.json."
    )
    return page(
        f"fedscan run report: {rep['task']}, {rep['strategy']}", "fedscan run report", sections, footer
    )
