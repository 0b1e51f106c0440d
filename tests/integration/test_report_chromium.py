"""report.html in a real browser: headless Chromium renders the page and shows the cross-site heatmap.

The evidence is the screenshot: the heatmap's cells are large areas of a few viridis colours,
so the pixels of those exact colours in cross_site.png must appear in the screenshot, about as
many as the figure holds (the page shows it at its own size). The same page with the heatmap's
image taken out shows almost none of them, so the colours come from the embedded image.
Skipped where no Chromium is installed (CI installs Debian's `chromium`).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from fedscan.server.report import summarize, write_report_files

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI (.ci/run) sets FEDSCAN_REQUIRE_CHROMIUM=1: there a missing chromium fails instead of skipping
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("FEDSCAN_REQUIRE_CHROMIUM") != "1",
    reason="no chromium on PATH (apt-get install chromium): cannot render report.html",
)

SITES = ["north", "south", "east", "west"]
WINDOW = (1280, 2400)
TOLERANCE = 6  # per channel, out of 255
PAGE_ERRORS = ("Uncaught", "Failed to load")


def build_report() -> dict[str, Any]:
    """4 sites, 3 rounds, and a cross-site matrix with well-separated values (strong colours)."""
    history = [
        {
            "round": r,
            "per_site": {s: {"dice": 0.2 * r + 0.03 * i, "num_examples": 10} for i, s in enumerate(SITES)},
        }
        for r in (1, 2, 3)
    ]
    cross: dict[str, dict[str, dict[str, float]]] = {
        "global": {s: {"dice": 0.70} for s in SITES},
        "pooled": {s: {"dice": 0.90} for s in SITES},
    }
    for s in SITES:
        cross[f"local:{s}"] = {t: {"dice": 0.50 if t == s else 0.10} for t in SITES}
    return {
        "status": "complete",
        "task": "segmentation",
        "model": "unet",
        "strategy": "fedavg",
        "secagg": False,
        "rounds": 3,
        "rounds_completed": 3,
        "seed": 0,
        "sites": SITES,
        "metrics": {"main": "dice", "names": ["dice"]},
        "history": history,
        "final": summarize(history[-1]["per_site"]),
        "cross_site": cross,
        "federated_gain": {s: 0.2 for s in SITES},
        "federated_gain_model": {s: "global" for s in SITES},
    }


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None, "chromium is required here (FEDSCAN_REQUIRE_CHROMIUM=1) but is not on PATH"
    cmd = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def page_errors(stderr: str) -> list[str]:
    """Log lines about the page itself: script errors, failed loads, network errors for the page."""
    return [
        line
        for line in stderr.splitlines()
        if any(e in line for e in PAGE_ERRORS)
        or ("ERR_" in line and any(k in line for k in ("CONSOLE", "file://", "report", "data:")))
    ]


def screenshot(page: Path, png: Path, profile: Path) -> np.ndarray:
    result = chromium(
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        page.as_uri(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not page_errors(result.stderr), page_errors(result.stderr)
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")
    return rgb(png)


def rgb(png: Path) -> np.ndarray:
    img = matplotlib.image.imread(png)
    if img.dtype != np.uint8:
        img = np.round(img * 255).astype(np.uint8)
    return img[..., :3].astype(np.int16)


def cell_colours(heatmap: np.ndarray) -> tuple[np.ndarray, int]:
    """The heatmap's cell colours (large areas of one saturated colour) and how many pixels they cover."""
    flat = heatmap.reshape(-1, 3)
    saturated = flat[(flat.max(axis=1) - flat.min(axis=1)) > 60]  # no white, grey or black
    colours, counts = np.unique(saturated, axis=0, return_counts=True)
    keep = counts >= 500  # a cell is thousands of pixels; text edges and the colorbar are not
    return colours[keep], int(counts[keep].sum())


def matching(shot: np.ndarray, colours: np.ndarray) -> np.ndarray:
    hit = np.zeros(shot.shape[:2], dtype=bool)
    for colour in colours:
        hit |= np.abs(shot - colour).max(axis=2) <= TOLERANCE
    return hit


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))


def test_chromium_renders_the_cross_site_heatmap(tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_report_files(out, build_report())
    page = out / "report.html"
    heatmap_png = out / "figures" / "cross_site.png"
    heatmap = rgb(heatmap_png)
    colours, expected = cell_colours(heatmap)
    assert len(colours) >= 3 and expected > 10_000, (len(colours), expected)  # strongly coloured cells

    shot = screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    hit = matching(shot, colours)
    assert hit.sum() >= 0.8 * expected, (int(hit.sum()), expected)
    ys, xs = np.nonzero(hit)  # one block the size of the heatmap's cells, not scattered pixels
    h, w = heatmap.shape[:2]
    assert ys.max() - ys.min() <= h and xs.max() - xs.min() <= w

    # control: without the heatmap's image, the page holds next to none of those colours
    html = page.read_text()
    start = html.index('<img id="cross-site-heatmap"')
    end = html.index(">", start)
    control = out / "control.html"
    control.write_text(html[:start] + html[end + 1 :])
    shot = screenshot(control, tmp_path / "control.png", tmp_path / "profile")
    assert matching(shot, colours).sum() < 0.05 * expected

    # the DOM Chromium built holds the heatmap, whose data is the figure itself
    result = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert not page_errors(result.stderr), page_errors(result.stderr)
    parser = _Images()
    parser.feed(result.stdout)
    found = [img for img in parser.images if img.get("id") == "cross-site-heatmap"]
    assert len(found) == 1, parser.images
    src = found[0]["src"] or ""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    assert base64.b64decode(src[len(prefix) :]) == heatmap_png.read_bytes()
    assert all((img.get("src") or "").startswith(prefix) for img in parser.images)
