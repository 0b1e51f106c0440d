"""Classification metrics and lesion-level detection metrics, with undefined values as NaN.

Every function here is computed on one site's data; a value with no meaning on that data
(say, AUROC on a validation set that holds a single class) is ``math.nan``, never 0 or 0.5,
so that it cannot be mistaken for a score and is left out by ``nanmean`` across sites.

Classification
--------------
``classification_metrics(probs, targets, num_classes)`` takes ``probs`` of shape (n, C), the
class probabilities of n cases (each row sums to 1), and ``targets`` of shape (n,), the true
labels in ``[0, C)``. The predicted class of a case is the argmax of its row; an exact tie goes
to the lowest class index (so in the binary case a probability of exactly 0.5 predicts class 0).

For a class k, one-vs-rest counts treat k as positive and every other class as negative:
TP = cases of class k predicted k, FN = cases of class k predicted otherwise, FP = cases of
another class predicted k, TN = cases of another class predicted otherwise. From them:

- sensitivity_k (recall_k) = TP / (TP + FN); NaN when class k is absent from ``targets``.
- specificity_k = TN / (TN + FP); NaN when every target is class k.
- f1_k = 2 TP / (2 TP + FP + FN); NaN when 2 TP + FP + FN = 0, i.e. class k is neither in
  ``targets`` nor predicted. It is 0 (not NaN) when class k is present but never hit.
- auroc_k = the probability that a random case of class k gets a higher ``probs[:, k]`` than a
  random case of another class, ties counting 1/2: the Mann-Whitney U statistic divided by
  (positives x negatives), equal to the area under the ROC curve. NaN unless ``targets``
  hold at least one case of class k and at least one of another class.

The returned metrics:

- ``accuracy``: (cases with predicted class = true class) / n.
- ``balanced_accuracy``: the mean of recall_k over the classes k present in ``targets``.
  With both classes of a binary problem present it is (sensitivity + specificity) / 2; with
  one class present it is that class's recall. Unlike accuracy, it does not reward always
  predicting the majority class.
- Binary (C = 2), class 1 is the positive class: ``sensitivity``, ``specificity``, ``f1`` and
  ``auroc`` are the class-1 values above (``auroc`` scores ``probs[:, 1]``).
- Multi-class (C > 2): ``sensitivity``, ``specificity`` and ``f1`` are macro averages: the
  unweighted mean of the per-class values over the classes where each is defined. ``auroc``
  is the unweighted mean of auroc_k over the classes k that have both positives and negatives
  in ``targets``. The macro sensitivity therefore equals the balanced accuracy.

Each metric is NaN when no class gives it a value, and all of them are NaN when n = 0.

Lesion-level detection
----------------------
A lesion is a connected component of the foreground of one 2D label map: every pixel with a
class above 0, all foreground classes merged into one, joined with 8-connectivity (pixels
that touch by an edge or a corner). Components never join across images.

- A ground-truth lesion is *detected* when at least one predicted foreground pixel (of any
  foreground class) lies inside it.
- A predicted component is a *false positive* when none of its pixels lies on ground-truth
  foreground.

``lesion_counts(pred, truth)`` returns, summed over the images of a (n_images, H, W) pair of
label maps: ``true_lesions``, ``detected_lesions``, ``false_positive_lesions`` and ``images``.
Counts add up, so a site pools its volumes by summing each count, then calls
``lesion_metrics(counts)``:

- ``lesion_sensitivity`` = detected_lesions / true_lesions; NaN when there are no true lesions.
- ``lesion_fp_per_image`` = false_positive_lesions / images; NaN when there are no images.
  Pooled over volumes, it is the rate per image, not the mean of the volumes' rates.

Calibration
-----------
``expected_calibration_error(probs, targets, num_classes)``: how far the model's confidence is
from its accuracy (see the function), reported per site as ``ece``.

The confusion-matrix ratios and the ROC AUC come from MONAI (``get_confusion_matrix``,
``compute_confusion_matrix_metric``, ``compute_roc_auc``); the undefined cases are decided
here, before MONAI is called (its ``compute_roc_auc`` warns on a single-class input, and its
macro average turns into NaN as soon as one class has no positives).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix
from monai.networks.utils import one_hot
from scipy import ndimage

CLASSIFICATION_METRICS = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy")
LESION_COUNTS = ("true_lesions", "detected_lesions", "false_positive_lesions", "images")
LESION_METRICS = ("lesion_sensitivity", "lesion_fp_per_image")

# How far a row of ``probs`` may sum from 1 (float32 softmax outputs are accepted; logits are not).
PROB_SUM_TOLERANCE = 1e-3

# 8-connectivity within each (H, W) image of an (n_images, H, W) stack and no connection
# between images: the 3x3 block of ones in the middle plane of a 3x3x3 structure.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


# --- classification -------------------------------------------------------------------------


def confusion_matrix(pred: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: entry [i, j] is the number of cases of true class i predicted as class j."""
    _check_num_classes(num_classes)
    pred = _labels(pred, "pred", num_classes)
    targets = _labels(targets, "targets", num_classes)
    if pred.shape != targets.shape:
        raise ValueError(f"pred has shape {pred.shape} but targets has shape {targets.shape}")
    flat = np.bincount(targets * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_metrics(probs: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, float]:
    """AUROC, balanced accuracy, sensitivity, specificity, F1 and accuracy (see the module docstring)."""
    _check_num_classes(num_classes)
    probs = _probabilities(probs, num_classes)
    targets = _labels(targets, "targets", num_classes)
    if targets.shape[0] != probs.shape[0]:
        raise ValueError(f"probs has {probs.shape[0]} rows but targets has {targets.shape[0]} labels")
    if targets.size == 0:
        return dict.fromkeys(CLASSIFICATION_METRICS, math.nan)

    pred = probs.argmax(axis=1)
    counts = _one_vs_rest_counts(pred, targets, num_classes)
    recall = _ratio("sensitivity", counts)
    specificity = _ratio("specificity", counts)
    f1 = _ratio("f1 score", counts)

    if num_classes == 2:
        positive = 1
        per_class = {
            "auroc": _auroc(probs[:, positive], targets == positive),
            "sensitivity": float(recall[positive]),
            "specificity": float(specificity[positive]),
            "f1": float(f1[positive]),
        }
    else:
        per_class = {
            "auroc": _mean_defined(_auroc(probs[:, k], targets == k) for k in range(num_classes)),
            "sensitivity": _mean_defined(recall),
            "specificity": _mean_defined(specificity),
            "f1": _mean_defined(f1),
        }
    out = {
        **per_class,
        "balanced_accuracy": _mean_defined(recall),
        "accuracy": float(np.mean(pred == targets)),
    }
    return {name: out[name] for name in CLASSIFICATION_METRICS}


def _one_vs_rest_counts(pred: np.ndarray, targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """(C, 4) one-vs-rest counts [TP, FP, TN, FN] per class, from MONAI's ``get_confusion_matrix``."""

    def hot(labels: np.ndarray) -> torch.Tensor:
        # MONAI wants (batch, classes, ...): the whole set is one "sample" whose cases are the
        # spatial positions, so the counts are summed over all cases.
        return one_hot(torch.from_numpy(labels)[None, None], num_classes, dim=1)

    # MONAI returns the counts as float32 whatever the input; they are exact up to 2**24 cases,
    # and float64 keeps the ratios computed from them at full precision.
    return get_confusion_matrix(hot(pred), hot(targets))[0].to(torch.float64)


def _ratio(name: str, counts: torch.Tensor) -> np.ndarray:
    """Per-class ``name`` from MONAI: NaN where its denominator is 0."""
    return compute_confusion_matrix_metric(name, counts).numpy()


def expected_calibration_error(
    probs: np.ndarray, targets: np.ndarray, num_classes: int, bins: int = 10
) -> float:
    """Expected calibration error (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017): cases are binned by their confidence (the top class probability) into
    ``bins`` equal-width bins of [0, 1]; ECE = sum over bins of (cases in bin / n) x |accuracy of
    the bin - mean confidence of the bin|. 0 is perfectly calibrated; NaN when n = 0."""
    probs = _probabilities(probs, num_classes)
    targets = _labels(targets, "targets", num_classes)
    if targets.size == 0:
        return math.nan
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)  # a confidence of 1 is in the last bin
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.sum() / targets.size * abs(float(correct[sel].mean()) - float(confidence[sel].mean()))
    return float(total)


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties 1/2) of ``scores`` for the ``positive`` cases; NaN without both kinds."""
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return math.nan  # undefined; MONAI would return NaN too, but with a warning
    auc = compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(positive.astype(np.int64)))
    return float(np.asarray(auc))  # typed as array-like; a float here


def _mean_defined(values: Iterable[float]) -> float:
    """Unweighted mean of the non-NaN values; NaN (without a warning) when there are none."""
    defined = [float(v) for v in values if not math.isnan(v)]
    return math.fsum(defined) / len(defined) if defined else math.nan


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _probabilities(probs: np.ndarray, num_classes: int) -> np.ndarray:
    """``probs`` as float64 (n, C), checked: finite, in [0, 1], rows summing to 1."""
    arr = np.asarray(probs)
    if arr.ndim != 2 or arr.shape[1] != num_classes:
        raise ValueError(f"probs must have shape (n, {num_classes}), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"probs must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"probs has NaN or infinite values (first in row {bad_rows[0]})")
    tol = PROB_SUM_TOLERANCE
    if arr.size and (arr.min() < -tol or arr.max() > 1 + tol):
        raise ValueError("probs must be probabilities in [0, 1] (pass softmax outputs, not logits)")
    off = np.flatnonzero(np.abs(arr.sum(axis=1) - 1.0) > tol)
    if off.size:
        raise ValueError(
            f"each row of probs must sum to 1; row {off[0]} sums to {arr[off[0]].sum():.6g} "
            "(pass softmax outputs, not logits)"
        )
    return arr


def _labels(labels: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    """``labels`` as a 1-D int64 array, checked to hold whole numbers in [0, num_classes)."""
    arr = _whole_numbers(labels, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per case), got shape {arr.shape}")
    outside = (arr < 0) | (arr >= num_classes)
    if outside.any():
        raise ValueError(
            f"{name} must hold labels in [0, {num_classes}); found {arr[outside][0]} "
            f"at position {np.flatnonzero(outside)[0]}"
        )
    return arr


def _whole_numbers(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as int64; booleans and integer-valued floats are accepted, anything else is not."""
    arr = np.asarray(values)
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has NaN or infinite values")
        if (arr != np.round(arr)).any():
            raise ValueError(f"{name} must hold integer labels, got non-integer values")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")


# --- lesion-level detection -----------------------------------------------------------------


def lesion_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Lesion counts of (n_images, H, W) predicted and true label maps (0 = background)."""
    pred_fg = _whole_numbers(pred, "pred") > 0
    truth_fg = _whole_numbers(truth, "truth") > 0
    if pred_fg.ndim != 3:
        raise ValueError(f"pred must be a stack of label maps (n_images, H, W), got shape {pred_fg.shape}")
    if pred_fg.shape != truth_fg.shape:
        raise ValueError(f"pred has shape {pred_fg.shape} but truth has shape {truth_fg.shape}")

    truth_lesions, n_true = ndimage.label(truth_fg, structure=_EIGHT_CONNECTED_PER_IMAGE)
    pred_lesions, n_pred = ndimage.label(pred_fg, structure=_EIGHT_CONNECTED_PER_IMAGE)
    overlap = pred_fg & truth_fg  # both labels are > 0 here
    detected = np.unique(truth_lesions[overlap]).size
    pred_touching_truth = np.unique(pred_lesions[overlap]).size
    return {
        "true_lesions": int(n_true),
        "detected_lesions": int(detected),
        "false_positive_lesions": int(n_pred - pred_touching_truth),
        "images": int(pred_fg.shape[0]),
    }


def lesion_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Lesion sensitivity and false-positive lesions per image from (pooled) ``lesion_counts``."""
    missing = [key for key in LESION_COUNTS if key not in counts]
    if missing:
        raise ValueError(f"lesion counts lack {', '.join(missing)}")
    negative = [key for key in LESION_COUNTS if counts[key] < 0]
    if negative:
        raise ValueError(f"lesion counts must not be negative: {', '.join(negative)}")
    true, images = counts["true_lesions"], counts["images"]
    return {
        "lesion_sensitivity": counts["detected_lesions"] / true if true else math.nan,
        "lesion_fp_per_image": counts["false_positive_lesions"] / images if images else math.nan,
    }
