"""``fedscan site predict``: run a trained model on a site's own DICOM and put the results back
into the hospital's world, as files its viewers, PACS and spreadsheets read.

- Segmentation models (unet, segnet): one DICOM SEG per series, ``OUT/seg/<SeriesInstanceUID>.dcm``,
  referencing the source images (``fedscan.common.data.seg_writer``).
- Image classifiers (resnet18, densenet121): ``OUT/predictions.csv``, one row per image; the exam
  classifier (mil): one row per series, with SOPInstanceUID empty. Rows are keyed by the images'
  UIDs and give the predicted class and every class's probability (4 decimals).
- ``OUT/predict.json``: what was predicted, with which model, and what was not and why.

Every series of the site is predicted, labelled or not. A series (or an image) that cannot be read
or predicted is logged with the reason and listed in the summary, and the others go on. Every file
is written under a temporary name and renamed, so no reader sees half of one; ``predict.json``
comes last. The outputs hold UIDs: they stay at the site. Nothing is sent anywhere.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from fedscan.client.model_file import load_model_file, personalize, site_precision
from fedscan.client.site_output import check_out
from fedscan.common.atomic import atomic_write_bytes
from fedscan.common.config import EXAM_MODELS, RunConfig
from fedscan.common.data.layout import SiteDir, check_images
from fedscan.common.data.preprocess import unfit_probabilities
from fedscan.common.data.seg_writer import fedscan_version, write_seg
from fedscan.common.data.site_arrays import model_input
from fedscan.common.data.site_reader import SeriesRecord, SiteReader, log_problems
from fedscan.common.errors import FedscanError
from fedscan.common.tasks.precision import Precision

log = logging.getLogger(__name__)

SEG_DIR = "seg"
PREDICTIONS_CSV = "predictions.csv"
SUMMARY_JSON = "predict.json"
BATCH_IMAGES = 16  # images through the model at once (inference keeps no activations for backward)
_SAFE_NAME = re.compile(r"[^0-9A-Za-z.\-]")


class SkippedSeries(BaseModel):
    """A series that was not predicted, and why."""

    series_uid: str
    images: int
    reason: str


class SkippedFile(BaseModel):
    """A file under images/ that was not predicted (not a usable image, or pixels that failed to decode)."""

    path: str  # relative to the data folder
    reason: str


class PredictSummary(BaseModel):
    """What ``predict_site`` did; written to ``OUT/predict.json``."""

    site: str
    task: str
    model: str
    server_round: int
    kind: str  # "global", or "personalized" (FedBN: the site's own normalization layers)
    fedscan_version: str
    series_found: int = 0
    series_predicted: int = 0
    images_predicted: int = 0
    files_written: list[str] = Field(default_factory=list)  # relative to OUT
    skipped_series: list[SkippedSeries] = Field(default_factory=list)
    skipped_files: list[SkippedFile] = Field(default_factory=list)
    seconds: float = 0.0


class _SeriesFailed(Exception):
    """A series that cannot be predicted, with fedscan's own reason."""


def predict_site(
    data: Path,
    model_file: Path,
    out: Path,
    *,
    cache_root: Path,
    use_global: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    on_series: Callable[[int, int], None] | None = None,
    site_name: str | None = None,
) -> PredictSummary:
    """Predict every series of the site folder ``data`` with the model of ``model_file`` into ``out``.

    Under FedBN the site's personalized model is used (its normalization layers from ``cache_root``)
    unless ``use_global``. ``on_series(done, total)`` is called after each series. Raises
    FedscanError, before anything is written, for a missing data folder or model file, or an ``out``
    that is not empty (unless ``overwrite``: then the predictions of an earlier run there are
    replaced, and nothing else in it is touched); and, after writing the summary, when not one
    series could be predicted.
    """
    start = time.monotonic()
    data, out = Path(data), Path(out)
    site = _site_dir(data, site_name)
    check_images(site)
    _check_out(out, site, overwrite)
    site_model = personalize(
        load_model_file(Path(model_file), device=device), site.name, Path(cache_root), use_global=use_global
    )
    cfg = site_model.cfg
    precision = site_precision(site_model)
    reader = SiteReader(site)
    scan = reader.scan
    if not scan.series:
        raise FedscanError(
            f"site '{site.name}': no readable DICOM image series under {site.images}",
            hint="run `fedscan site check --data SITE_DIR` to see why each file was not used",
        )
    log_problems(site, scan.skipped)
    summary = PredictSummary(
        site=site.name,
        task=cfg.task,
        model=cfg.model,
        server_round=site_model.server_round,
        kind=site_model.kind,
        fedscan_version=fedscan_version(),
        series_found=len(scan.series),
    )
    summary.skipped_files = [SkippedFile(path=_relative(s.path, data), reason=s.reason) for s in scan.skipped]
    log.info(
        "site %s: predicting %d series with the %s %s model of round %d on %s",
        site.name,
        len(scan.series),
        site_model.kind,
        cfg.model,
        site_model.server_round,
        precision.device,
    )
    _clear_out(out, overwrite)
    model = precision.place_model(site_model.model).eval()
    rows: list[list[str]] = []
    for i, rec in enumerate(reader.records()):
        hdr = rec.header
        try:
            written, n_images, series_rows = _predict_series(site, rec, model, cfg, precision, out, summary)
        except Exception as exc:  # one series' problem must not stop the site's other series
            reason = (
                str(exc)
                if isinstance(exc, _SeriesFailed)
                else f"prediction failed: {type(exc).__name__}: {exc}"
            )
            log.warning(
                "site %s: series %s (%d images) not predicted: %s",
                site.name,
                hdr.series_uid,
                len(hdr),
                reason,
                exc_info=not isinstance(exc, _SeriesFailed) and log.isEnabledFor(logging.DEBUG),
            )
            summary.skipped_series.append(
                SkippedSeries(series_uid=hdr.series_uid, images=len(hdr), reason=reason)
            )
        else:
            summary.series_predicted += 1
            summary.images_predicted += n_images
            summary.files_written += written
            rows += series_rows
        if on_series is not None:
            on_series(i + 1, len(scan.series))
    if cfg.task == "classification" and rows:
        atomic_write_bytes(out / PREDICTIONS_CSV, _csv_bytes(rows, cfg.num_classes))
        summary.files_written.append(PREDICTIONS_CSV)
    summary.seconds = round(time.monotonic() - start, 2)
    atomic_write_bytes(
        out / SUMMARY_JSON, (json.dumps(summary.model_dump(mode="json"), indent=2) + "\n").encode()
    )
    _log_summary(summary, out)
    if summary.series_predicted == 0:
        raise FedscanError(
            f"site '{site.name}': none of its {summary.series_found} series could be predicted",
            hint=f"the reason for each series is in the log and in {out / SUMMARY_JSON}",
        )
    return summary


def _site_dir(data: Path, name: str | None) -> SiteDir:
    """The site folder ``data``, named ``name`` or as the folder is (the name the site trained under)."""
    if not data.exists():
        raise FedscanError(
            f"data folder not found: {data}",
            hint="give the site folder that holds images/, the one the site trains with",
        )
    if not data.is_dir():
        raise FedscanError(
            f"data folder {data} is not a folder",
            hint="give the site folder that holds images/, the one the site trains with",
        )
    return SiteDir(name or data.resolve().name, data)


def _check_out(out: Path, site: SiteDir, overwrite: bool) -> None:
    """Refuse an output folder that is a file, sits among the site's images or labels (the SEGs
    would be read back as images or training labels), or holds files, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FedscanError(f"output {out} exists and is not a folder", hint="choose a new --out folder")
    check_out(out, site)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FedscanError(
            f"output folder {out} already exists and is not empty",
            hint="choose a new --out, or pass --overwrite to replace the predictions in it",
        )


def _clear_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; under ``overwrite``, remove the outputs of an earlier prediction there first
    (the summary first: a folder without one is never mistaken for a finished run)."""
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        return
    old = [out / SUMMARY_JSON, out / PREDICTIONS_CSV]
    if (out / SEG_DIR).is_dir():
        old += sorted((out / SEG_DIR).glob("*.dcm"))
    removed = 0
    for path in old:
        if path.is_file():
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d file(s) of an earlier prediction in %s", removed, out)


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _batches(
    model: torch.nn.Module, images: np.ndarray, precision: Precision
) -> Iterator[tuple[int, np.ndarray]]:
    """Softmax probabilities (b, C, ...) of the model for consecutive batches of (n, H, W) images."""
    for lo in range(0, images.shape[0], BATCH_IMAGES):
        x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + BATCH_IMAGES], dtype=np.float32))[:, None]
        with torch.no_grad(), precision.autocast():
            logits = model(precision.place(x))
        yield lo, torch.softmax(logits.float(), dim=1).cpu().numpy()


def _predict_series(
    site: SiteDir,
    rec: SeriesRecord,
    model: torch.nn.Module,
    cfg: RunConfig,
    precision: Precision,
    out: Path,
    summary: PredictSummary,
) -> tuple[list[str], int, list[list[str]]]:
    """Predict one series: write its SEG, or make its CSV rows. Returns the files written, the number
    of images predicted and the rows; images that fail to decode are added to ``summary.skipped_files``."""
    hdr = rec.header
    decoded = rec.read_pixels()
    log_problems(site, rec.problems)
    kept = set() if decoded is None else set(decoded[0].files)
    for path in dict.fromkeys(hdr.files):
        if path not in kept:
            summary.skipped_files.append(
                SkippedFile(path=_relative(path, site.path), reason="pixel data could not be decoded")
            )
    if decoded is None:
        raise _SeriesFailed("no image of the series could be decoded")
    used, pixels = decoded
    images, _ = model_input(used, pixels, cfg)
    if cfg.task == "segmentation":
        labels = np.zeros((len(used), *used.shape), dtype=np.uint8)
        for lo, probs in _batches(model, images, precision):
            full = unfit_probabilities(probs, used.shape, used.spacing, cfg.image_size, cfg.pixel_spacing)
            labels[lo : lo + probs.shape[0]] = full.argmax(axis=1)
        name = f"{SEG_DIR}/{_SAFE_NAME.sub('_', used.series_uid)}.dcm"
        write_seg(out / name, used, labels, num_classes=cfg.num_classes, model=cfg.model)
        log.debug(
            "series %s: %d of %d slices hold foreground -> %s",
            used.series_uid,
            int(labels.reshape(len(used), -1).any(axis=1).sum()),
            len(used),
            name,
        )
        return [name], len(used), []
    if cfg.model in EXAM_MODELS:
        bag = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
        with torch.no_grad(), precision.autocast():
            logits, _ = model(precision.place(bag))
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return [], len(used), [[used.study_uid, used.series_uid, "", "", *_class_values(probs)]]
    rows = []
    for lo, probs in _batches(model, images, precision):
        for j, p in enumerate(probs):
            frame = used.frames[lo + j]
            rows.append(
                [
                    used.study_uid,
                    used.series_uid,
                    used.sop_uids[lo + j],
                    "" if frame is None else str(frame + 1),
                    *_class_values(p),
                ]
            )
    return [], len(used), rows


def _class_values(probs: np.ndarray) -> list[str]:
    return [str(int(np.argmax(probs)))] + [f"{float(p):.4f}" for p in probs]


def _csv_bytes(rows: list[list[str]], num_classes: int) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameNumber",
            "predicted_class",
            *(f"prob_class{c}" for c in range(num_classes)),
        ]
    )
    writer.writerows(rows)
    return buf.getvalue().encode()


def _log_summary(summary: PredictSummary, out: Path) -> None:
    log.info(
        "site %s: %d of %d series predicted (%d images) in %.1f s; %d file(s) written to %s",
        summary.site,
        summary.series_predicted,
        summary.series_found,
        summary.images_predicted,
        summary.seconds,
        len(summary.files_written),
        out,
    )
    if summary.skipped_series:
        log.warning(
            "site %s: %d series not predicted (reasons above and in %s)",
            summary.site,
            len(summary.skipped_series),
            SUMMARY_JSON,
        )
    if summary.skipped_files:
        log.warning(
            "site %s: %d file(s) under images/ not predicted (see %s)",
            summary.site,
            len(summary.skipped_files),
            SUMMARY_JSON,
        )
