"""The one reader of a site folder: every header read once, then one record per series.

``SiteReader(site)`` does the site's whole header pass when it is built: the layout checks,
the DICOM header scan of ``images/`` (and of DICOM files under ``labels/``, for SEG objects),
the mask index and, when asked, ``labels.csv``. Everything that reads a site goes through it:
training (``fedscan.common.data.site_arrays``), ``fedscan site check``, ``site predict`` and
``site explain``, so all of them see the same series and report the same problems.

``reader.records()`` gives one ``SeriesRecord`` per series: its geometry (``header``), its
pixels on demand (``read_pixels``), its mask (``load_mask``) and the problems found while
reading them. ``reader.map(fn, items)`` runs a per-series function over records, in this
process or in ``workers`` worker processes (forked, so a worker costs no imports), and yields
the results in order; the problems each record collected come back with its result and are
added to ``reader.problems`` in the order of the series, whatever the number of workers.

``Skipped.reason`` is fedscan's wording without names (it may appear in the site-check JSON);
``Skipped.detail`` holds the full message (file names, the reader's exception) for the local log.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedscan.common.data.dicom import (
    FileScan,
    SeriesHeader,
    SiteScan,
    Skipped,
    group_series,
    list_files,
    read_series,
    scan_files,
)
from fedscan.common.data.labels import LABELS_CSV, ClassLabels, MaskIndex, index_masks, read_class_labels
from fedscan.common.data.layout import LAYOUT_HINT, SiteDir
from fedscan.common.errors import FedscanError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# A site with fewer image files than this is read in this process whatever ``workers`` says:
# starting and feeding a pool costs more than it saves (bench/ingest.py, BENCHMARKS.md).
MIN_FILES_PER_WORKER = 48

# read labels.csv without a class limit (site check reports the classes it finds)
ANY_CLASS = 1_000_000

_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")


def scrub(text: str) -> str:
    """Remove anything shaped like a UID from a message (a last line of defence)."""
    return _UID_LIKE.sub("<UID>", text)


def without_names(message: str, path: Path) -> str:
    """A mask error without the mask's file name (it is a SeriesInstanceUID), its folder or UIDs.
    The messages are fedscan's own (numbers and shapes); readers' exception texts stay local."""
    message = message.replace(str(path.parent), "")
    for named in (f"DICOM SEG {path.name}", f"mask {path.name}"):
        message = message.replace(named, "the DICOM SEG" if named.startswith("DICOM") else "the mask")
    return scrub(message.replace(path.name, "the mask file"))


def default_workers() -> int:
    """The worker processes a site is read with when nothing says otherwise: one per core the
    process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


@dataclass
class SeriesRecord:
    """One series of a site: geometry now, pixels and mask on demand, and what went wrong."""

    index: int  # the series' place in the site's list (s001 is index 0)
    header: SeriesHeader
    mask_source: Path | None  # the NIfTI or DICOM SEG that labels it, if any
    masks: MaskIndex
    problems: list[Skipped] = field(default_factory=list)

    @property
    def mask_kind(self) -> str:
        if self.mask_source is None:
            return "none"
        return "nifti" if self.mask_source.name.endswith((".nii.gz", ".nii")) else "dicom-seg"

    def read_pixels(self, keep: np.ndarray | None = None) -> tuple[SeriesHeader, np.ndarray] | None:
        """The series' rescaled pixels (only the slices where ``keep``, if given); slices that
        fail to decode are dropped and recorded. None when no slice decodes."""
        hdr = self.header if keep is None else self.header.subset(keep)
        pixels, ok, failed = read_series(hdr)
        self.problems += failed
        if not ok.any():
            return None
        if not ok.all():
            return hdr.subset(ok), pixels[ok]
        return hdr, pixels

    def load_mask(self, hdr: SeriesHeader) -> np.ndarray | None:
        """The series' mask on ``hdr``'s slices (uint8), or None when it has none or it cannot be
        used (then the reason is recorded against the mask file)."""
        path = self.mask_source
        if path is None:
            return None
        try:
            return self.masks.load(hdr)
        except FedscanError as exc:
            self.problems.append(Skipped(path, without_names(exc.message, path), exc.message))
        except Exception as exc:  # noqa: BLE001 - an unexpected mask file loses only its series
            self.problems.append(Skipped(path, "the mask could not be used", f"{type(exc).__name__}: {exc}"))
        return None


def _in_worker(fn: Callable[..., R], record: SeriesRecord, args: tuple) -> tuple[R, list[Skipped]]:
    result = fn(record, *args)
    return result, record.problems


def _worker_init() -> None:
    """A forked worker runs torch on one thread (as DataLoader workers do): its parent's thread
    pool does not survive the fork, and the cores are the workers'."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


class SiteReader:
    """Reads one site folder: the header pass at construction, then series on demand.

    Parameters
    ----------
    site:
        The site folder.
    workers:
        Worker processes for the header scan and ``map``: 1 reads in this process, 0 or None
        takes ``default_workers()``. A small site is read in this process whatever this says.
    class_limit:
        Read ``labels.csv`` (when present) with classes 0..class_limit-1; None leaves it unread.
        A bad labels.csv raises FedscanError unless ``labels_problems_only``.
    labels_problems_only:
        Record a bad ``labels.csv`` as a problem instead of raising (site check).
    """

    def __init__(
        self,
        site: SiteDir,
        workers: int | None = 1,
        *,
        class_limit: int | None = None,
        labels_problems_only: bool = False,
    ) -> None:
        self.site = site
        if not site.path.is_dir():
            raise FedscanError(f"site '{site.name}': folder {site.path} does not exist", hint=LAYOUT_HINT)
        if not site.images.is_dir():
            raise FedscanError(f"site '{site.name}': {site.path} has no images/ folder", hint=LAYOUT_HINT)
        self.files = list_files(site.images)
        self.label_files = list_files(site.labels)
        extra = [p for p in self.label_files if not p.name.endswith((".nii.gz", ".nii", ".csv"))]
        wanted = default_workers() if not workers else int(workers)
        self.workers = wanted if len(self.files) >= MIN_FILES_PER_WORKER * min(wanted, 2) else 1
        self._pool: Executor | None = None
        self.scan: SiteScan = group_series(
            self._scan(self.files), self._scan(extra, seg_only=True), n_files=len(self.files)
        )
        self.problems: list[Skipped] = list(self.scan.skipped)
        self.masks: MaskIndex = index_masks(site.labels, self.scan)
        self.problems += self.masks.problems
        self.labels: ClassLabels | None = None
        if class_limit is not None:
            self.labels = self._read_labels(class_limit, labels_problems_only)

    # -- the header pass ------------------------------------------------------------------
    def _scan(self, paths: list[Path], seg_only: bool = False) -> list[FileScan]:
        if self.workers == 1 or len(paths) < MIN_FILES_PER_WORKER:
            return scan_files(paths, seg_only)
        n = self.workers * 4  # a few chunks per worker: one slow chunk does not hold the others up
        chunks = [paths[i::n] for i in range(n)]
        parts = list(self.pool.map(scan_files, chunks, [seg_only] * n))
        by_path = {e.path: e for part in parts for e in part}
        return [by_path[p] for p in paths]  # the site's file order, as in one process

    def _read_labels(self, class_limit: int, problems_only: bool) -> ClassLabels | None:
        path = self.site.labels / LABELS_CSV
        if not path.is_file():
            return None
        try:
            return read_class_labels(path, class_limit)
        except FedscanError as exc:
            if not problems_only:
                raise
            self.problems.append(
                Skipped(path, scrub(exc.message.replace(str(path), LABELS_CSV)), exc.message)
            )
            return None

    @property
    def pool(self) -> Executor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> SiteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- series ---------------------------------------------------------------------------
    @property
    def series(self) -> list[SeriesHeader]:
        return self.scan.series

    def records(self) -> list[SeriesRecord]:
        """One record per series, in the site's series order."""
        return [
            SeriesRecord(i, hdr, self.masks.sources.get(hdr.series_uid), self.masks)
            for i, hdr in enumerate(self.scan.series)
        ]

    def map(self, fn: Callable[..., R], items: Iterable[tuple[SeriesRecord, tuple[Any, ...]]]) -> Iterator[R]:
        """``fn(record, *args)`` for each (record, args), in workers when the reader has them;
        results in order. ``fn`` must be a module-level function and its results picklable.
        Each record's problems are added to ``self.problems`` as its result is yielded."""
        items = list(items)
        if self.workers == 1 or len(items) < 2:
            for record, args in items:
                result = fn(record, *args)
                self.problems += record.problems
                record.problems = []
                yield result
            return
        futures = [self.pool.submit(_in_worker, fn, record, args) for record, args in items]
        for fut in futures:
            result, problems = fut.result()
            self.problems += problems
            yield result


def log_problems(site: SiteDir, problems: list[Skipped], limit: int = 20) -> None:
    """The site log's account of files or masks not used (details stay in this log)."""
    for p in problems[:limit]:
        log.warning("site %s: %s: %s", site.name, p.path, p.detail or p.reason)
    if len(problems) > limit:
        log.warning(
            "site %s: ... and %d more (run `fedscan site check` for the full list)",
            site.name,
            len(problems) - limit,
        )
