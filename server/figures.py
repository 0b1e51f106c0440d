"""Report figures, rendered off-screen to PNG bytes.

Each function takes a report dict (the content of report.json, see ``fedscan.server.report``)
and returns the PNG bytes of one small figure, or ``None`` when the report holds nothing to
draw. Figures are built as :class:`matplotlib.figure.Figure` objects on the Agg canvas, never
through pyplot, so no global figure state is touched: the server can render them after every
round, from any thread, without leaking figures or needing a display.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from fedscan.common.html_page import png_bytes
from fedscan.server.report import cross_site_table, metric_title, number, report_sites

DPI = 100
CMAP = "viridis"

CURVES_PNG = "curves.png"
CROSS_SITE_PNG = "cross_site.png"
QUALITY_PNG = "quality.png"


def _label(text: Any) -> str:
    """User text (a site name) for a matplotlib label: a ``$`` must not start mathtext."""
    return str(text).replace("$", r"\$")


def _array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)


def _png(fig: Figure) -> bytes:
    return png_bytes(fig, DPI)


def curves_png(rep: dict[str, Any]) -> bytes | None:
    """The main metric at each site over the rounds (one line per site) and their mean (dashed)."""
    history = rep.get("history") or []
    if not history:
        return None
    main = rep["metrics"]["main"]
    rounds = [h["round"] for h in history]
    sites = report_sites(rep, {str(h["round"]): h["per_site"] for h in history})
    values = _array([[number((h["per_site"].get(s) or {}).get(main)) for s in sites] for h in history])
    counts = np.sum(~np.isnan(values), axis=1)
    mean = np.where(counts > 0, np.nansum(values, axis=1) / np.maximum(counts, 1), np.nan)
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for j, site in enumerate(sites):
        ax.plot(rounds, values[:, j], marker="o", markersize=4, linewidth=1.5, label=_label(site))
    ax.plot(rounds, mean, linestyle="--", color="black", linewidth=2, label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel(metric_title(main))
    ax.set_title(
        f"{metric_title(main)} at each site"
        + (" (personalized models)" if rep.get("strategy") == "fedbn" else " (global model)")
    )
    step = max(1, -(-len(rounds) // 12))  # at most about 12 labelled rounds
    ax.set_xticks(rounds[::step])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


def _site_ticks(ax: Any, sites: list[str]) -> None:
    slanted = len(sites) > 4 or max((len(s) for s in sites), default=0) > 10
    ax.set_xticks(
        range(len(sites)),
        [_label(s) for s in sites],
        rotation=30 if slanted else 0,
        ha="right" if slanted else "center",
    )


def cross_site_png(rep: dict[str, Any]) -> bytes | None:
    """A heatmap of the main metric of each model (rows) at each site (columns), values written in.

    The colour scale spans the matrix's own range (the colorbar shows it); a cell without a
    value is grey and reads n/a.
    """
    if not rep.get("cross_site"):
        return None
    models, sites, rows = cross_site_table(rep)
    if not models or not sites:
        return None
    values = _array(rows)
    main = rep["metrics"]["main"]
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    fig = Figure(
        figsize=(max(4.5, 2.6 + 1.0 * len(sites)), max(2.6, 1.3 + 0.45 * len(models))), layout="constrained"
    )
    ax = fig.add_subplot()
    cmap = colormaps[CMAP].with_extremes(bad="#d9d9d9")
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest"
    )
    _site_ticks(ax, sites)
    ax.set_yticks(range(len(models)), [_label(m) for m in models])
    ax.set_xlabel("evaluated at site")
    ax.set_ylabel("model")
    ax.set_title(f"Cross-site {metric_title(main)}")
    for i in range(len(models)):
        for j in range(len(sites)):
            v = values[i, j]
            if math.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=9, color="black")
                continue
            r, g, b, _ = cmap(image.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(
                j, i, f"{v:.3f}", ha="center", va="center", fontsize=9, color="white" if dark else "black"
            )
    fig.colorbar(image, ax=ax, label=metric_title(main))
    return _png(fig)


def quality_png(rep: dict[str, Any]) -> bytes | None:
    """Bars per site of the SNR estimate and of the quality factor, for those the report holds."""
    quality = rep.get("quality") or {}
    sites = [s for s in report_sites(rep, {"quality": quality}) if s in quality]
    panels = [
        (key, title, spec)
        for key, title, spec in (("snr", "SNR estimate", ".1f"), ("quality_factor", "quality factor", ".2f"))
        if any(number((quality[s] or {}).get(key)) is not None for s in sites)
    ]
    if not panels:
        return None
    fig = Figure(figsize=(max(3.6, 1.6 + 0.8 * len(sites)) * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title, spec), color in zip(
        axes, panels, ("#4c72b0", "#dd8452"), strict=False
    ):  # 1 or 2 panels
        vals = [number((quality[s] or {}).get(key)) for s in sites]
        xs = np.arange(len(sites))
        ax.bar(xs, [v or 0.0 for v in vals], color=color)
        for x, v in zip(xs, vals, strict=True):
            ax.annotate(
                "n/a" if v is None else f"{v:{spec}}",
                (x, v or 0.0),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        _site_ticks(ax, sites)
        ax.set_title(title)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# file name under OUT/figures -> the name of the function here that draws it
FIGURES = {CURVES_PNG: "curves_png", CROSS_SITE_PNG: "cross_site_png", QUALITY_PNG: "quality_png"}
