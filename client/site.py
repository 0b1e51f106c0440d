"""`fedscan site check`: what a hospital runs before joining a federation.

It reads the whole site folder the way training will (every DICOM header, every pixel, every
mask and label row) and returns a ``SiteCheck``: an inventory, the problems found per file,
and a data-quality profile per series and for the site. The check never stops at a bad file.

The ``SiteCheck`` (and so its JSON) holds no patient data: no names, IDs, dates, UIDs,
accession numbers, institution names or paths. Series are numbered (s001, ...) and files
with problems numbered (f0001, ...); only the console listing, which stays on the site's
screen, maps those numbers to paths.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from fedscan.common.data.dicom import SeriesHeader
from fedscan.common.data.labels import LABELS_CSV, UNKNOWN_SERIES, ClassLabels
from fedscan.common.data.layout import LAYOUT_HINT, SiteDir
from fedscan.common.data.quality import SeriesProfile, SiteProfile, sample_indices, series_snr, site_profile
from fedscan.common.data.site_reader import ANY_CLASS, SeriesRecord, SiteReader, scrub
from fedscan.common.errors import FedscanError

log = logging.getLogger(__name__)


class Problem(BaseModel):
    file: str = Field(description="f0001, ...: numbered in this report; paths stay on the console")
    problem: str


class Inventory(BaseModel):
    files: int
    image_files_used: int
    patients: int
    studies: int
    series: int
    slices: int
    modalities: dict[str, int] = Field(description="series per modality")
    manufacturers: dict[str, int] = Field(description="series per manufacturer")
    transfer_syntaxes: dict[str, int] = Field(description="slices per transfer syntax")
    labelled_series: int
    dicom_seg_objects: int
    nifti_masks: int
    label_rows: int


class LabelMismatches(BaseModel):
    series_without_labels: int
    masks_not_matching_their_series: int
    masks_for_unknown_series: int
    label_rows_for_unknown_uids: int


class SiteCheck(BaseModel):
    """Everything `fedscan site check` found; safe to write to JSON."""

    ready: bool
    inventory: Inventory
    mismatches: LabelMismatches
    site: SiteProfile
    series: list[SeriesProfile]
    problems: list[Problem]


def _label_keys(hdr: SeriesHeader, table: ClassLabels | None) -> list[str]:
    """The labels.csv key of each slice of the series."""
    if table is None:
        return []
    if table.key == "SOPInstanceUID":
        return list(hdr.sop_uids)
    return [hdr.series_uid if table.key == "SeriesInstanceUID" else hdr.study_uid] * len(hdr)


@dataclass
class _SeriesCheck:
    """What the check needs of one series' pixels and mask (computed where the series is read)."""

    hdr: SeriesHeader | None  # the slices that decoded; None: none did
    snr: float | None = None
    lo: float | None = None
    hi: float | None = None
    p1: float | None = None
    p99: float | None = None
    mask_failed: bool = False
    fg_slices: float | None = None  # with a usable mask
    fg_pixels: float | None = None


def _check_series(rec: SeriesRecord) -> _SeriesCheck:
    decoded = rec.read_pixels()
    if decoded is None:
        return _SeriesCheck(None)
    hdr, pixels = decoded
    sample = pixels[sample_indices(len(pixels))]
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99])) if pixels.size else (None, None)
    out = _SeriesCheck(
        hdr,
        series_snr(pixels),
        float(pixels.min()) if pixels.size else None,
        float(pixels.max()) if pixels.size else None,
        p1,
        p99,
    )
    mask = rec.load_mask(hdr)
    if mask is not None:
        out.fg_slices = float((mask.reshape(len(mask), -1) > 0).any(axis=1).mean())
        out.fg_pixels = float((mask > 0).mean())
    else:
        out.mask_failed = rec.mask_source is not None
    return out


def _profile(
    sid: str, res: _SeriesCheck, source: str, classes: list[int | None], samples: dict[str, int]
) -> SeriesProfile:
    """``classes``: each slice's class (None: unlabelled); ``samples``: the labelled samples
    first counted at this series (an exam counts once however many series it has)."""
    hdr = res.hdr
    assert hdr is not None
    labelled = 0.0
    counts: dict[str, int] = {}
    if res.fg_pixels is not None:
        labelled = 1.0
        source_name = source
    else:
        known = [c for c in classes if c is not None]
        labelled = len(known) / max(len(classes), 1)
        source_name = LABELS_CSV if known else "none"
        for c in samples.values():
            counts[str(c)] = counts.get(str(c), 0) + 1
    return SeriesProfile(
        id=sid,
        modality=hdr.modality,
        manufacturer=hdr.manufacturer or "unknown",
        slices=len(hdr),
        rows=hdr.shape[0],
        columns=hdr.shape[1],
        patient_geometry=hdr.geometry,
        pixel_spacing_mm=hdr.spacing,
        slice_thickness_mm=hdr.thickness,
        slice_spacing_mm=hdr.slice_spacing,
        snr=res.snr,
        intensity_min=res.lo,
        intensity_max=res.hi,
        intensity_p1=res.p1,
        intensity_p99=res.p99,
        labelled_slice_fraction=labelled,
        label_source=source_name,
        foreground_slice_fraction=res.fg_slices,
        foreground_pixel_fraction=res.fg_pixels,
        class_counts=counts,
        warnings=list(hdr.warnings),
    )


def check_site_data(
    data: Path,
    on_series: Callable[[int, int], None] | None = None,
    workers: int | None = 1,
) -> tuple[SiteCheck, dict[str, Path]]:
    """Check a site folder. Returns the report and, for the console only, problem ids -> paths.
    ``workers``: processes that read the series (0 or None: one per core, at most 4)."""
    data = Path(data)
    if not data.is_dir():
        raise FedscanError(f"site folder {data} does not exist", hint=LAYOUT_HINT)
    site = SiteDir(data.name, data)
    if not site.images.is_dir():
        raise FedscanError(f"{data} has no images/ folder", hint=LAYOUT_HINT)
    with SiteReader(site, workers, class_limit=ANY_CLASS, labels_problems_only=True) as reader:
        return _check(reader, on_series)


def _check(
    reader: SiteReader, on_series: Callable[[int, int], None] | None
) -> tuple[SiteCheck, dict[str, Path]]:
    scan, masks, table = reader.scan, reader.masks, reader.labels
    profiles: list[SeriesProfile] = []
    used_files: set[Path] = set()
    syntaxes: Counter[str] = Counter()
    patients: set[str] = set()
    studies: set[str] = set()
    counted: set[str] = set()  # labelled samples already counted
    # rows that match an image at this site, whether or not its pixels decode
    matched_uids = {k for h in scan.series for k in _label_keys(h, table)} & set(
        table.labels if table else ()
    )
    mismatched = unlabelled = 0
    records = reader.records()
    results = reader.map(_check_series, ((r, ()) for r in records))
    for k, rec in enumerate(records):
        if on_series:
            on_series(k, len(records))
        res = next(results)
        hdr = res.hdr
        if hdr is None:
            continue
        used_files.update(hdr.files)
        syntaxes.update(hdr.transfer_syntaxes)
        patients.add(hdr.patient_id)
        studies.add(hdr.study_uid)
        mismatched += res.mask_failed
        keys = _label_keys(hdr, table)
        classes: list[int | None] = [table.labels.get(u) for u in keys] if table else [None] * len(hdr)
        new = {
            u: table.labels[u]
            for u in dict.fromkeys(keys)
            if table and u in table.labels and u not in counted
        }
        counted.update(new)
        if res.fg_pixels is None and rec.mask_source is None and all(c is None for c in classes):
            unlabelled += 1
        profiles.append(_profile(f"s{k + 1:03d}", res, rec.mask_kind, classes, new))
    problems = reader.problems
    ids: dict[str, Path] = {}
    listed: list[Problem] = []
    by_path: dict[Path, str] = {}
    for p in problems:
        if p.path not in by_path:
            by_path[p.path] = f"f{len(by_path) + 1:04d}"
            ids[by_path[p.path]] = p.path
        listed.append(Problem(file=by_path[p.path], problem=scrub(p.reason)))
    inventory = Inventory(
        files=scan.n_files,
        image_files_used=len(used_files),
        patients=len(patients),
        studies=len(studies),
        series=len(profiles),
        slices=sum(p.slices for p in profiles),
        modalities=dict(Counter(p.modality for p in profiles).most_common()),
        manufacturers=dict(Counter(p.manufacturer for p in profiles).most_common()),
        transfer_syntaxes=dict(syntaxes.most_common()),
        labelled_series=sum(1 for p in profiles if p.labelled_slice_fraction > 0),
        dicom_seg_objects=len(scan.segs),
        nifti_masks=sum(1 for p in masks.sources.values() if p.name.endswith((".nii.gz", ".nii")))
        + sum(1 for p in masks.problems if p.path.name.endswith((".nii.gz", ".nii"))),
        label_rows=len(table.labels) if table else 0,
    )
    mismatches = LabelMismatches(
        series_without_labels=unlabelled,
        masks_not_matching_their_series=mismatched,
        masks_for_unknown_series=sum(1 for p in masks.problems if UNKNOWN_SERIES in p.reason),
        label_rows_for_unknown_uids=(len(table.labels) - len(matched_uids)) if table else 0,
    )
    report = SiteCheck(
        ready=inventory.labelled_series > 0,
        inventory=inventory,
        mismatches=mismatches,
        site=site_profile(profiles),
        series=profiles,
        problems=listed,
    )
    return report, ids
