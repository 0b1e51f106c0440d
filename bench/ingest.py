"""Benchmark: DICOM ingestion of a site, by transfer syntax, against bare pydicom.

Synthesizes segmentation sites with ``fedscan.common.data.synthetic`` (uncompressed CT,
Explicit VR Little Endian, NIfTI masks) in a temporary folder, then writes copies of the
same sites recompressed to RLE Lossless, JPEG 2000 Lossless and JPEG-LS Lossless
(``Dataset.compress``; labels copied unchanged). A syntax whose encoder is missing is
skipped with a note. ``--matrix 512`` adds the same sites rewritten at 512x512 (the
synthetic builder draws 192, 224 or 256 by site).

For every set of files, in one run:

- bare pydicom: ``pydicom.dcmread(path).pixel_array`` for every file, one after another, in
  one process;
- cold, W workers: ``prepare_site(site, cfg, cache)`` with ``workers = W`` and an empty cache
  folder: what the first run of training does (the site reader's header pass, decode, masks,
  normalize and resize, SNR, then the cache write). ``--workers`` lists the W (default 1 2);
  the worker pool is started inside each timed run, so its cost is in the figure;
- warm: ``prepare_site`` again on the filled cache, then every array summed so that the
  memory-mapped data is really read.

Rates are slices per second; each figure is the best (shortest) of ``--repeats`` runs, the
kinds taking turns so that a burst of load from elsewhere does not hit one kind. Every
file is read once before timing, so all of them run from the OS page cache: the figures
are CPU cost, not disk speed. The config is ``RunConfig()`` (segmentation, 96x96) and torch
runs on ``--threads`` threads (default 1, like single-threaded pydicom). The cold runs in one
process also time fedscan's steps (header scan, decode, mask load, resize, SNR, cache write)
by wrapping those functions, and print them per slice; ``--profile`` adds cProfile's top
functions for one cold ingestion of the first file set.

    python bench/ingest.py --sites 1 --repeats 3 --threads 1 --matrix 512 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import platform
import pstats
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid
import torch

from fedscan.common.config import RunConfig
from fedscan.common.data import cache as cache_mod
from fedscan.common.data import site_arrays as arrays_mod
from fedscan.common.data import site_reader as reader_mod
from fedscan.common.data.dicom import list_files
from fedscan.common.data.labels import MaskIndex
from fedscan.common.data.layout import SiteDir, discover_sites
from fedscan.common.data.site_arrays import build_site_data, prepare_site
from fedscan.common.data.synthetic import make_profiles, synthesize, write_site

SYNTAXES: dict[str, tuple[str, pydicom.uid.UID | None]] = {
    "explicit": ("Explicit VR Little Endian (as written)", None),
    "rle": ("RLE Lossless", pydicom.uid.RLELossless),
    "j2k": ("JPEG 2000 Lossless", pydicom.uid.JPEG2000Lossless),
    "jpegls": ("JPEG-LS Lossless", pydicom.uid.JPEGLSLossless),
}

# the steps of one cold ingestion in one process, timed by wrapping these functions (module, attribute)
PHASES = [
    ("header scan (scan_files)", "reader", "scan_files"),
    ("series assembly (group_series)", "reader", "group_series"),
    ("mask index (index_masks)", "reader", "index_masks"),
    ("decode + rescale (read_series)", "reader", "read_series"),
    ("mask load onto the series grid (MaskIndex.load)", "MaskIndex", "load"),
    ("normalize + resize images (model_input)", "arrays", "model_input"),
    ("resize masks (fit_labels)", "arrays", "fit_labels"),
    ("series SNR (series_snr)", "arrays", "series_snr"),
    ("cache key (stat + hash of the files)", "cache", "cache_key"),
    ("cache write (cache.save)", "cache", "save"),
]


def make_sites(
    root: Path, n_sites: int, seed: int, matrix: int | None, slices_per_patient: int | None = None
) -> list[SiteDir]:
    """Synthetic segmentation sites; at the builder's own matrices and series lengths unless
    ``matrix`` or ``slices_per_patient`` is set."""
    if matrix is None and slices_per_patient is None:
        synthesize(root, n_sites, seed)
    else:
        root.mkdir(parents=True)
        for i, prof in enumerate(make_profiles(n_sites, seed)):
            if matrix is not None:
                fov = prof.matrix * prof.pixel_spacing_mm  # same field of view, finer pixels
                prof = prof.model_copy(update={"matrix": matrix, "pixel_spacing_mm": round(fov / matrix, 4)})
            if slices_per_patient is not None:
                prof = prof.model_copy(update={"slices_per_patient": slices_per_patient})
            write_site(root, prof, seed, i)
    return discover_sites(root)


def recompress(sites: list[SiteDir], dst_root: Path, syntax: pydicom.uid.UID) -> list[SiteDir]:
    """Copies of the sites with every image re-encoded in ``syntax``; labels copied as they are."""
    out = []
    for site in sites:
        dst = dst_root / site.name
        shutil.copytree(site.labels, dst / "labels")
        for src in list_files(site.images):
            target = dst / "images" / src.relative_to(site.images)
            target.parent.mkdir(parents=True, exist_ok=True)
            ds = pydicom.dcmread(src)
            ds.compress(syntax)
            ds.save_as(target, enforce_file_format=True)
        out.append(SiteDir(site.name, dst))
    return out


def image_files(sites: list[SiteDir]) -> list[Path]:
    return [f for s in sites for f in list_files(s.images)]


def read_all_bytes(sites: list[SiteDir]) -> int:
    """Read every file once so that the timed runs find them in the OS page cache."""
    return sum(len(f.read_bytes()) for s in sites for f in list_files(s.path))


def bare_pydicom(files: list[Path]) -> int:
    n = 0
    for f in files:
        arr = pydicom.dcmread(f).pixel_array
        n += 1 if arr.ndim == 2 else arr.shape[0]
    return n


def touch(data) -> float:
    """Read every array through (memory-mapped arrays are loaded from disk or page cache)."""
    return float(sum(np.asarray(a).sum(dtype=np.float64) for a in data.as_arrays().values()))


@contextmanager
def phase_timer() -> Iterator[dict[str, float]]:
    """Wrap the PHASES functions so that each call adds its wall time to the yielded dict.

    A few dozen calls per site, so the wrappers cost microseconds. A function that fedscan
    no longer has is left out (its row reads n/a)."""
    owners = {"reader": reader_mod, "arrays": arrays_mod, "cache": cache_mod, "MaskIndex": MaskIndex}
    spent: dict[str, float] = {}
    originals = []
    for label, owner, attr in PHASES:
        obj = owners[owner]
        fn = getattr(obj, attr, None)
        if fn is None:
            continue
        originals.append((obj, attr, fn))

        def wrapper(*a, _fn=fn, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, wrapper)
    try:
        yield spent
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)


def measure(sites: list[SiteDir], cfg: RunConfig, repeats: int, work: Path, workers: list[int]) -> dict:
    """Best time of each way of reading the files; the repeats interleave the kinds so that a
    burst of load from elsewhere does not hit all runs of one kind. ``cold-W``: prepare_site with
    W worker processes on an empty cache; the per-step profile is taken with one process."""
    files = image_files(sites)
    read_all_bytes(sites)
    n_slices = bare_pydicom(files)  # also a warm-up of the decoders
    built = [build_site_data(s, cfg) for s in sites]
    if sum(len(d) for d in built) != n_slices:
        raise SystemExit(f"fedscan kept {sum(len(d) for d in built)} of {n_slices} slices")
    kinds = ["bare", *(f"cold-{w}" for w in workers), "warm"]
    best = dict.fromkeys(kinds, np.inf)
    phases: dict[str, float] = {}
    for i in range(repeats):
        t0 = time.perf_counter()
        bare_pydicom(files)
        best["bare"] = min(best["bare"], time.perf_counter() - t0)
        for w in workers:
            wcfg = cfg.model_copy(update={"workers": w})
            cache_dir = work / f"cache-{i}-{w}"  # empty: a cold run
            with phase_timer() if w == 1 else contextlib.nullcontext({}) as spent:
                t0 = time.perf_counter()
                for s in sites:
                    prepare_site(s, wcfg, cache_dir)
                t = time.perf_counter() - t0
            if t < best[f"cold-{w}"]:
                best[f"cold-{w}"] = t
                if w == 1:
                    phases = dict(spent)
            entries = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
            if len(entries) != len(sites):
                raise SystemExit(f"expected {len(sites)} cache entries, found {len(entries)}")
        t0 = time.perf_counter()
        for s in sites:
            touch(prepare_site(s, cfg, work / f"cache-{i}-{workers[0]}"))  # entries a cold run just wrote
        best["warm"] = min(best["warm"], time.perf_counter() - t0)
    return {
        "slices": n_slices,
        "shape": pydicom.dcmread(files[0], stop_before_pixels=True).Rows,
        "mb": sum(f.stat().st_size for f in files) / 1e6,
        **{k: n_slices / t for k, t in best.items()},
        "cold_s": best.get("cold-1", np.nan),
        "phases": phases,
    }


def profile_cold(sites: list[SiteDir], cfg: RunConfig, work: Path, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for s in sites:
        prepare_site(s, cfg, work / "profile-cache")
    prof.disable()
    for key, what in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        lines = buf.getvalue().strip().splitlines()
        head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"\ncProfile of one cold prepare_site of the first file set, top {top} by {what}:\n\n```")
        print("\n".join(line.replace(str(Path.cwd()) + "/", "") for line in lines[head : head + top + 1]))
        print("```")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=1, help="synthetic sites to ingest (all of them, summed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (pydicom decodes on one)")
    ap.add_argument("--syntaxes", nargs="+", default=list(SYNTAXES), choices=list(SYNTAXES))
    ap.add_argument(
        "--matrix",
        type=int,
        nargs="*",
        default=[],
        help="also the same sites rewritten at this matrix (e.g. 512)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="worker processes for the cold runs (1: in this process; it also gives the profile)",
    )
    ap.add_argument(
        "--slices-per-patient",
        type=int,
        default=None,
        help="series length (the synthetic builder's is 12; a CT series is often 50-300)",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one cold ingestion of the first set")
    ap.add_argument("--top", type=int, default=20, help="functions listed by --profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    cfg = RunConfig()  # segmentation, image_size 96
    workers = sorted(set(args.workers) | {1})
    reader_mod.MIN_FILES_PER_WORKER = 1  # the pool whatever the site's size: it is what is measured
    print(
        f"python {platform.python_version()}, pydicom {pydicom.__version__}, numpy {np.__version__}, "
        f"torch {torch.__version__} ({args.threads} thread(s)), "
        f"{platform.processor() or platform.machine()}; "
        f"task {cfg.task}, image_size {cfg.image_size}, best of {args.repeats}\n",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedscan-ingest-") as tmp:
        tmp = Path(tmp)
        first: list[SiteDir] | None = None
        for matrix in [None, *args.matrix]:
            tag = "drawn" if matrix is None else str(matrix)
            base = make_sites(
                tmp / f"m{tag}" / "explicit", args.sites, args.seed, matrix, args.slices_per_patient
            )
            for key in args.syntaxes:
                name, uid = SYNTAXES[key]
                try:
                    sites = base if uid is None else recompress(base, tmp / f"m{tag}" / key, uid)
                except Exception as exc:  # noqa: BLE001 - a missing encoder plugin
                    print(f"skipped {name}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                first = first or sites
                r = measure(sites, cfg, args.repeats, tmp / f"work-{tag}-{key}", workers)
                r["name"], r["key"] = name, key
                rows.append(r)
                print(
                    f"  {name}, {r['shape']}x{r['shape']}: bare {r['bare']:.0f}/s, "
                    + ", ".join(f"cold with {w} worker(s) {r[f'cold-{w}']:.0f}/s" for w in workers)
                    + f", warm {r['warm']:.0f}/s",
                    flush=True,
                )
        cold_cols = " | ".join(f"cold, {w} worker(s) slices/s" for w in workers)
        ratio_cols = " | ".join(f"cold / bare, {w} worker(s)" for w in workers)
        print(
            f"\n| transfer syntax | slice size | slices | MB on disk | bare pydicom slices/s | {cold_cols} "
            f"| warm slices/s | {ratio_cols} | warm / cold |"
        )
        print("| --- | ---: | ---: | ---: | ---: |" + " ---: |" * (2 * len(workers) + 2))
        for r in rows:
            colds = " | ".join(f"{r[f'cold-{w}']:.0f}" for w in workers)
            ratios = " | ".join(f"{r[f'cold-{w}'] / r['bare']:.2f}" for w in workers)
            fastest = max(r[f"cold-{w}"] for w in workers)
            print(
                f"| {r['name']} | {r['shape']}×{r['shape']} | {r['slices']} | {r['mb']:.1f} "
                f"| {r['bare']:.0f} "
                f"| {colds} | {r['warm']:.0f} | {ratios} | {r['warm'] / fastest:.0f} |"
            )
        print(
            "\nWhere the best cold prepare_site run spent its time, ms per slice "
            "(bare pydicom for reference):\n"
        )
        print("| step | " + " | ".join(f"{r['key']} {r['shape']}" for r in rows) + " |")
        print("| --- |" + " ---: |" * len(rows))
        for label, _, _ in PHASES:
            cells = [
                f"{1e3 * r['phases'][label] / r['slices']:.2f}" if label in r["phases"] else "n/a"
                for r in rows
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
        rest = [1e3 * (r["cold_s"] - sum(r["phases"].values())) / r["slices"] for r in rows]
        print("| rest (file listing, concatenation, ...) | " + " | ".join(f"{v:.2f}" for v in rest) + " |")
        print(
            "| **cold prepare_site, total** | "
            + " | ".join(f"**{1e3 / r['cold-1']:.2f}**" for r in rows)
            + " |"
        )
        print("| bare pydicom read + decode | " + " | ".join(f"{1e3 / r['bare']:.2f}" for r in rows) + " |")
        if args.profile and first is not None:
            profile_cold(first, cfg, tmp / "profile", args.top)


if __name__ == "__main__":
    main()
