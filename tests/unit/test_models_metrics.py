"""U-Net shapes, weight round trips, and segmentation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedscan.common.config import RunConfig
from fedscan.common.models.registry import NUM_CLASSES, available, build_model
from fedscan.common.config import MODELS
from fedscan.common.tasks.segmentation import volume_metrics
from fedscan.common.weights import load_record, to_record


@pytest.mark.parametrize("size,base", [(32, 4), (64, 8), (96, 16)])
def test_unet_output_shape(size: int, base: int) -> None:
    model = build_model(RunConfig(image_size=size, base_channels=base)).eval()
    with torch.no_grad():
        out = model(torch.zeros(3, 1, size, size))
    assert out.shape == (3, NUM_CLASSES, size, size)


def test_unet_is_an_encoder_decoder_with_skips() -> None:
    model = build_model(RunConfig(base_channels=8))
    names = {n.split(".")[0] for n, _ in model.named_children()}
    assert {"down_1", "down_4", "upcat_4", "upcat_1"} <= names  # 4 stages down, 4 up with concat


def test_registry_matches_config_choices() -> None:
    assert available() == MODELS


def test_same_seed_same_initial_weights_and_record_round_trip() -> None:
    torch.manual_seed(0)
    a = build_model(RunConfig(base_channels=4))
    torch.manual_seed(0)
    b = build_model(RunConfig(base_channels=4))
    rec = to_record(a)
    load_record(b, rec)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_load_record_rejects_wrong_shapes() -> None:
    a = build_model(RunConfig(base_channels=4))
    b = build_model(RunConfig(base_channels=8))
    with pytest.raises(ValueError, match="shape"):
        load_record(b, to_record(a))


def test_volume_metrics_hand_computed() -> None:
    truth = np.zeros((2, 10, 10), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0:4, 0:5] = 1  # 20 voxels
    pred[0, 0:4, 0:4] = 1  # 16 voxels, all inside the truth
    m = volume_metrics(pred, truth, (1.0, 1.0, 1.0), 2)
    assert m["dice"] == pytest.approx(2 * 16 / (20 + 16))
    assert m["iou"] == pytest.approx(16 / 20)
    assert m["hd95"] == pytest.approx(1.0)  # the missed column is 1 mm from the prediction


def test_volume_metrics_empty_cases() -> None:
    truth = np.zeros((1, 8, 8), dtype=np.uint8)
    # nothing to find and nothing found: Dice undefined, not 0 or 1
    m = volume_metrics(truth.copy(), truth, (1.0, 1.0, 1.0), 2)
    assert math.isnan(m["dice"]) and math.isnan(m["hd95"])
    # a lesion that the model missed entirely: Dice 0, HD95 the worst possible (the diagonal)
    truth[0, 2:4, 2:4] = 1
    m = volume_metrics(np.zeros_like(truth), truth, (2.0, 2.0, 5.0), 2)
    assert m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(math.sqrt(16**2 + 16**2 + 5**2))
