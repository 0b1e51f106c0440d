"""Image preprocessing per modality, and fitting series onto the model's square grid.

- CT: Hounsfield units through a (level, width) window to [0, 1]; or, with
  ``ct_normalization = "foreground"``, a per-series z-score over the body (the voxels above
  Otsu's threshold), which undoes a scanner's linear calibration error (a·HU + b, a > 0):
  the harmonization for federations whose sites' CT calibrations differ.
- MR and every other modality: robust per-series normalization: clip to the series'
  percentiles, then z-score.
- Grid: either resample in-plane to a fixed spacing and centre-crop or pad to the model size,
  or pad to square and resize to the model size.

Images are resized with antialiased bilinear interpolation; label maps class by class, so
that multi-class masks stay consistent. Everything works on (n, rows, cols) stacks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot

from fedscan.common.data.quality import otsu_threshold

# changes whenever the output of this module changes for the same settings (cache key)
PREPROCESS_VERSION = 2

# the z-score of the "foreground" CT normalization is clipped to +-this (bone, metal, air
# pockets inside the body are not worth a wide input range)
FOREGROUND_CLIP = 5.0


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to the window ``level +- width/2`` and scale to [0, 1].

    MONAI's ScaleIntensityRange(clip=True) gives the same numbers, at 368 against 70 ms here for
    100 slices of 512x512 (10.8 against 7.1 ms at 224x224)."""
    lo = level - width / 2.0
    out = np.subtract(hu, lo)
    out /= width  # in place, the same values as (hu - lo) / width: 0.26 -> 0.14 ms a 512x512 slice
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def robust_zscore(values: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Clip to the [low_pct, high_pct] percentiles of the whole stack, then z-score.

    MONAI's ClipIntensityPercentiles then NormalizeIntensity come within 2.4e-7 of this (they work
    in float32), at 1225 against 874 ms here for 100 slices of 512x512 (190 against 140 ms at
    224x224); the statistics here are float64, the clipped copy scaled in place."""
    lo, hi = np.percentile(values, [low_pct, high_pct])
    clipped = np.clip(values, lo, hi)  # float64: the percentiles are float64
    mean, std = float(clipped.mean()), float(clipped.std())
    clipped -= mean
    clipped /= max(std, 1e-6)
    return clipped.astype(np.float32)


# the foreground statistics are taken from at most this many voxels (an even stride through the
# series), so that a long series costs no more memory than its float32 copy
FOREGROUND_SAMPLE = 1 << 22


def foreground_zscore(values: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Z-score by the mean and spread of the series' foreground (above Otsu's threshold of the
    stack), after clipping to the foreground's [low_pct, high_pct] percentiles; the result is
    clipped to +-FOREGROUND_CLIP. A linear map a·x + b (a > 0) of the input gives the same output.

    Left out of the statistics: non-finite values (they stay as they are), and a fill at the
    stack's minimum that covers at least 1% of it and lies more than a tenth of the range below
    every other value: the padding a scanner stores outside its circular field of view (-2048
    or -3024 HU), which would otherwise become Otsu's "background" and leave air and body
    together in the "foreground"."""
    values = np.asarray(values)
    flat = values.reshape(-1)
    sample = flat[:: max(1, flat.size // FOREGROUND_SAMPLE)].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return values.astype(np.float32)
    low = sample.min()
    rest = sample[sample > low]
    if rest.size == 0:  # one value throughout
        return np.zeros(values.shape, dtype=np.float32)
    # padding: a fill at the minimum, well apart from every other value (air clipped at the
    # bottom of the stored range is not: the values next to it are there too)
    if rest.size <= 0.99 * sample.size and rest.min() - low > 0.1 * (sample.max() - low):
        sample = rest
    fg = sample[sample > otsu_threshold(sample)]
    if fg.size < 16:  # a flat series: nothing to separate
        fg = sample
    lo, hi = np.percentile(fg, [low_pct, high_pct])
    fg = np.clip(fg, lo, hi)
    mean, std = float(fg.mean()), max(float(fg.std()), 1e-6)
    out = np.empty(values.shape, dtype=np.float32)
    for i in range(values.shape[0]):  # slice by slice: float64 only one slice at a time
        z = (np.clip(values[i].astype(np.float64), lo, hi) - mean) / std
        out[i] = np.clip(z, -FOREGROUND_CLIP, FOREGROUND_CLIP)
    return out


def normalize(
    values: np.ndarray,
    modality: str,
    ct_window: tuple[float, float],
    percentiles: tuple[float, float],
    ct_normalization: str = "window",
) -> np.ndarray:
    """CT: windowed HU in [0, 1], or the foreground z-score; anything else: percentile clip and
    z-score per series."""
    if modality == "CT":
        if ct_normalization == "foreground":
            return foreground_zscore(values, *percentiles)
        return window(values, *ct_window)
    return robust_zscore(values, *percentiles)


def pad_to_square(stack: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Pad (n, rows, cols) symmetrically so that rows == cols."""
    n, rows, cols = stack.shape
    side = max(rows, cols)
    return crop_or_pad(stack, side, side, fill)


def crop_or_pad(stack: np.ndarray, rows: int, cols: int, fill: float = 0.0) -> np.ndarray:
    """Centre-crop or pad (n, r, c) to (n, rows, cols); a crop alone is a view of ``stack``.

    Not MONAI's ResizeWithPadOrCrop: its centre crop starts at have // 2 - want // 2, a pixel off
    this one's (have - want) // 2 when have is even and want odd; and its SpatialPad, the same
    numbers, took 37 against 12 ms here to pad 100 slices of 320x260 to square (105 against 29 ms
    at 512x448, 3.4 against 2.5 ms at 224x192)."""
    out = stack
    for axis, want in ((1, rows), (2, cols)):
        have = out.shape[axis]
        if have > want:
            start = (have - want) // 2
            out = out[:, start : start + want] if axis == 1 else out[:, :, start : start + want]
        elif have < want:
            pad = [(0, 0)] * 3
            pad[axis] = ((want - have) // 2, want - have - (want - have) // 2)
            out = np.pad(out, pad, constant_values=fill)
    return out


def resize_images(stack: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a float stack (n, r, c) to (n, size, size) or (n, *size).

    Not MONAI's Resize: its anti-aliasing is a Gaussian blur before the interpolation (values up
    to 0.1 apart from torch's antialiased bilinear on windowed CT), and it took 1070 against 52 ms
    here for 100 slices of 512x512 to 96x96 (44 against 14 ms from 224x224)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if stack.shape[-2:] == hw:
        return stack.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].numpy()


def resize_labels(stack: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an integer label stack (n, r, c) to (n, size, size) or (n, *size), class by class."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if stack.shape[-2:] == hw:
        return stack.astype(np.uint8, copy=False)
    n_classes = int(stack.max()) + 1 if stack.size else 1
    if n_classes <= 2:  # binary: the same as the two-channel argmax below, at half the cost
        fg = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
        out = F.interpolate(fg, size=hw, mode="bilinear", antialias=True, align_corners=False)
        return (out[:, 0] > 0.5).numpy().astype(np.uint8)
    # MONAI's one_hot scatters straight into a (n, C, r, c) float tensor: 6.1 against 11.9 ms a 512x512
    # slice of 3 classes to 96x96 with torch's one_hot (channels last, then converted to float)
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.int64))[:, None]
    onehot = one_hot(t, num_classes=max(n_classes, 2), dim=1)
    out = F.interpolate(onehot, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return out.argmax(dim=1).numpy().astype(np.uint8)


def grid_plan(
    shape: tuple[int, int], spacing: tuple[float, float], size: int, target_spacing: float | None
) -> tuple[tuple[int, int], tuple[float, float]]:
    """The intermediate (rows, cols) a series is resampled to, and its spacing at model size."""
    rows, cols = shape
    if target_spacing is not None:
        hw = (
            max(1, round(rows * spacing[0] / target_spacing)),
            max(1, round(cols * spacing[1] / target_spacing)),
        )
        return hw, (target_spacing, target_spacing)
    side = max(rows, cols)
    return (rows, cols), (spacing[0] * side / size, spacing[1] * side / size)


def fit_images(
    stack: np.ndarray, spacing: tuple[float, float], size: int, target_spacing: float | None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Put a normalized stack on the model grid; padding takes the stack's minimum (background)."""
    fill = float(stack.min()) if stack.size else 0.0
    hw, model_spacing = grid_plan(stack.shape[-2:], spacing, size, target_spacing)
    if target_spacing is not None:
        return crop_or_pad(resize_images(stack, hw), size, size, fill), model_spacing
    return resize_images(pad_to_square(stack, fill), size), model_spacing


def fit_labels(
    stack: np.ndarray, spacing: tuple[float, float], size: int, target_spacing: float | None
) -> np.ndarray:
    """The same geometric transform as ``fit_images``, for a label stack."""
    hw, _ = grid_plan(stack.shape[-2:], spacing, size, target_spacing)
    if target_spacing is not None:
        return crop_or_pad(resize_labels(stack, hw), size, size, 0)
    return resize_labels(pad_to_square(stack, 0), size)


def unfit_probabilities(
    probs: np.ndarray,
    shape: tuple[int, int],
    spacing: tuple[float, float],
    size: int,
    target_spacing: float | None,
) -> np.ndarray:
    """The inverse of ``fit_images`` for per-class probabilities: (n, C, size, size) on the model
    grid back to (n, C, rows, cols) on the source grid of ``shape`` and ``spacing``.

    Each class map is resized with ``resize_images`` and the crop or pad undone; source pixels the
    model never saw (cropped away by ``fit_images``) get background: class 0 with probability 1.
    Take the argmax over axis 1 for a label map.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4 or probs.shape[2:] != (size, size):
        raise ValueError(f"probabilities of shape {probs.shape} are not (n, C, {size}, {size})")
    rows, cols = shape
    hw, _ = grid_plan((rows, cols), spacing, size, target_spacing)
    out = np.empty((*probs.shape[:2], rows, cols), dtype=np.float32)
    for c in range(probs.shape[1]):
        fill = 1.0 if c == 0 else 0.0  # what the model would say outside its view: background
        if target_spacing is not None:
            out[:, c] = resize_images(crop_or_pad(probs[:, c], *hw, fill=fill), (rows, cols))
        else:
            out[:, c] = crop_or_pad(resize_images(probs[:, c], max(rows, cols)), rows, cols, fill)
    return out
