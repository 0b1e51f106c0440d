"""Preprocessing per modality and resampling to a fixed in-plane spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedscan.common.config import RunConfig
from fedscan.common.data.preprocess import (
    FOREGROUND_CLIP,
    crop_or_pad,
    fit_images,
    fit_labels,
    normalize,
    resize_labels,
    robust_zscore,
)


def test_ct_is_windowed_and_mr_is_clipped_then_z_scored() -> None:
    hu = np.array([[-1000.0, -160.0], [240.0, 3000.0]])
    np.testing.assert_allclose(normalize(hu, "CT", (40.0, 400.0), (0.5, 99.5)), [[0, 0], [1, 1]])
    rng = np.random.default_rng(0)
    mr = rng.normal(300.0, 50.0, size=(4, 32, 32))
    mr[0, 0, :4] = 1e6  # a few hot pixels must not squash the rest
    z = robust_zscore(mr, 0.5, 99.5)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-4
    assert float(z.max()) < 4.0  # the outliers were clipped to the 99.5th percentile
    same = normalize(mr, "MR", (40.0, 400.0), (0.5, 99.5))
    np.testing.assert_array_equal(same, z)


def test_foreground_ct_normalization_undoes_a_calibration_error() -> None:
    rng = np.random.default_rng(1)
    hu = np.full((3, 64, 64), -1000.0)  # air around a body of soft tissue with a brighter lesion
    hu[:, 8:56, 8:56] = 40.0 + rng.normal(0.0, 12.0, size=(3, 48, 48))
    hu[:, 24:32, 24:32] += 60.0
    hu[0, 40, 40] = 3000.0  # metal
    ref = normalize(hu, "CT", (40.0, 400.0), (0.5, 99.5), "foreground")
    body = ref[:, 8:56, 8:56]
    assert abs(float(body.mean())) < 0.2 and 0.8 < float(body.std()) < 1.2  # standardized over the body
    assert (
        float(ref[:, 26:30, 26:30].mean()) - float(ref[:, 44:52, 44:52].mean()) > 3.0
    )  # the lesion stands out
    assert float(np.abs(ref).max()) <= FOREGROUND_CLIP
    # a scanner off by 1.3 x HU + 150: the window moves every value, the foreground z-score none
    off = 1.3 * hu + 150.0
    np.testing.assert_allclose(normalize(off, "CT", (40.0, 400.0), (0.5, 99.5), "foreground"), ref, atol=1e-5)
    assert (
        float(
            np.abs(
                normalize(off, "CT", (40.0, 400.0), (0.5, 99.5))
                - normalize(hu, "CT", (40.0, 400.0), (0.5, 99.5))
            ).mean()
        )
        > 0.2
    )
    # padding outside the field of view (-3024) is left out: the body keeps its statistics
    rows, cols = np.mgrid[:64, :64]
    padded = hu.copy()
    padded[:, (rows - 32) ** 2 + (cols - 32) ** 2 > 34**2] = -3024.0
    pz = normalize(padded, "CT", (40.0, 400.0), (0.5, 99.5), "foreground")
    np.testing.assert_allclose(pz[:, 8:56, 8:56], ref[:, 8:56, 8:56], atol=0.05)
    # air clipped at the bottom of the stored range is not padding
    clipped = np.maximum(hu + rng.normal(0.0, 20.0, size=hu.shape), -1010.0)
    cz = normalize(clipped, "CT", (40.0, 400.0), (0.5, 99.5), "foreground")
    assert abs(float(cz[:, 8:56, 8:56].mean())) < 0.2 and 0.8 < float(cz[:, 8:56, 8:56].std()) < 1.2
    # a NaN stays where it is; a blank or constant series gives zeros
    nan = hu.copy()
    nan[1, 0, 0] = np.nan
    nz = normalize(nan, "CT", (40.0, 400.0), (0.5, 99.5), "foreground")
    assert np.isnan(nz[1, 0, 0]) and np.isfinite(np.delete(nz.ravel(), 64 * 64)).all()
    for blank in (np.zeros((2, 8, 8), np.uint16), np.full((2, 8, 8), 7, np.int16)):
        assert not normalize(blank, "CT", (40.0, 400.0), (0.5, 99.5), "foreground").any()


def test_resample_to_spacing_keeps_physical_size() -> None:
    img = np.zeros((1, 100, 50), dtype=np.float32)
    img[0, 40:60, 20:30] = 1.0  # 20 mm x 20 mm at spacing (1.0, 2.0) mm
    out, spacing = fit_images(img, (1.0, 2.0), 64, 2.0)
    assert out.shape == (1, 64, 64) and spacing == (2.0, 2.0)
    rows, cols = np.nonzero(out[0] > 0.5)
    assert rows.max() - rows.min() + 1 == 10 and cols.max() - cols.min() + 1 == 10  # 20 mm at 2 mm
    mask = (img > 0).astype(np.uint8)
    np.testing.assert_array_equal(fit_labels(mask, (1.0, 2.0), 64, 2.0), (out > 0.5).astype(np.uint8))
    # without a target spacing: padded to square and resized; spacing follows the resize
    out2, spacing2 = fit_images(img, (1.0, 2.0), 64, None)
    assert out2.shape == (1, 64, 64) and spacing2 == pytest.approx((100 / 64, 200 / 64))


def test_centre_crop_and_pad_split_the_difference() -> None:
    stack = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
    out = crop_or_pad(stack, 3, 10, fill=-1.0)
    # rows 6 -> 3 keep rows 1..3 ((6 - 3) // 2 = 1 off the top); columns 7 -> 10: 1 before, 2 after
    assert out.shape == (2, 3, 10)
    np.testing.assert_array_equal(out[:, :, 1:8], stack[:, 1:4])
    assert (out[:, :, 0] == -1.0).all() and (out[:, :, 8:] == -1.0).all()
    crop = crop_or_pad(stack, 4, 4)  # a crop alone copies nothing
    assert np.shares_memory(crop, stack)
    np.testing.assert_array_equal(crop, stack[:, 1:5, 1:5])


def test_multi_class_labels_resize_as_their_class_maps() -> None:
    labels = np.zeros((3, 60, 44), dtype=np.uint8)
    labels[:, 10:40, 5:30] = 1
    labels[:, 20:50, 20:40] = 2
    labels[1, 45:, :] = 3
    out = resize_labels(labels, 32)
    maps = torch.from_numpy(np.stack([labels == c for c in range(4)], axis=1).astype(np.float32))
    resized = F.interpolate(maps, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert out.dtype == np.uint8 and out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out, resized.argmax(dim=1).numpy())
    assert set(np.unique(out[1])) == {0, 1, 2, 3} and 3 not in out[0]


def test_config_checks_preprocessing_values() -> None:
    assert RunConfig(pixel_spacing=0.8).pixel_spacing == 0.8
    with pytest.raises(ValueError, match="greater than 0"):
        RunConfig(pixel_spacing=0)
    with pytest.raises(ValueError, match="low < high"):
        RunConfig(intensity_percentiles=(99.0, 1.0))
    with pytest.raises(ValueError, match="width must be positive"):
        RunConfig(ct_window=(40.0, 0.0))
