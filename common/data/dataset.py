"""A site's training data: preprocessed slices, their masks, and the patient-level split.

``prepare_site`` turns a site folder into arrays (through the cache), ``split_patients``
keeps every patient on one side of the train/validation split, and ``SliceDataset`` serves
the slices to torch. Nothing here needs Flower.
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
from fedscan.common.data.dicom import list_files, read_pixels, scan_site
from fedscan.common.data.labels import load_mask, mask_path
from fedscan.common.data.layout import SiteDir, check_site
from fedscan.common.data.preprocess import pad_to_square, resize_images, resize_labels, window
from fedscan.common.errors import FedscanError

log = logging.getLogger(__name__)


@dataclass
class SiteData:
    """Preprocessed slices of one site, all arrays indexed by slice."""

    images: np.ndarray  # float32 (n, size, size), in [0, 1]
    masks: np.ndarray  # uint8 (n, size, size), class index per pixel
    patient: np.ndarray  # int32 (n,), patient index (no identifiers)
    series: np.ndarray  # int32 (n,), series index
    spacing: np.ndarray  # float32 (n, 3): row, column, slice spacing in mm at model size

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_patients(self) -> int:
        return int(np.unique(self.patient).size)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("images", "masks", "patient", "series", "spacing")}


def _normalize(pixels: np.ndarray, modality: str, cfg: RunConfig) -> np.ndarray:
    if modality == "CT":
        return window(pixels, *cfg.ct_window)
    lo, hi = np.percentile(pixels, [1.0, 99.0])  # robust per-series scaling for MR and others
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def preprocess_params(cfg: RunConfig) -> dict[str, object]:
    return {"task": cfg.task, "image_size": cfg.image_size, "ct_window": list(cfg.ct_window)}


def build_site_data(site: SiteDir, cfg: RunConfig) -> SiteData:
    """Read DICOM and masks and preprocess them (no cache)."""
    check_site(site, cfg.task)
    scan = scan_site(site.images)
    if scan.skipped:
        log.warning("site %s: %d file(s) not ingested", site.name, len(scan.skipped))
        for s in scan.skipped[:20]:
            log.warning("  %s: %s", s.path, s.reason)
    if not scan.series:
        raise FedscanError(f"site '{site.name}': no readable DICOM image series under {site.images}")
    size = cfg.image_size
    patients = sorted({s.patient_id for s in scan.series})
    images, masks, patient, series, spacing = [], [], [], [], []
    unlabelled = 0
    for si, hdr in enumerate(scan.series):
        mpath = mask_path(site.labels, hdr.series_uid)
        if not mpath.is_file():
            unlabelled += 1
            continue
        mask = load_mask(mpath, hdr)
        pix = _normalize(read_pixels(hdr), hdr.modality, cfg)
        pix, mask = pad_to_square(pix), pad_to_square(mask)
        images.append(resize_images(pix, size))
        masks.append(resize_labels(mask, size))
        n = pix.shape[0]
        scale = pix.shape[-1] / size
        patient.append(np.full(n, patients.index(hdr.patient_id), dtype=np.int32))
        series.append(np.full(n, si, dtype=np.int32))
        row_mm, col_mm = hdr.spacing
        spacing.append(np.tile([row_mm * scale, col_mm * scale, hdr.slice_spacing], (n, 1)))
    if unlabelled:
        log.warning("site %s: %d of %d series have no mask and are not used", site.name,
                    unlabelled, len(scan.series))
    if not images:
        raise FedscanError(
            f"site '{site.name}' has images but no labels: none of its {len(scan.series)} series "
            f"has a mask {site.labels}/<SeriesInstanceUID>.nii.gz"
        )
    return SiteData(
        images=np.concatenate(images),
        masks=np.concatenate(masks),
        patient=np.concatenate(patient),
        series=np.concatenate(series),
        spacing=np.concatenate(spacing).astype(np.float32),
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
        return SiteData(**hit)
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


class SliceDataset(Dataset):
    """2D slices and masks as tensors: x (1, H, W) float, y (1, H, W) long."""

    def __init__(self, data: SiteData, indices: np.ndarray) -> None:
        self.data = data
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        x = torch.from_numpy(np.array(self.data.images[j], dtype=np.float32))[None]
        y = torch.from_numpy(np.array(self.data.masks[j], dtype=np.int64))[None]
        return x, y
