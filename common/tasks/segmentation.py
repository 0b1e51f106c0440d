"""Segmentation: loss, local training loop, and per-volume metrics from MONAI.

Loss is MONAI's Dice (on the foreground classes, over the whole batch) plus cross-entropy. The model works on 2D slices; for evaluation the
slices of each series are stacked back into a volume and scored with MONAI metrics on the
foreground classes:

- ``dice`` and ``iou``: per series, averaged over foreground classes, then over series.
  A series with no foreground in its ground truth has no Dice and is left out (MONAI's
  ``ignore_empty``); false positives in the other series' empty slices do count.
- ``hd95``: 95th-percentile Hausdorff distance in mm. When the model finds nothing where the
  ground truth has foreground, the distance is undefined; it is then set to the diagonal of
  the volume, the worst possible value, rather than dropped.
- ``loss``: the mean Dice+CE loss over validation slices.

A metric with no defined value on a site (say, no lesion in its validation series) is NaN.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance
from torch import nn
from torch.utils.data import DataLoader

from fedscan.common.data.dataset import SiteData, SliceDataset

METRICS = ("dice", "iou", "hd95")


def make_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)


def train(
    model: nn.Module,
    data: SiteData,
    indices: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Train ``model`` in place on the given slices; return scalar training metrics."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(
        SliceDataset(data, indices), batch_size=batch_size, shuffle=True, generator=gen,
        drop_last=len(indices) > batch_size, pin_memory=device.type == "cuda",
    )
    loss_fn = make_loss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.to(device).train()
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError("training loss is not finite")
            loss.backward()
            opt.step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
            steps += 1
    return {"train_loss": total / max(count, 1), "steps": float(steps)}


@torch.no_grad()
def predict(
    model: nn.Module, data: SiteData, indices: np.ndarray, *, batch_size: int, device: torch.device
) -> tuple[np.ndarray, float]:
    """Predicted label maps (n, H, W) for the given slices, and the mean loss on them."""
    model.to(device).eval()
    loss_fn = make_loss()
    loader = DataLoader(SliceDataset(data, indices), batch_size=batch_size, shuffle=False)
    preds, total = [], 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total += float(loss_fn(logits, y)) * x.shape[0]
        preds.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    return np.concatenate(preds), total / max(len(indices), 1)


def _onehot_volume(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """(D, H, W) labels -> (1, C, H, W, D) one-hot, as MONAI metrics expect."""
    t = torch.from_numpy(labels.astype(np.int64))
    oh = torch.nn.functional.one_hot(t, n_classes).permute(3, 1, 2, 0)
    return oh[None].float()


def volume_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], n_classes: int
) -> dict[str, float]:
    """Dice, IoU and HD95 of one volume (D, H, W), averaged over foreground classes."""
    p, g = _onehot_volume(pred, n_classes), _onehot_volume(truth, n_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, g)[0]
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)(p, g)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes; handled below
        hd = compute_hausdorff_distance(
            p, g, include_background=False, percentile=95, spacing=spacing
        )[0]
    d, h, w = truth.shape
    diagonal = math.sqrt((h * spacing[0]) ** 2 + (w * spacing[1]) ** 2 + (d * spacing[2]) ** 2)
    hd_vals = []
    for c in range(1, n_classes):
        has_truth, has_pred = bool(g[0, c].any()), bool(p[0, c].any())
        if not has_truth:
            continue
        hd_vals.append(float(hd[c - 1]) if has_pred else diagonal)

    def mean(v: torch.Tensor) -> float:
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else math.nan

    return {
        "dice": mean(dice),
        "iou": mean(iou),
        "hd95": float(np.mean(hd_vals)) if hd_vals else math.nan,
    }


def evaluate(
    model: nn.Module,
    data: SiteData,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    n_classes: int,
) -> dict[str, float]:
    """Per-site validation metrics: series-level Dice/IoU/HD95 means, loss, example count."""
    indices = np.asarray(indices)
    preds, loss = predict(model, data, indices, batch_size=batch_size, device=device)
    per_series: dict[str, list[float]] = {m: [] for m in METRICS}
    series_ids = np.asarray(data.series)[indices]
    for s in np.unique(series_ids):
        sel = series_ids == s
        truth = np.asarray(data.masks)[indices[sel]]
        spacing = tuple(float(v) for v in np.asarray(data.spacing)[indices[sel][0]])
        vm = volume_metrics(preds[sel], truth, spacing, n_classes)  # type: ignore[arg-type]
        for m in METRICS:
            per_series[m].append(vm[m])
    out = {m: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for m, v in per_series.items()}
    out["loss"] = loss
    out["num-examples"] = float(len(indices))
    return out
