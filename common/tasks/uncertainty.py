"""How sure a segmentation model is: test-time augmentation, predictive entropy, and scores of it.

fedscan's segmentation models have no dropout layers, so Monte Carlo dropout does not apply; the
uncertainty comes from test-time augmentation (TTA) instead (Wang et al., "Aleatoric uncertainty
estimation with test-time augmentation for medical image segmentation with convolutional neural
networks", Neurocomputing 2019): the model sees each slice as is and mirrored (left-right,
up-down, both), the four softmax outputs are mapped back and averaged, and the voxel-wise
uncertainty is the entropy of that mean, divided by log(num_classes) so that it lies in [0, 1].

The prediction itself stays the model's plain one (the first, unmirrored pass): it is what
``fedscan site predict`` writes, and the uncertainty map says where to double-check it.

- ``uncertainty_auroc``: how well the uncertainty ranks the wrong voxels of the prediction above
  the right ones (ROC AUC; 0.5 is chance). A site may share it: one number, no image content.
- ``lesion_confidences``: per predicted lesion (a connected component of one slice's foreground,
  8-connected, as the lesion metrics count them), the mean TTA probability of its class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from fedscan.common.tasks.precision import Precision

# (dims flipped) for each TTA pass; () is the plain prediction
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@torch.no_grad()
def tta_predict(model: nn.Module, x: torch.Tensor, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch (N, 1, H, W): the plain logits (N, C, H, W) and the TTA mean probabilities."""
    model.eval()
    x = precision.place(x)
    plain = None
    total = None
    for dims in FLIPS:
        with precision.autocast():
            logits = model(x.flip(dims) if dims else x)
        logits = logits.float()
        if dims:
            logits = logits.flip(dims)
        else:
            plain = logits
        probs = torch.softmax(logits, dim=1)
        total = probs if total is None else total + probs
    assert plain is not None and total is not None
    return plain.cpu(), (total / len(FLIPS)).cpu()


def predictive_entropy(probs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Entropy of per-voxel class probabilities (N, C, H, W), normalized to [0, 1]: (N, H, W)."""
    p = torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12)
    n_classes = p.shape[1]
    return (-(p * p.log()).sum(1) / math.log(n_classes)).clamp(0, 1).float().numpy()


AUROC_BINS = 4096


def uncertainty_auroc(uncertainty: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> float:
    """How well the voxel-wise uncertainty (in [0, 1]) separates wrong voxels (pred != truth) from
    right ones: the ROC AUC, NaN unless there are both.

    A site has millions of voxels, so the uncertainties are counted in ``AUROC_BINS`` equal bins per
    kind of voxel and the AUC is taken from the counts (two voxels in one bin count as a tie, 1/2):
    linear time and memory, within 1/AUROC_BINS of the exact value.
    """
    wrong = (np.asarray(pred) != np.asarray(truth)).ravel()
    which = np.minimum(
        (np.asarray(uncertainty, dtype=np.float32).ravel() * AUROC_BINS).astype(np.int64), AUROC_BINS - 1
    ).clip(0)
    pos = np.bincount(which[wrong], minlength=AUROC_BINS).astype(np.float64)
    neg = np.bincount(which[~wrong], minlength=AUROC_BINS).astype(np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.cumsum(neg) - neg  # right voxels in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


_EIGHT = np.ones((3, 3), dtype=bool)


def lesion_confidences(pred: np.ndarray, probs: np.ndarray) -> list[tuple[int, int, float]]:
    """For one slice's label map (H, W) and its probabilities (C, H, W): (class, pixels, confidence)
    of each predicted lesion, the confidence being the mean probability of its class over it."""
    out = []
    for c in range(1, probs.shape[0]):
        labels, n = ndimage.label(np.asarray(pred) == c, structure=_EIGHT)
        for k in range(1, n + 1):
            region = labels == k
            out.append((c, int(region.sum()), float(np.asarray(probs[c])[region].mean())))
    return out
