"""U-Net shapes, weight round trips, and segmentation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedscan.common.array_records import load_record, to_record
from fedscan.common.config import MODELS, RunConfig
from fedscan.common.models.registry import available, build_model
from fedscan.common.tasks.segmentation import volume_metrics
from fedscan.common.weights import load_state, model_state, norm_keys


@pytest.mark.parametrize("size,base", [(32, 4), (64, 8), (96, 16)])
def test_unet_output_shape(size: int, base: int) -> None:
    model = build_model(RunConfig(image_size=size, base_channels=base)).eval()
    with torch.no_grad():
        out = model(torch.zeros(3, 1, size, size))
    assert out.shape == (3, 2, size, size)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_unet_depth_sets_pooling_and_upsampling_stages(depth: int) -> None:
    model = build_model(RunConfig(base_channels=4, unet_depth=depth, image_size=64, num_classes=3))
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(pools) == depth and len(ups) == depth
    # widths double after each pooling stage from the second on: b, b, 2b, 4b, ...
    assert [d.convs.conv_1.conv.out_channels for d in model.down] == [4 * 2**k for k in range(depth)]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_unet_depth_4_is_monai_basic_unet() -> None:
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    ref = BasicUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        features=(8, 8, 16, 32, 64, 8),
        norm=("instance", {"affine": True}),
        dropout=0.0,
    )
    torch.manual_seed(0)
    ours = build_model(RunConfig(base_channels=8))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x), ours(x))


def test_unet_depth_and_image_size_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 64 for unet"):
        RunConfig(unet_depth=6, image_size=96)


def test_registry_matches_config_choices() -> None:
    assert available() == MODELS


def test_same_seed_same_initial_weights_and_record_round_trip() -> None:
    torch.manual_seed(0)
    a = build_model(RunConfig(base_channels=4))
    torch.manual_seed(0)
    b = build_model(RunConfig(base_channels=4))
    rec = to_record(a)
    load_record(b, rec)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_load_record_rejects_wrong_shapes() -> None:
    a = build_model(RunConfig(base_channels=4))
    b = build_model(RunConfig(base_channels=8))
    with pytest.raises(ValueError, match="shape"):
        load_record(b, to_record(a))


def test_load_state_checks_names_and_casts_back_to_each_dtype() -> None:
    """The Flower-free loader: averaged integer buffers are rounded back; a missing or unknown
    name is refused, naming it; numpy arrays load as tensors do."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    state = {k: v.double() + 0.25 for k, v in model_state(model).items()}
    state["1.num_batches_tracked"] = torch.tensor(6.6)
    load_state(model, {k: v.numpy() for k, v in state.items()})
    got = model.state_dict()
    assert got["1.num_batches_tracked"].dtype == torch.long and int(got["1.num_batches_tracked"]) == 7
    assert got["0.weight"].dtype == torch.float32
    assert torch.allclose(got["0.weight"], state["0.weight"].float())
    with pytest.raises(ValueError, match="missing.*1.running_mean"):
        load_state(model, {k: v for k, v in state.items() if k != "1.running_mean"})
    with pytest.raises(ValueError, match="unexpected.*extra"):
        load_state(model, {**state, "extra": torch.zeros(1)})
    assert model_state(model, exclude=norm_keys(model)).keys() == {"0.weight", "0.bias"}


def test_weights_and_local_training_need_no_flower() -> None:
    """A site's training, FedBN's layers and weight loading work on state dicts: only the glue
    (fedscan.common.array_records and the apps) meets Flower."""
    import subprocess
    import sys

    code = (
        "import sys, fedscan.common.weights, fedscan.common.tasks.local_training, "
        "fedscan.common.tasks.fedbn_layers; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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


def test_volume_metrics_per_class_hand_computed() -> None:
    truth = np.zeros((1, 10, 10), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0:2, 0:5] = 1  # class 1: 10 voxels
    pred[0, 0:2, 0:5] = 1  # found exactly
    truth[0, 5:9, 5:9] = 2  # class 2: 16 voxels
    pred[0, 5:9, 5:7] = 2  # 8 of them found, no false positive
    m = volume_metrics(pred, truth, (1.0, 1.0, 1.0), 3)
    assert m["dice_class1"] == pytest.approx(1.0) and m["iou_class1"] == pytest.approx(1.0)
    assert m["dice_class2"] == pytest.approx(2 * 8 / (16 + 8)) and m["iou_class2"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx((1.0 + 2 / 3) / 2)  # mean over the foreground classes
    assert m["hd95_class1"] == pytest.approx(0.0) and m["hd95_class2"] == pytest.approx(2.0)
    assert m["hd95"] == pytest.approx(1.0)
    # a class absent from both is undefined, and left out of the mean
    m = volume_metrics(np.where(pred == 2, 0, pred), np.where(truth == 2, 0, truth), (1.0, 1.0, 1.0), 3)
    assert math.isnan(m["dice_class2"]) and m["dice"] == pytest.approx(1.0)


def test_site_evaluation_reports_lesion_detection(synth_root) -> None:
    from fedscan.common.data.layout import discover_sites
    from fedscan.common.tasks.local_training import evaluate_local, open_site

    cfg = RunConfig(image_size=32, base_channels=4, num_classes=3)
    site = open_site(discover_sites(synth_root)[0], cfg, None)
    torch.manual_seed(0)
    m = evaluate_local(build_model(cfg), site, cfg)
    assert {"dice", "lesion_sensitivity", "lesion_fp_per_image", "dice_class1", "dice_class2"} <= set(m)
    assert m["num-examples"] == site.val_idx.size
    assert m["lesion_fp_per_image"] >= 0.0
