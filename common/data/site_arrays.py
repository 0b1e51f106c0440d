"""A site's training arrays: preprocessed slices, their labels, and the patient-level split.

``prepare_site`` turns a site folder into a ``SiteData`` (through the cache), reading it with
the one site reader (``fedscan.common.data.site_reader``): the series are decoded, masked,
normalized and put on the model grid per series, in the reader's worker processes when it has
them. ``split_patients`` keeps every patient on one side of the train/validation split. The
torch Datasets over these arrays are in ``fedscan.common.data.torch_datasets``. Nothing here
needs Flower.

For segmentation every slice has a mask. For classification the labelled unit is a
*sample*: one image (labels keyed by SOPInstanceUID) or one exam (keyed by
SeriesInstanceUID or StudyInstanceUID); ``sample[i]`` says which sample slice ``i``
belongs to and ``target[k]`` is sample ``k``'s class. Only labelled images are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedscan.common.config import RunConfig
from fedscan.common.data import cache
from fedscan.common.data.dicom import SeriesHeader, list_files
from fedscan.common.data.labels import LABELS_CSV, UNKNOWN_SERIES
from fedscan.common.data.layout import LAYOUT_HINT, SiteDir
from fedscan.common.data.preprocess import PREPROCESS_VERSION, fit_images, fit_labels, normalize
from fedscan.common.data.quality import series_snr
from fedscan.common.data.site_reader import SeriesRecord, SiteReader, log_problems
from fedscan.common.errors import FedscanError

log = logging.getLogger(__name__)


@dataclass
class SiteData:
    """Preprocessed slices of one site, all arrays indexed by slice."""

    images: np.ndarray  # float32 (n, size, size), in [0, 1]
    patient: np.ndarray  # int32 (n,), patient index (no identifiers)
    series: np.ndarray  # int32 (n,), series index
    spacing: np.ndarray  # float32 (n, 3): row, column, slice spacing in mm at model size
    masks: np.ndarray | None = None  # segmentation: uint8 (n, size, size), class per pixel
    sample: np.ndarray | None = None  # classification: int32 (n,), the sample of each slice
    target: np.ndarray | None = None  # classification: int64 (n_samples,), class per sample
    snr: np.ndarray | None = None  # float32 (n,), the SNR of each slice's series (NaN: unknown)
    # classification: uint8 (n, size, size) lesion masks where the site has them (1: lesion), for
    # scoring explanations; NO_MASK on the slices of a series without a mask
    lesion: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_patients(self) -> int:
        return int(np.unique(self.patient).size)

    @property
    def n_samples(self) -> int:
        return 0 if self.target is None else int(self.target.shape[0])

    def samples_of(self, slice_indices: np.ndarray) -> np.ndarray:
        """The samples whose slices are among ``slice_indices`` (sorted sample indices)."""
        if self.sample is None:
            raise ValueError("this site's data has no class labels")
        return np.unique(np.asarray(self.sample)[np.asarray(slice_indices)])

    def slices_of(self) -> list[np.ndarray]:
        """For each sample, its slice indices in geometric order."""
        if self.sample is None:
            raise ValueError("this site's data has no class labels")
        sample = np.asarray(self.sample)
        order = np.argsort(sample, kind="stable")
        bounds = np.searchsorted(sample[order], np.arange(self.n_samples + 1))
        return [order[bounds[k] : bounds[k + 1]] for k in range(self.n_samples)]

    def site_snr(self) -> float | None:
        """The site's SNR, as its quality profile gives it: the median over its series."""
        if self.snr is None:
            return None
        per_series = np.unique(
            np.stack([np.asarray(self.series, np.float64), np.asarray(self.snr, np.float64)]), axis=1
        )
        values = per_series[1][np.isfinite(per_series[1])]
        return float(np.median(values)) if values.size else None

    def as_arrays(self) -> dict[str, np.ndarray]:
        names = ("images", "patient", "series", "spacing", "masks", "sample", "target", "snr", "lesion")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


NO_MASK = 255  # SiteData.lesion on slices whose series has no mask


def preprocess_params(cfg: RunConfig) -> dict[str, object]:
    params = {
        "task": cfg.task,
        "image_size": cfg.image_size,
        "ct_window": list(cfg.ct_window),
        "num_classes": cfg.num_classes,
        "intensity_percentiles": list(cfg.intensity_percentiles),
        "pixel_spacing": cfg.pixel_spacing,
        "preprocess_version": PREPROCESS_VERSION,
    }
    if cfg.ct_normalization != "window":  # the caches of windowed CT keep their keys
        params["ct_normalization"] = cfg.ct_normalization
    return params


def model_input(
    hdr: SeriesHeader, pixels: np.ndarray, cfg: RunConfig
) -> tuple[np.ndarray, tuple[float, float]]:
    """The series normalized for its modality and put on the model grid, and its spacing there."""
    norm = normalize(pixels, hdr.modality, cfg.ct_window, cfg.intensity_percentiles, cfg.ct_normalization)
    return fit_images(norm, hdr.spacing, cfg.image_size, cfg.pixel_spacing)


def open_reader(site: SiteDir, cfg: RunConfig, workers: int | None = 1) -> SiteReader:
    """The site's reader for training, after the checks training needs: DICOM present, labels
    present (each error names the site and what is missing). Logs what it will not use."""
    if not site.path.is_dir():
        raise FedscanError(f"site '{site.name}': folder {site.path} does not exist", hint=LAYOUT_HINT)
    if not site.images.is_dir():
        raise FedscanError(f"site '{site.name}': {site.path} has no images/ folder", hint=LAYOUT_HINT)
    if cfg.task == "classification" and not (site.labels / LABELS_CSV).is_file():
        raise FedscanError(
            f"site '{site.name}' has images but no class labels: expected {site.labels}/labels.csv",
            hint=LAYOUT_HINT,
        )
    reader = SiteReader(site, workers, class_limit=cfg.num_classes if cfg.task == "classification" else None)
    if not reader.files:
        raise FedscanError(f"site '{site.name}': {site.images} holds no files", hint=LAYOUT_HINT)
    if cfg.task == "segmentation" and not reader.label_files and not reader.scan.segs:
        raise FedscanError(
            f"site '{site.name}' has images but no labels: expected "
            f"{site.labels}/<SeriesInstanceUID>.nii.gz or DICOM SEG objects",
            hint=LAYOUT_HINT,
        )
    scan = reader.scan
    if not scan.series:
        if all(s.reason in ("not a DICOM file", "not a readable DICOM file") for s in scan.skipped):
            raise FedscanError(
                f"site '{site.name}': no DICOM among the {len(reader.files)} files under {site.images}",
                hint=LAYOUT_HINT,
            )
        raise FedscanError(
            f"site '{site.name}': no readable DICOM image series under {site.images}",
            hint="run `fedscan site check --data SITE_DIR` to see why each file was not used",
        )
    if scan.skipped:
        log.warning(
            "site %s: %d of %d file(s) not used (run `fedscan site check` for the full list)",
            site.name,
            len(scan.skipped),
            scan.n_files,
        )
    for hdr in scan.series:
        for w in hdr.warnings:
            log.warning("site %s: a %s series (%d slices): %s", site.name, hdr.modality, len(hdr), w)
    return reader


def build_site_data(site: SiteDir, cfg: RunConfig, reader: SiteReader | None = None) -> SiteData:
    """Read DICOM and labels and preprocess them (no cache). ``reader``: a reader of this site
    to use (its ``problems`` then hold everything found); one is opened otherwise."""
    own = reader is None
    reader = reader or open_reader(site, cfg, cfg.workers)
    try:
        if cfg.task == "classification":
            return _build_classification(reader, cfg)
        return _build_segmentation(reader, cfg)
    finally:
        log_problems(site, reader.problems)
        if own:
            reader.close()


@dataclass
class _SeriesArrays:
    """One series on the model grid (what a worker sends back: small arrays, no pixels)."""

    hdr: SeriesHeader | None = None  # the slices used; None: the series is not used
    images: np.ndarray | None = None
    masks: np.ndarray | None = None
    model_spacing: tuple[float, float] = (0.0, 0.0)
    snr: float | None = None
    mask_failed: bool = False
    max_class: int = 0


def _segmentation_series(rec: SeriesRecord, cfg: RunConfig) -> _SeriesArrays:
    decoded = rec.read_pixels()
    if decoded is None:
        return _SeriesArrays()
    hdr, pixels = decoded
    mask = rec.load_mask(hdr)
    if mask is None:  # counted and reported; the other series still train
        return _SeriesArrays(mask_failed=True)
    max_class = int(mask.max(initial=0))
    if max_class >= cfg.num_classes:
        return _SeriesArrays(max_class=max_class)
    images, model_spacing = model_input(hdr, pixels, cfg)
    return _SeriesArrays(
        hdr,
        images,
        fit_labels(mask, hdr.spacing, cfg.image_size, cfg.pixel_spacing),
        model_spacing,
        series_snr(pixels),
        max_class=max_class,
    )


class _Index:
    """The per-slice index arrays of a site, built series by series."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {"patient": [], "series": [], "spacing": [], "snr": []}

    def add(
        self,
        n: int,
        patient: int,
        series: int,
        hdr: SeriesHeader,
        model_spacing: tuple[float, float],
        snr: float | None,
    ) -> None:
        """n slices' patient and series indices, their spacing at model size and their series' SNR."""
        self.parts["snr"].append(np.full(n, np.nan if snr is None else snr, dtype=np.float32))
        self.parts["patient"].append(np.full(n, patient, dtype=np.int32))
        self.parts["series"].append(np.full(n, series, dtype=np.int32))
        self.parts["spacing"].append(np.tile([model_spacing[0], model_spacing[1], hdr.slice_spacing], (n, 1)))

    def stack(self) -> dict[str, np.ndarray]:
        out = {k: np.concatenate(v) for k, v in self.parts.items()}
        out["spacing"] = out["spacing"].astype(np.float32)
        return out


def _build_segmentation(reader: SiteReader, cfg: RunConfig) -> SiteData:
    site, all_series = reader.site, reader.series
    patients = sorted({s.patient_id for s in all_series})
    records = reader.records()
    labelled = [r for r in records if r.mask_source is not None]
    images, masks = [], []
    index = _Index()
    mismatched = 0
    for rec, res in zip(
        labelled, reader.map(_segmentation_series, ((r, (cfg,)) for r in labelled)), strict=True
    ):
        if res.mask_failed:
            mismatched += 1
        if res.max_class >= cfg.num_classes:
            assert rec.mask_source is not None
            raise FedscanError(
                f"site '{site.name}': mask {rec.mask_source.name} holds class "
                f"{res.max_class}, but the run has num_classes = {cfg.num_classes} "
                f"(classes 0..{cfg.num_classes - 1})",
                hint="set num_classes in the run config to the number of mask classes, background included",
            )
        if res.hdr is None or res.images is None or res.masks is None:
            continue
        images.append(res.images)
        masks.append(res.masks)
        index.add(
            len(res.images),
            patients.index(res.hdr.patient_id),
            rec.index,
            res.hdr,
            res.model_spacing,
            res.snr,
        )
    unlabelled = len(records) - len(labelled)
    if unlabelled or mismatched or reader.masks.problems:
        log.warning(
            "site %s: label mismatches: %d series without a mask, %d mask(s) not matching their "
            "series, %d mask(s) for no series here",
            site.name,
            unlabelled,
            mismatched,
            sum(1 for p in reader.masks.problems if UNKNOWN_SERIES in p.reason),
        )
    if not images:
        raise FedscanError(
            f"site '{site.name}' has images but no labels: none of its {len(all_series)} series "
            f"has a usable mask ({site.labels}/<SeriesInstanceUID>.nii.gz or a DICOM SEG object)",
            hint="run `fedscan site check --data SITE_DIR` to see how the masks match the series",
        )
    return SiteData(images=np.concatenate(images), masks=np.concatenate(masks), **index.stack())


def _classification_series(rec: SeriesRecord, keep: np.ndarray, cfg: RunConfig) -> _SeriesArrays:
    decoded = rec.read_pixels(keep)
    if decoded is None:
        return _SeriesArrays()
    hdr, pixels = decoded
    images, model_spacing = model_input(hdr, pixels, cfg)
    lesion = np.full(images.shape, NO_MASK, dtype=np.uint8)
    if rec.mask_source is not None:  # optional lesion masks, for explanations only
        mask = rec.load_mask(hdr)  # a mask that cannot be used loses only its explanation scores
        if mask is not None:
            lesion = fit_labels((mask > 0).astype(np.uint8), hdr.spacing, cfg.image_size, cfg.pixel_spacing)
    return _SeriesArrays(hdr, images, lesion, model_spacing, series_snr(pixels))


def _build_classification(reader: SiteReader, cfg: RunConfig) -> SiteData:
    """Images with class labels from labels.csv, grouped into samples (images or exams)."""
    site, all_series = reader.site, reader.series
    table = reader.labels
    assert table is not None  # open_reader checked that labels.csv is there
    patients = sorted({s.patient_id for s in all_series})
    sample_ids: dict[str, int] = {}  # the labelled UID of each sample -> sample index
    images, lesions, sample, target = [], [], [], []
    index = _Index()
    matched: set[str] = set()
    unlabelled_series = 0
    # exams keyed by study gather all their series; keep a study's series together
    ordered = sorted(reader.records(), key=lambda r: (r.header.study_uid, r.header.series_uid))
    work = []
    for rec in ordered:
        hdr = rec.header
        if table.key == "SOPInstanceUID":
            keep = np.array([u in table.labels for u in hdr.sop_uids])
        else:
            uid = hdr.series_uid if table.key == "SeriesInstanceUID" else hdr.study_uid
            keep = np.full(len(hdr), uid in table.labels)
        if not keep.any():
            unlabelled_series += 1
            continue
        work.append((rec, (keep, cfg)))
    for (rec, _), res in zip(work, reader.map(_classification_series, work), strict=True):
        used = res.hdr
        if used is None or res.images is None or res.masks is None:
            continue
        if table.key == "SOPInstanceUID":
            keys = list(used.sop_uids)
        else:
            keys = [used.series_uid if table.key == "SeriesInstanceUID" else used.study_uid] * len(used)
        images.append(res.images)
        lesions.append(res.masks)
        for k in keys:
            matched.add(k)
            if k not in sample_ids:
                sample_ids[k] = len(sample_ids)
                target.append(table.labels[k])
            sample.append(sample_ids[k])
        index.add(len(keys), patients.index(used.patient_id), rec.index, used, res.model_spacing, res.snr)
    unknown = len(table.labels) - len(matched)
    if unknown:
        log.warning(
            "site %s: %d row(s) of %s match no image %s here", site.name, unknown, LABELS_CSV, table.key
        )
    if unlabelled_series:
        log.warning(
            "site %s: %d of %d series have no label and are not used",
            site.name,
            unlabelled_series,
            len(all_series),
        )
    if not images:
        raise FedscanError(
            f"site '{site.name}': none of the {len(table.labels)} rows of {LABELS_CSV} "
            f"matches an image {table.key} at this site"
        )
    arrays = index.stack()
    sample_arr = np.asarray(sample, dtype=np.int32)
    pairs = np.unique(np.stack([sample_arr, arrays["patient"]]), axis=1)
    if pairs.shape[1] != len(target):  # the patient-level split would cut such an exam in two
        raise FedscanError(
            f"site '{site.name}': {pairs.shape[1] - len(target)} labelled exam(s) hold images of "
            f"more than one PatientID",
            hint="every image of an exam must carry the same PatientID",
        )
    lesion = np.concatenate(lesions)
    return SiteData(
        images=np.concatenate(images),
        **arrays,
        sample=sample_arr,
        target=np.asarray(target, dtype=np.int64),
        lesion=None if (lesion == NO_MASK).all() else lesion,
    )


def prepare_site(site: SiteDir, cfg: RunConfig, cache_root: Path | None) -> SiteData:
    """The site's preprocessed data, from the cache when the files and settings are unchanged."""
    if cache_root is None:
        return build_site_data(site, cfg)
    files = list_files(site.images) + (list_files(site.labels) if site.labels.is_dir() else [])
    key = cache.cache_key(site.path, files, preprocess_params(cfg))
    entry = Path(cache_root) / f"{site.name}-{key}"
    hit = cache.load(entry)
    if hit is not None:
        return SiteData(**hit)  # the entry holds exactly SiteData's arrays
    data = build_site_data(site, cfg)
    cache.save(entry, data.as_arrays())
    return data


def split_patients(patient: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice indices (train, val), split by patient: no patient is on both sides."""
    ids = np.unique(patient)
    if ids.size < 2:
        raise FedscanError(
            f"a site needs at least 2 patients for a patient-level train/validation split; "
            f"this one has {ids.size}"
        )
    rng = np.random.default_rng([seed, 31337])
    order = rng.permutation(ids)
    n_val = min(max(1, int(round(val_fraction * ids.size))), ids.size - 1)
    val_ids = order[:n_val]
    is_val = np.isin(patient, val_ids)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
