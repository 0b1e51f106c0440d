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
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from fedscan.common.data.dicom import SeriesHeader, SiteScan, Skipped, list_files, read_series, scan_site
from fedscan.common.data.labels import LABELS_CSV, UNKNOWN_SERIES, ClassLabels, index_masks, read_class_labels
from fedscan.common.data.layout import LAYOUT_HINT, SiteDir
from fedscan.common.data.quality import SeriesProfile, SiteProfile, sample_indices, series_snr, site_profile
from fedscan.common.errors import FedscanError

log = logging.getLogger(__name__)

# read labels.csv without a class limit: the check reports the classes it finds
_ANY_CLASS = 1_000_000


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


def _labels_csv(site: SiteDir, problems: list[Skipped]) -> ClassLabels | None:
    path = site.labels / LABELS_CSV
    if not path.is_file():
        return None
    try:
        return read_class_labels(path, _ANY_CLASS)
    except FedscanError as exc:
        problems.append(Skipped(path, scrub(exc.message.replace(str(path), LABELS_CSV))))
        return None


def _label_keys(hdr: SeriesHeader, table: ClassLabels | None) -> list[str]:
    """The labels.csv key of each slice of the series."""
    if table is None:
        return []
    if table.key == "SOPInstanceUID":
        return list(hdr.sop_uids)
    return [hdr.series_uid if table.key == "SeriesInstanceUID" else hdr.study_uid] * len(hdr)


def _profile(sid: str, hdr: SeriesHeader, pixels: np.ndarray, mask: np.ndarray | None,
             source: str, classes: list[int | None], samples: dict[str, int]) -> SeriesProfile:
    """``classes``: each slice's class (None: unlabelled); ``samples``: the labelled samples
    first counted at this series (an exam counts once however many series it has)."""
    sample = pixels[sample_indices(len(pixels))]
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99])) if pixels.size else (None, None)
    fg_slices = fg_pixels = None
    labelled = 0.0
    counts: dict[str, int] = {}
    if mask is not None:
        labelled = 1.0
        fg_slices = float((mask.reshape(len(mask), -1) > 0).any(axis=1).mean())
        fg_pixels = float((mask > 0).mean())
        source_name = source
    else:
        known = [c for c in classes if c is not None]
        labelled = len(known) / max(len(classes), 1)
        source_name = LABELS_CSV if known else "none"
        for c in samples.values():
            counts[str(c)] = counts.get(str(c), 0) + 1
    return SeriesProfile(
        id=sid, modality=hdr.modality, manufacturer=hdr.manufacturer or "unknown",
        slices=len(hdr), rows=hdr.shape[0], columns=hdr.shape[1], patient_geometry=hdr.geometry,
        pixel_spacing_mm=hdr.spacing, slice_thickness_mm=hdr.thickness, slice_spacing_mm=hdr.slice_spacing,
        snr=series_snr(pixels),
        intensity_min=float(pixels.min()) if pixels.size else None,
        intensity_max=float(pixels.max()) if pixels.size else None,
        intensity_p1=p1, intensity_p99=p99,
        labelled_slice_fraction=labelled, label_source=source_name,
        foreground_slice_fraction=fg_slices, foreground_pixel_fraction=fg_pixels,
        class_counts=counts, warnings=list(hdr.warnings),
    )


def check_site_data(
    data: Path, on_series: Callable[[int, int], None] | None = None
) -> tuple[SiteCheck, dict[str, Path]]:
    """Check a site folder. Returns the report and, for the console only, problem ids -> paths."""
    data = Path(data)
    if not data.is_dir():
        raise FedscanError(f"site folder {data} does not exist", hint=LAYOUT_HINT)
    site = SiteDir(data.name, data)
    if not site.images.is_dir():
        raise FedscanError(f"{data} has no images/ folder", hint=LAYOUT_HINT)
    extra = [p for p in list_files(site.labels) if not p.name.endswith((".nii.gz", ".nii", ".csv"))]
    scan: SiteScan = scan_site(site.images, extra_files=extra)
    problems: list[Skipped] = list(scan.skipped)
    masks = index_masks(site.labels, scan)
    problems += masks.problems
    table = _labels_csv(site, problems)
    profiles: list[SeriesProfile] = []
    used_files: set[Path] = set()
    syntaxes: Counter[str] = Counter()
    patients: set[str] = set()
    studies: set[str] = set()
    counted: set[str] = set()  # labelled samples already counted
    # rows that match an image at this site, whether or not its pixels decode
    matched_uids = {k for h in scan.series for k in _label_keys(h, table)} & set(table.labels if table else ())
    mismatched = unlabelled = 0
    for k, hdr in enumerate(scan.series):
        if on_series:
            on_series(k, len(scan.series))
        pixels, ok, failed = read_series(hdr)
        problems += failed
        if not ok.any():
            continue
        if not ok.all():
            hdr, pixels = hdr.subset(ok), pixels[ok]
        used_files.update(hdr.files)
        syntaxes.update(hdr.transfer_syntaxes)
        patients.add(hdr.patient_id)
        studies.add(hdr.study_uid)
        mask, source = None, "none"
        if hdr.series_uid in masks.sources:
            path = masks.sources[hdr.series_uid]
            try:
                mask = masks.load(hdr)
                source = "dicom-seg" if not path.name.endswith((".nii.gz", ".nii")) else "nifti"
            except FedscanError as exc:
                mismatched += 1
                problems.append(Skipped(path, _without_names(exc.message, path)))
            except Exception as exc:  # noqa: BLE001 - an unexpected mask file loses only its series
                mismatched += 1
                problems.append(Skipped(path, "the mask could not be used", f"{type(exc).__name__}: {exc}"))
        keys = _label_keys(hdr, table)
        classes = [table.labels.get(u) for u in keys] if table else [None] * len(hdr)
        new = {u: table.labels[u] for u in dict.fromkeys(keys) if table and u in table.labels and u not in counted}
        counted.update(new)
        if mask is None and hdr.series_uid not in masks.sources and all(c is None for c in classes):
            unlabelled += 1
        profiles.append(_profile(f"s{k + 1:03d}", hdr, pixels, mask, source, classes, new))
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
        ready=inventory.labelled_series > 0, inventory=inventory, mismatches=mismatches,
        site=site_profile(profiles), series=profiles, problems=listed,
    )
    return report, ids


_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")


def scrub(text: str) -> str:
    """Remove anything shaped like a UID from a message (a last line of defence)."""
    return _UID_LIKE.sub("<UID>", text)


def _without_names(message: str, path: Path) -> str:
    """A mask error without the mask's file name (it is a SeriesInstanceUID), its folder or UIDs.
    The messages are fedscan's own (numbers and shapes); readers' exception texts stay local."""
    message = message.replace(str(path.parent), "")
    for named in (f"DICOM SEG {path.name}", f"mask {path.name}"):
        message = message.replace(named, "the DICOM SEG" if named.startswith("DICOM") else "the mask")
    return scrub(message.replace(path.name, "the mask file"))
