"""A site's training data: preprocessed slices, their labels, and the patient-level split.

``prepare_site`` turns a site folder into arrays (through the cache), ``split_patients``
keeps every patient on one side of the train/validation split, and the datasets serve
them to torch: ``SliceDataset`` (slice and mask), ``ImageDataset`` (image and class) and
``ExamDataset`` (all images of an exam and its class). Nothing here needs Flower.

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
import torch
from torch.utils.data import Dataset

from fedscan.common.config import RunConfig
from fedscan.common.data import cache
from fedscan.common.data.dicom import SeriesHeader, SiteScan, list_files, read_series, scan_site
from fedscan.common.data.labels import LABELS_CSV, UNKNOWN_SERIES, MaskIndex, index_masks, read_class_labels
from fedscan.common.data.layout import SiteDir, check_site
from fedscan.common.data.preprocess import PREPROCESS_VERSION, fit_images, fit_labels, normalize
from fedscan.common.data.quality import series_snr
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
        return [order[bounds[k]:bounds[k + 1]] for k in range(self.n_samples)]

    def site_snr(self) -> float | None:
        """The site's SNR, as its quality profile gives it: the median over its series."""
        if self.snr is None:
            return None
        per_series = np.unique(np.stack([np.asarray(self.series, np.float64), np.asarray(self.snr, np.float64)]), axis=1)
        values = per_series[1][np.isfinite(per_series[1])]
        return float(np.median(values)) if values.size else None

    def as_arrays(self) -> dict[str, np.ndarray]:
        names = ("images", "patient", "series", "spacing", "masks", "sample", "target", "snr", "lesion")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


NO_MASK = 255  # SiteData.lesion on slices whose series has no mask


def preprocess_params(cfg: RunConfig) -> dict[str, object]:
    params = {"task": cfg.task, "image_size": cfg.image_size, "ct_window": list(cfg.ct_window),
              "num_classes": cfg.num_classes, "intensity_percentiles": list(cfg.intensity_percentiles),
              "pixel_spacing": cfg.pixel_spacing, "preprocess_version": PREPROCESS_VERSION}
    if cfg.ct_normalization != "window":  # the caches of windowed CT keep their keys
        params["ct_normalization"] = cfg.ct_normalization
    return params


def scan_site_dir(site: SiteDir) -> SiteScan:
    """Scan a site's images (and DICOM SEG objects under labels/); log what is not used."""
    extra = [p for p in list_files(site.labels) if not p.name.endswith((".nii.gz", ".nii", ".csv"))]
    scan = scan_site(site.images, extra_files=extra)
    if scan.skipped:
        log.warning("site %s: %d of %d file(s) not used (run `fedscan site check` for the full list)",
                    site.name, len(scan.skipped), scan.n_files)
        for s in scan.skipped[:20]:
            log.warning("  %s: %s", s.path, s.reason)
    for hdr in scan.series:
        for w in hdr.warnings:
            log.warning("site %s: a %s series (%d slices): %s", site.name, hdr.modality, len(hdr), w)
    if not scan.series:
        raise FedscanError(f"site '{site.name}': no readable DICOM image series under {site.images}",
                           hint="run `fedscan site check --data SITE_DIR` to see why each file was not used")
    return scan


def decode_series(site: SiteDir, hdr: SeriesHeader) -> tuple[SeriesHeader, np.ndarray] | None:
    """The series' rescaled pixels; slices that fail to decode are dropped and logged."""
    pixels, ok, failed = read_series(hdr)
    for f in failed:
        log.warning("site %s: %s: %s (%s)", site.name, f.path, f.reason, f.detail)
    if not ok.any():
        return None
    if not ok.all():
        return hdr.subset(ok), pixels[ok]
    return hdr, pixels


def model_input(hdr: SeriesHeader, pixels: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, tuple[float, float]]:
    """The series normalized for its modality and put on the model grid, and its spacing there."""
    norm = normalize(pixels, hdr.modality, cfg.ct_window, cfg.intensity_percentiles, cfg.ct_normalization)
    return fit_images(norm, hdr.spacing, cfg.image_size, cfg.pixel_spacing)


def _add_slices(
    index: dict[str, list[np.ndarray]], n: int, patient: int, series: int, hdr: SeriesHeader,
    model_spacing: tuple[float, float], snr: float | None,
) -> None:
    """Record n slices' patient and series indices, their spacing at model size and their series' SNR."""
    index["snr"].append(np.full(n, np.nan if snr is None else snr, dtype=np.float32))
    index["patient"].append(np.full(n, patient, dtype=np.int32))
    index["series"].append(np.full(n, series, dtype=np.int32))
    index["spacing"].append(np.tile([model_spacing[0], model_spacing[1], hdr.slice_spacing], (n, 1)))


def _stack(index: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.concatenate(v) for k, v in index.items()}
    out["spacing"] = out["spacing"].astype(np.float32)
    return out


def build_site_data(site: SiteDir, cfg: RunConfig) -> SiteData:
    """Read DICOM and labels and preprocess them (no cache)."""
    check_site(site, cfg.task)
    if cfg.task == "classification":
        return _build_classification(site, cfg)
    return _build_segmentation(site, cfg)


def _build_segmentation(site: SiteDir, cfg: RunConfig) -> SiteData:
    scan = scan_site_dir(site)
    all_series = scan.series
    masks_of = index_masks(site.labels, scan)
    for p in masks_of.problems:
        log.warning("site %s: %s: %s", site.name, p.path, p.reason)
    patients = sorted({s.patient_id for s in all_series})
    images, masks = [], []
    index: dict[str, list[np.ndarray]] = {"patient": [], "series": [], "spacing": [], "snr": []}
    unlabelled = mismatched = 0
    for si, hdr in enumerate(all_series):
        if hdr.series_uid not in masks_of.sources:
            unlabelled += 1
            continue
        decoded = decode_series(site, hdr)
        if decoded is None:
            continue
        hdr, pixels = decoded
        try:
            mask = masks_of.load(hdr)
        except FedscanError as exc:  # counted and reported; the other series still train
            mismatched += 1
            log.warning("site %s: %s", site.name, exc.message)
            continue
        except Exception:  # a mask file no reader expected: still only this series is lost
            mismatched += 1
            log.exception("site %s: mask %s could not be used", site.name, masks_of.sources[hdr.series_uid])
            continue
        if int(mask.max(initial=0)) >= cfg.num_classes:
            raise FedscanError(
                f"site '{site.name}': mask {masks_of.sources[hdr.series_uid].name} holds class "
                f"{int(mask.max())}, but the run has num_classes = {cfg.num_classes} "
                f"(classes 0..{cfg.num_classes - 1})",
                hint="set num_classes in the run config to the number of mask classes, background included",
            )
        pix, model_spacing = model_input(hdr, pixels, cfg)
        images.append(pix)
        masks.append(fit_labels(mask, hdr.spacing, cfg.image_size, cfg.pixel_spacing))
        _add_slices(index, pix.shape[0], patients.index(hdr.patient_id), si, hdr, model_spacing, series_snr(pixels))
    if unlabelled or mismatched or masks_of.problems:
        log.warning("site %s: label mismatches: %d series without a mask, %d mask(s) not matching their "
                    "series, %d mask(s) for no series here", site.name, unlabelled, mismatched,
                    sum(1 for p in masks_of.problems if UNKNOWN_SERIES in p.reason))
    if not images:
        raise FedscanError(
            f"site '{site.name}' has images but no labels: none of its {len(all_series)} series "
            f"has a usable mask ({site.labels}/<SeriesInstanceUID>.nii.gz or a DICOM SEG object)",
            hint="run `fedscan site check --data SITE_DIR` to see how the masks match the series",
        )
    return SiteData(images=np.concatenate(images), masks=np.concatenate(masks), **_stack(index))


def _build_classification(site: SiteDir, cfg: RunConfig) -> SiteData:
    """Images with class labels from labels.csv, grouped into samples (images or exams)."""
    scan = scan_site_dir(site)
    all_series = scan.series
    table = read_class_labels(site.labels / LABELS_CSV, cfg.num_classes)
    masks_of = index_masks(site.labels, scan)  # optional lesion masks, for explanations only
    lesions: list[np.ndarray] = []
    patients = sorted({s.patient_id for s in all_series})
    sample_ids: dict[str, int] = {}  # the labelled UID of each sample -> sample index
    images, sample, target = [], [], []
    index: dict[str, list[np.ndarray]] = {"patient": [], "series": [], "spacing": [], "snr": []}
    matched: set[str] = set()
    unlabelled_series = 0
    # exams keyed by study gather all their series; keep a study's series together
    ordered = sorted(enumerate(all_series), key=lambda t: (t[1].study_uid, t[1].series_uid))
    for si, hdr in ordered:
        if table.key == "SOPInstanceUID":
            keep = np.array([u in table.labels for u in hdr.sop_uids])
        else:
            uid = hdr.series_uid if table.key == "SeriesInstanceUID" else hdr.study_uid
            keep = np.full(len(hdr), uid in table.labels)
        if not keep.any():
            unlabelled_series += 1
            continue
        decoded = decode_series(site, hdr.subset(keep))
        if decoded is None:
            continue
        hdr, pixels = decoded
        if table.key == "SOPInstanceUID":
            keys = list(hdr.sop_uids)
        else:
            keys = [hdr.series_uid if table.key == "SeriesInstanceUID" else hdr.study_uid] * len(hdr)
        pix, model_spacing = model_input(hdr, pixels, cfg)
        images.append(pix)
        lesions.append(_lesion_mask(site, masks_of, hdr, cfg, pix.shape))
        for k in keys:
            matched.add(k)
            if k not in sample_ids:
                sample_ids[k] = len(sample_ids)
                target.append(table.labels[k])
            sample.append(sample_ids[k])
        _add_slices(index, len(keys), patients.index(hdr.patient_id), si, hdr, model_spacing, series_snr(pixels))
    unknown = len(table.labels) - len(matched)
    if unknown:
        log.warning("site %s: %d row(s) of %s match no image %s here", site.name, unknown,
                    LABELS_CSV, table.key)
    if unlabelled_series:
        log.warning("site %s: %d of %d series have no label and are not used", site.name,
                    unlabelled_series, len(all_series))
    if not images:
        raise FedscanError(
            f"site '{site.name}': none of the {len(table.labels)} rows of {LABELS_CSV} "
            f"matches an image {table.key} at this site"
        )
    arrays = _stack(index)
    sample_arr = np.asarray(sample, dtype=np.int32)
    pairs = np.unique(np.stack([sample_arr, arrays["patient"]]), axis=1)
    if pairs.shape[1] != len(target):  # the patient-level split would cut such an exam in two
        raise FedscanError(
            f"site '{site.name}': {pairs.shape[1] - len(target)} labelled exam(s) hold images of "
            f"more than one PatientID",
            hint="every image of an exam must carry the same PatientID",
        )
    lesion = np.concatenate(lesions)
    return SiteData(images=np.concatenate(images), **arrays, sample=sample_arr,
                    target=np.asarray(target, dtype=np.int64),
                    lesion=None if (lesion == NO_MASK).all() else lesion)


def _lesion_mask(site: SiteDir, masks_of: MaskIndex, hdr: SeriesHeader, cfg: RunConfig,
                 shape: tuple[int, ...]) -> np.ndarray:
    """A classification series' lesion mask on the model grid (any class > 0 is lesion), or NO_MASK."""
    if hdr.series_uid in masks_of.sources:
        try:
            mask = (masks_of.load(hdr) > 0).astype(np.uint8)
            return fit_labels(mask, hdr.spacing, cfg.image_size, cfg.pixel_spacing)
        except FedscanError as exc:  # the labels still train; only this series' explanation scores are lost
            log.warning("site %s: lesion mask not used: %s", site.name, exc.message)
    return np.full(shape, NO_MASK, dtype=np.uint8)


def prepare_site(site: SiteDir, cfg: RunConfig, cache_root: Path | None) -> SiteData:
    """The site's preprocessed data, from the cache when the files and settings are unchanged."""
    if cache_root is None:
        return build_site_data(site, cfg)
    files = list_files(site.images) + (list_files(site.labels) if site.labels.is_dir() else [])
    key = cache.cache_key(site.path, files, preprocess_params(cfg))
    entry = Path(cache_root) / f"{site.name}-{key}"
    hit = cache.load(entry)
    if hit is not None:
        return SiteData(**hit)  # type: ignore[arg-type]
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


def _image(data: SiteData, j: int) -> torch.Tensor:
    return torch.from_numpy(np.array(data.images[j], dtype=np.float32))[None]


class SliceDataset(Dataset):
    """2D slices and masks as tensors: x (1, H, W) float, y (1, H, W) long."""

    def __init__(self, data: SiteData, indices: np.ndarray) -> None:
        if data.masks is None:
            raise ValueError("this site's data has no segmentation masks")
        self.data = data
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        y = torch.from_numpy(np.array(self.data.masks[j], dtype=np.int64))[None]  # type: ignore[index]
        return _image(self.data, j), y


class ImageDataset(Dataset):
    """Single labelled images: x (1, H, W) float and its class. Samples must be one image each."""

    def __init__(self, data: SiteData, samples: np.ndarray) -> None:
        slices = data.slices_of()
        self.samples = np.asarray(samples)
        if any(len(slices[k]) != 1 for k in self.samples):
            raise ValueError("ImageDataset needs samples of one image each")
        self.data = data
        self.slice_of = np.array([slices[k][0] for k in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.samples.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _image(self.data, int(self.slice_of[i])), int(self.data.target[self.samples[i]])  # type: ignore[index]


class ExamDataset(Dataset):
    """Whole exams: x (n_images, 1, H, W) in geometric order, and the exam's class."""

    def __init__(self, data: SiteData, samples: np.ndarray) -> None:
        self.data = data
        self.samples = np.asarray(samples)
        self.slices = data.slices_of()

    def __len__(self) -> int:
        return int(self.samples.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        k = int(self.samples[i])
        idx = self.slices[k]
        x = torch.from_numpy(np.array(self.data.images[idx], dtype=np.float32))[:, None]
        return x, int(self.data.target[k])  # type: ignore[index]
