"""Segmentation: loss, local training loop, and per-volume and lesion-level metrics.

Loss is MONAI's Dice (on the foreground classes, over the whole batch) plus cross-entropy.
Masks may hold any number of classes (``num_classes``, background included). The model
works on 2D slices; for evaluation the slices of each series are stacked back into a volume
and scored with MONAI metrics:

- ``dice`` and ``iou``: per series, averaged over foreground classes, then over series.
  A series with no foreground in its ground truth has no Dice and is left out (MONAI's
  ``ignore_empty``); false positives in the other series' empty slices do count. With more
  than one foreground class, ``dice_class<c>``, ``iou_class<c>`` and ``hd95_class<c>`` give
  each class's value as well.
- ``hd95``: 95th-percentile Hausdorff distance in mm. When the model finds nothing where the
  ground truth has foreground, the distance is undefined; it is then set to the diagonal of
  the volume, the worst possible value, rather than dropped.
- ``lesion_sensitivity`` and ``lesion_fp_per_image``: lesion-level detection, from connected
  components per image (see ``fedscan.common.tasks.metrics``), pooled over the site.
- ``loss``: the mean Dice+CE loss over validation slices.
- ``uncertainty_auroc`` (when asked for, in the final round): how well the test-time-augmentation
  uncertainty separates the wrong voxels of the prediction from the right ones
  (``fedscan.common.tasks.uncertainty``).

A metric with no defined value on a site (say, no lesion in its validation series) is NaN.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot
from torch import nn
from torch.utils.data import DataLoader

from fedscan.common.config import RunConfig
from fedscan.common.data.site_arrays import SiteData
from fedscan.common.data.torch_datasets import SliceDataset
from fedscan.common.tasks import metrics as lesion
from fedscan.common.tasks.loops import fit, seeded_loader
from fedscan.common.tasks.precision import Precision
from fedscan.common.tasks.uncertainty import predictive_entropy, tta_predict, uncertainty_auroc

log = logging.getLogger(__name__)

METRICS = ("dice", "iou", "hd95", *lesion.LESION_METRICS)
MAIN_METRIC = "dice"
# explanation scores a site may share, computed when evaluation is asked for them (the final round)
SCORES = ("uncertainty_auroc",)


def check_data(data: SiteData, cfg: RunConfig) -> None:
    """Masks were checked against ``num_classes`` when the site was read; nothing else to check."""
    if data.masks is None:
        raise ValueError("segmentation data without masks")


def make_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)


def train(
    model: nn.Module,
    data: SiteData,
    indices: np.ndarray,
    cfg: RunConfig,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    precision: Precision,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train ``model`` in place on the given slices; return scalar training metrics."""
    torch.manual_seed(seed)
    loader = seeded_loader(SliceDataset(data, indices), batch_size=batch_size, seed=seed, precision=precision)
    metrics = fit(
        model, lambda: loader, make_loss(), epochs=epochs, lr=lr, precision=precision, proximal_mu=proximal_mu
    )
    metrics["num-examples"] = float(len(indices))
    return metrics


@torch.no_grad()
def predict(
    model: nn.Module,
    data: SiteData,
    indices: np.ndarray,
    *,
    batch_size: int,
    precision: Precision,
    uncertainty: bool = False,
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Predicted label maps (n, H, W) for the given slices, the mean loss on them, and with
    ``uncertainty`` the voxel-wise TTA uncertainty (n, H, W) (``fedscan.common.tasks.uncertainty``)."""
    model = precision.place_model(model).eval()
    loss_fn = make_loss()
    loader = DataLoader(
        SliceDataset(data, indices), batch_size=batch_size, shuffle=False, pin_memory=precision.pin_memory
    )
    preds, maps, total = [], [], 0.0
    for x, y in loader:
        x, y = precision.place(x), precision.place(y)
        if uncertainty:
            logits, mean_probs = tta_predict(model, x, precision)
            maps.append(predictive_entropy(mean_probs))
            logits = logits.to(y.device)
        else:
            with precision.autocast():
                logits = model(x)
            logits = logits.float()
        total += float(loss_fn(logits, y)) * x.shape[0]
        preds.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    return np.concatenate(preds), total / max(len(indices), 1), np.concatenate(maps) if maps else None


def _onehot_volume(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """(D, H, W) labels -> (1, C, H, W, D) one-hot, as MONAI metrics expect."""
    t = torch.from_numpy(labels.astype(np.int64))[None, None]
    return one_hot(t, n_classes, dim=1).permute(0, 1, 3, 4, 2)


def volume_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], n_classes: int
) -> dict[str, float]:
    """Dice, IoU and HD95 of one volume (D, H, W), averaged over foreground classes.

    With more than one foreground class, each class's values are added as
    ``dice_class<c>``, ``iou_class<c>`` and ``hd95_class<c>``.
    """
    p, g = _onehot_volume(pred, n_classes), _onehot_volume(truth, n_classes)
    dice = compute_dice(p, g, include_background=False, ignore_empty=True)[0]
    iou = compute_iou(p, g, include_background=False, ignore_empty=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes; handled below
        hd = compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=spacing)[0]
    d, h, w = truth.shape
    diagonal = math.sqrt((h * spacing[0]) ** 2 + (w * spacing[1]) ** 2 + (d * spacing[2]) ** 2)
    hd_vals = torch.full((n_classes - 1,), math.nan)
    for c in range(1, n_classes):
        has_truth, has_pred = bool(g[0, c].any()), bool(p[0, c].any())
        if has_truth:
            hd_vals[c - 1] = float(hd[c - 1]) if has_pred else diagonal

    def mean(v: torch.Tensor) -> float:
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else math.nan

    out = {"dice": mean(dice), "iou": mean(iou), "hd95": mean(hd_vals)}
    if n_classes > 2:
        for c in range(1, n_classes):
            for name, vals in (("dice", dice), ("iou", iou), ("hd95", hd_vals)):
                out[f"{name}_class{c}"] = float(vals[c - 1])
    return out


def evaluate(
    model: nn.Module,
    data: SiteData,
    indices: np.ndarray,
    cfg: RunConfig,
    *,
    precision: Precision,
    scores: bool = False,
) -> dict[str, float]:
    """Per-site validation metrics: series-level means, lesion detection, loss, example count; with
    ``scores`` also the shareable explanation score ``uncertainty_auroc`` (see ``SCORES``)."""
    indices = np.asarray(indices)
    batch_size = max(cfg.batch_size, 16)
    try:
        preds, loss, entropy = predict(
            model, data, indices, batch_size=batch_size, precision=precision, uncertainty=scores
        )
    except Exception:  # the optional score must not cost the site its evaluation
        if not scores:
            raise
        log.warning("the uncertainty score could not be computed; evaluating without it", exc_info=True)
        preds, loss, entropy = predict(model, data, indices, batch_size=batch_size, precision=precision)
    out = prediction_metrics(preds, loss, entropy, data, indices, cfg)
    if scores and entropy is None:
        out["uncertainty_auroc"] = math.nan
    return out


def prediction_metrics(
    preds: np.ndarray,
    loss: float,
    entropy: np.ndarray | None,
    data: SiteData,
    indices: np.ndarray,
    cfg: RunConfig,
) -> dict[str, float]:
    """The metrics of :func:`evaluate` from ``predict``'s output for the slices ``indices``."""
    indices = np.asarray(indices)
    per_series: dict[str, list[float]] = {}
    counts = dict.fromkeys(lesion.LESION_COUNTS, 0)
    series_ids = np.asarray(data.series)[indices]
    masks = np.asarray(data.masks)
    for s in np.unique(series_ids):
        sel = series_ids == s
        truth = masks[indices[sel]]
        sx, sy, sz = (float(v) for v in np.asarray(data.spacing)[indices[sel][0]])
        vm = volume_metrics(preds[sel], truth, (sx, sy, sz), cfg.num_classes)
        for m, v in vm.items():
            per_series.setdefault(m, []).append(v)
        for k, v in lesion.lesion_counts(preds[sel], truth).items():
            counts[k] += v
    out = {m: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for m, v in per_series.items()}
    out.update(lesion.lesion_metrics(counts))
    out["loss"] = loss
    if entropy is not None:
        out["uncertainty_auroc"] = uncertainty_auroc(entropy, preds, masks[indices])
    out["num-examples"] = float(len(indices))
    return out
