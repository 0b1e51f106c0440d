"""Data-quality numbers for a series and a site: spacing, noise, intensities, labels.

The profile holds numbers and standard names only (modality, manufacturer, transfer syntax
names): no UIDs, names, dates or paths. It is what a site shows in `fedscan site check`, and
what the server may later use to weight sites by data quality (``SiteProfile.shareable``).

SNR estimate of a slice: (mean foreground - mean background) / sigma, with the foreground
split off by Otsu's threshold and sigma, the noise level, by Immerkaer's Laplacian-based
estimator (J. Immerkaer, "Fast noise variance estimation", CVIU 1996). It is a contrast-to-
noise ratio, so it is meaningful for CT (where the background is -1000 HU) as well as MR.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field


def noise_sigma(img: np.ndarray) -> float:
    """Immerkaer's estimate of additive Gaussian noise in a 2D image.

    Immerkaer's 3x3 mask [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] is the outer product of
    [1, -2, 1] with itself, so it is applied as two 1D second differences over the image's
    interior: the same estimate as ``scipy.ndimage.convolve`` with the full mask (within 1e-9
    relative) at a fifth of the cost (0.10 against 0.52 ms for a 224x224 slice, measured on
    the development machine): the SNR is taken for every series a site reads."""
    rows, cols = img.shape
    if rows < 3 or cols < 3:
        return float("nan")
    x = np.asarray(img, dtype=np.float32)
    d = x[:, :-2] + x[:, 2:]
    d -= 2.0 * x[:, 1:-1]
    resp = d[:-2] + d[2:]
    resp -= 2.0 * d[1:-1]
    return float(np.sqrt(np.pi / 2.0) * np.abs(resp).sum(dtype=np.float64) / (6.0 * (rows - 2) * (cols - 2)))


def otsu_threshold(img: np.ndarray, bins: int = 256, lo_hi: tuple[float, float] | None = None) -> float:
    """The threshold that maximises the between-class variance of the histogram.

    fedscan's own rather than scikit-image's ``threshold_otsu`` (the same definition on a
    256-bin histogram): ten lines, against a dependency of its own for one function. The
    histogram is one multiply and a ``bincount`` rather than ``np.histogram``, whose exact-edge
    corrections cost more passes than the rest of the SNR (figures in the comment below).
    ``lo_hi``: the image's minimum and maximum, when the caller has them already."""
    # np.histogram: 1.22 ms a 224x224 float32 slice, 1.88 at 512x512; this: 0.70 and 0.76 ms (the
    # slice SNR as a whole: 1.72 -> 0.80 and 4.9 -> 1.57 ms). A value within float rounding
    # of an inner bin edge may fall in the neighbouring bin: on 96 slices of the synthetic sites
    # every threshold came out the same.
    x = np.asarray(img)
    flat = (x if x.dtype == np.float64 else x.astype(np.float32, copy=False)).ravel()
    lo, hi = lo_hi if lo_hi is not None else (float(flat.min()), float(flat.max()))
    if not hi > lo:  # one value: np.histogram's range, so the threshold lies below it as before
        lo, hi = lo - 0.5, hi + 0.5
    scaled = flat - flat.dtype.type(lo)
    scaled *= flat.dtype.type(bins / (hi - lo))  # in place: the same values, one array fewer
    idx = scaled.astype(np.intp)
    np.minimum(idx, bins - 1, out=idx)
    hist = np.bincount(idx, minlength=bins)
    edges = np.linspace(lo, hi, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def slice_snr(img: np.ndarray) -> float:
    """Contrast-to-noise estimate of one slice; NaN for a flat or noise-free slice."""
    # NaN and infinities show in the minimum or maximum, which Otsu's histogram needs anyway, so
    # they are found once and passed on: the same values, two passes fewer (on 12 noise slices
    # 0.35 against 0.85 ms at 224x224, 1.95 against 2.07 at 512; on bench/ingest.py's CT the SNR
    # step moved from 0.41-0.50 to 0.40-0.42 ms a slice at 224, within that bench's noise)
    lo, hi = float(img.min()), float(img.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi == lo:
        return float("nan")
    t = otsu_threshold(img, lo_hi=(lo, hi) if img.dtype in (np.float32, np.float64) else None)
    # class means from sums, not from copies of each class, nor from scipy.ndimage.mean over the
    # two labels (10.1 against 2.7 ms a 512x512 slice, 1.6 against 0.34 at 224x224), nor from a
    # masked sum (``sum(where=)``: 1.85 ms at 512, 0.40 at 224): the foreground's sum is a float32
    # dot product with the mask, 0.07 and 0.013 ms, within 2e-7 of the float64 sum
    flat = np.asarray(img, dtype=np.float32).ravel()
    is_fg = flat > t
    n_fg = int(np.count_nonzero(is_fg))
    n_bg = img.size - n_fg
    sigma = noise_sigma(img)
    if n_fg == 0 or n_bg == 0 or not sigma > 0:
        return float("nan")
    total = float(flat.sum(dtype=np.float64))
    fg_sum = float(np.dot(flat, is_fg.astype(np.float32)))
    return float((fg_sum / n_fg - (total - fg_sum) / n_bg) / sigma)


def series_snr(pixels: np.ndarray) -> float | None:
    """A series' SNR: the median slice estimate over up to 12 slices spread through it."""
    snrs = [slice_snr(img) for img in pixels[sample_indices(len(pixels))]]
    finite = [v for v in snrs if np.isfinite(v)]
    return float(np.median(finite)) if finite else None


def quality_factor(snr: float | None, reference: float, floor: float) -> float:
    """A site's data-quality factor for quality weighting: ``clip(snr / reference, floor, 1)``.

    A site at or above the reference SNR counts fully; a noisier one down to ``floor`` of its
    example count. A site whose SNR cannot be estimated counts fully (no evidence against it).
    """
    if snr is None or not np.isfinite(snr):
        return 1.0
    return float(min(1.0, max(floor, snr / reference)))


def sample_indices(n: int, k: int = 12) -> np.ndarray:
    """Up to k slice indices spread evenly through a series."""
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(int)) if n else np.zeros(0, int)


def _nanmedian(values: list[float | None]) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else None


class SeriesProfile(BaseModel):
    """One series' quality numbers."""

    id: str = Field(description="s001, s002, ... in this report; no UID")
    modality: str
    manufacturer: str
    slices: int
    rows: int
    columns: int
    patient_geometry: bool
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    slice_spacing_mm: float
    snr: float | None = Field(description="median slice contrast-to-noise estimate")
    intensity_min: float | None = Field(description="after rescale (HU for CT)")
    intensity_max: float | None
    intensity_p1: float | None
    intensity_p99: float | None
    labelled_slice_fraction: float
    label_source: str = Field(description="nifti, dicom-seg, labels.csv or none")
    foreground_slice_fraction: float | None = Field(description="labelled slices with any foreground")
    foreground_pixel_fraction: float | None = Field(description="labelled pixels that are foreground")
    class_counts: dict[str, int] = Field(default_factory=dict, description="classification: labelled samples")
    warnings: list[str] = Field(default_factory=list)


class SiteProfile(BaseModel):
    """The site's quality numbers: medians and totals over its usable series."""

    series: int
    slices: int
    labelled_series: int
    labelled_slice_fraction: float
    pixel_spacing_mm: float | None = Field(description="median in-plane spacing")
    slice_thickness_mm: float | None = Field(description="median slice thickness")
    snr: float | None = Field(description="median series SNR")
    intensity_min: float | None
    intensity_max: float | None
    foreground_slice_fraction: float | None = Field(description="segmentation prevalence per slice")
    foreground_pixel_fraction: float | None
    class_fractions: dict[str, float] = Field(default_factory=dict, description="classification prevalence")

    def shareable(self) -> dict[str, float]:
        """Only the numbers (no standard names either) for a later quality weighting."""
        out = {
            k: float(v)
            for k, v in self.model_dump(exclude={"class_fractions"}).items()
            if isinstance(v, (int, float)) and v is not None
        }
        out.update({f"class_fraction_{k}": float(v) for k, v in self.class_fractions.items()})
        return out


def site_profile(series: list[SeriesProfile]) -> SiteProfile:
    slices = sum(s.slices for s in series)
    labelled = [s for s in series if s.labelled_slice_fraction > 0]
    labelled_slices = sum(s.slices * s.labelled_slice_fraction for s in series)
    seg = [s for s in labelled if s.foreground_slice_fraction is not None]
    seg_slices = sum(s.slices * s.labelled_slice_fraction for s in seg)
    counts: dict[str, int] = {}
    for s in series:
        for k, v in s.class_counts.items():
            counts[k] = counts.get(k, 0) + v
    total = sum(counts.values())
    mins = [s.intensity_min for s in series if s.intensity_min is not None]
    maxs = [s.intensity_max for s in series if s.intensity_max is not None]
    return SiteProfile(
        series=len(series),
        slices=slices,
        labelled_series=len(labelled),
        labelled_slice_fraction=labelled_slices / slices if slices else 0.0,
        pixel_spacing_mm=_nanmedian([float(np.mean(s.pixel_spacing_mm)) for s in series]),
        slice_thickness_mm=_nanmedian([s.slice_thickness_mm for s in series if s.slice_thickness_mm > 0]),
        snr=_nanmedian([s.snr for s in series]),
        intensity_min=min(mins) if mins else None,
        intensity_max=max(maxs) if maxs else None,
        foreground_slice_fraction=(
            sum((s.foreground_slice_fraction or 0.0) * s.slices * s.labelled_slice_fraction for s in seg)
            / seg_slices
            if seg_slices
            else None
        ),
        foreground_pixel_fraction=(
            sum((s.foreground_pixel_fraction or 0.0) * s.slices * s.labelled_slice_fraction for s in seg)
            / seg_slices
            if seg_slices
            else None
        ),
        class_fractions={k: v / total for k, v in sorted(counts.items())} if total else {},
    )
