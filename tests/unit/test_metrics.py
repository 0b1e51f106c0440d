"""Classification and lesion-detection metrics against values computed by hand (in the comments)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedscan.common.tasks.metrics import (
    CLASSIFICATION_METRICS,
    classification_metrics,
    confusion_matrix,
    lesion_counts,
    lesion_metrics,
)


def binary_probs(p1: list[float]) -> np.ndarray:
    """(n, 2) probabilities from the class-1 probabilities."""
    p = np.asarray(p1, dtype=float)
    return np.stack([1.0 - p, p], axis=1)


def metrics_no_warning(probs: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, float]:
    """``classification_metrics``, failing on any warning (MONAI warns when fed a single class)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return classification_metrics(probs, targets, num_classes)


# --- binary -----------------------------------------------------------------------------------

# 8 negatives, 2 positives; p(class 1) per case. Predicted class 1 where p > 0.5.
IMBALANCED_TARGETS = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
IMBALANCED_P1 = [0.05, 0.10, 0.20, 0.30, 0.40, 0.45, 0.60, 0.80, 0.40, 0.90]


def test_binary_imbalanced_by_hand() -> None:
    m = metrics_no_warning(binary_probs(IMBALANCED_P1), np.array(IMBALANCED_TARGETS), 2)
    assert list(m) == list(CLASSIFICATION_METRICS)
    # AUROC over the 2 x 8 = 16 (positive, negative) pairs, a tie counting 1/2:
    #   positive 0.90 beats all 8 negatives                              -> 8
    #   positive 0.40 beats 0.05, 0.10, 0.20, 0.30 and ties 0.40         -> 4.5
    #   AUROC = 12.5 / 16 = 0.78125
    assert m["auroc"] == pytest.approx(0.78125)
    # Predictions: negatives 0.60 and 0.80 -> FP = 2, TN = 6; positive 0.90 -> TP = 1, 0.40 -> FN = 1.
    assert m["sensitivity"] == pytest.approx(1 / 2)  # TP / (TP + FN)
    assert m["specificity"] == pytest.approx(6 / 8)  # TN / (TN + FP)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.75) / 2)  # 0.625
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))  # 2TP / (2TP + FP + FN) = 0.4
    assert m["accuracy"] == pytest.approx(7 / 10)  # (TP + TN) / n
    assert m["accuracy"] != pytest.approx(m["balanced_accuracy"])


def test_binary_majority_class_predictor_scores_high_accuracy_but_chance_balanced_accuracy() -> None:
    # Every case gets p(class 1) = 0.2: all predicted negative, and all scores tied.
    m = classification_metrics(binary_probs([0.2] * 10), np.array(IMBALANCED_TARGETS), 2)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["balanced_accuracy"] == pytest.approx((0 / 2 + 8 / 8) / 2)  # 0.5
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == 1.0
    assert m["f1"] == 0.0  # 2TP + FP + FN = 0 + 0 + 2 > 0, so defined: 0 / 2
    assert m["auroc"] == pytest.approx(0.5)  # 16 ties x 1/2 / 16 pairs


def test_binary_exact_half_predicts_class_zero() -> None:
    # argmax of [0.5, 0.5] is class 0: the positive is missed, the negative is a true negative.
    m = classification_metrics(binary_probs([0.5, 0.5]), np.array([0, 1]), 2)
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == 1.0
    assert m["auroc"] == pytest.approx(0.5)  # the single pair is a tie


def test_one_class_validation_set_all_positive() -> None:
    # 3 positives, no negatives. p = 0.9, 0.3, 0.8 -> predicted 1, 0, 1: TP = 2, FN = 1, FP = TN = 0.
    m = metrics_no_warning(binary_probs([0.9, 0.3, 0.8]), np.array([1, 1, 1]), 2)
    assert math.isnan(m["auroc"])  # no negatives to rank against: undefined, not 0 or 0.5
    assert math.isnan(m["specificity"])  # TN + FP = 0
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # only class 1 present: its recall
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))  # 0.8
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_one_class_validation_set_all_negative() -> None:
    # 3 negatives. p = 0.2, 0.7, 0.1 -> predicted 0, 1, 0: TN = 2, FP = 1, TP = FN = 0.
    m = metrics_no_warning(binary_probs([0.2, 0.7, 0.1]), np.array([0, 0, 0]), 2)
    assert math.isnan(m["auroc"])
    assert math.isnan(m["sensitivity"])  # TP + FN = 0
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # recall of class 0
    assert m["f1"] == 0.0  # 2TP + FP + FN = 1: defined, and 0
    # Nothing predicted positive either: 2TP + FP + FN = 0, so F1 is undefined.
    m = classification_metrics(binary_probs([0.2, 0.1]), np.array([0, 0]), 2)
    assert math.isnan(m["f1"])
    assert m["specificity"] == 1.0


def test_empty_input_is_all_nan() -> None:
    m = metrics_no_warning(np.zeros((0, 3)), np.zeros(0, dtype=int), 3)
    assert all(math.isnan(v) for v in m.values())


def test_perfect_and_inverted_binary_predictions() -> None:
    targets = np.array([0, 0, 1, 1])
    perfect = classification_metrics(binary_probs([0.1, 0.2, 0.8, 0.9]), targets, 2)
    assert perfect == {name: 1.0 for name in CLASSIFICATION_METRICS}
    inverted = classification_metrics(binary_probs([0.9, 0.8, 0.2, 0.1]), targets, 2)
    # Every positive scores below every negative; every case is misclassified: TP = TN = 0.
    assert inverted == {name: 0.0 for name in CLASSIFICATION_METRICS}


def test_perfect_three_class_predictions() -> None:
    targets = np.array([0, 1, 2, 2])
    probs = np.eye(3)[targets] * 0.8 + 0.2 / 3
    assert classification_metrics(probs, targets, 3) == pytest.approx(
        {name: 1.0 for name in CLASSIFICATION_METRICS}
    )


def test_auroc_matches_pairwise_count_on_random_tied_scores() -> None:
    # AUROC as the Mann-Whitney statistic, counted pair by pair, on coarse (heavily tied) scores.
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.integers(0, 2, 30)
        targets[:2] = [0, 1]
        p1 = rng.integers(0, 5, 30) / 4
        pos, neg = p1[targets == 1], p1[targets == 0]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        expected = wins / (pos.size * neg.size)
        assert classification_metrics(binary_probs(list(p1)), targets, 2)["auroc"] == pytest.approx(expected)


# --- multi-class ------------------------------------------------------------------------------

THREE_CLASS_TARGETS = np.array([0, 0, 1, 1, 2, 2])
THREE_CLASS_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # r0, true 0, predicted 0
        [0.3, 0.6, 0.1],  # r1, true 0, predicted 1
        [0.2, 0.5, 0.3],  # r2, true 1, predicted 1
        [0.1, 0.3, 0.6],  # r3, true 1, predicted 2
        [0.1, 0.1, 0.8],  # r4, true 2, predicted 2
        [0.1, 0.3, 0.6],  # r5, true 2, predicted 2
    ]
)


def test_confusion_matrix_by_hand() -> None:
    pred = THREE_CLASS_PROBS.argmax(axis=1)  # [0, 1, 1, 2, 2, 2]
    cm = confusion_matrix(pred, THREE_CLASS_TARGETS, 3)
    # rows = truth, columns = predicted
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 1], [0, 0, 2]])
    assert cm.sum() == 6
    # class 2 is never a target and never predicted here: an all-zero row and column
    np.testing.assert_array_equal(
        confusion_matrix(np.array([1, 0]), np.array([0, 0]), 3), [[1, 1, 0], [0] * 3, [0] * 3]
    )


def test_three_class_macro_by_hand() -> None:
    m = metrics_no_warning(THREE_CLASS_PROBS, THREE_CLASS_TARGETS, 3)
    # One-vs-rest counts from the confusion matrix [[1, 1, 0], [0, 1, 1], [0, 0, 2]]:
    #   class 0: TP 1, FN 1, FP 0, TN 4 -> sens 1/2, spec 4/4, f1 2/(2+0+1) = 2/3
    #   class 1: TP 1, FN 1, FP 1, TN 3 -> sens 1/2, spec 3/4, f1 2/(2+1+1) = 1/2
    #   class 2: TP 2, FN 0, FP 1, TN 3 -> sens 1,   spec 3/4, f1 4/(4+1+0) = 4/5
    assert m["sensitivity"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)  # 2/3
    assert m["specificity"] == pytest.approx((1 + 3 / 4 + 3 / 4) / 3)  # 5/6
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)  # 59/90
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # mean recall = macro sensitivity
    assert m["accuracy"] == pytest.approx(4 / 6)  # diagonal 1 + 1 + 2 (classes balanced: = BA)
    # One-vs-rest AUROC, 2 positives x 4 negatives = 8 pairs per class, ties 1/2:
    #   class 0 on p0: positives 0.7, 0.3 beat negatives 0.2, 0.1, 0.1, 0.1 -> 8/8 = 1
    #   class 1 on p1: positives 0.5 (r2), 0.3 (r3); negatives 0.2, 0.6, 0.1, 0.3
    #                  0.5 beats 0.2, 0.1, 0.3 -> 3; 0.3 beats 0.2, 0.1, ties 0.3 -> 2.5; 5.5/8
    #   class 2 on p2: positives 0.8 (r4), 0.6 (r5); negatives 0.1, 0.1, 0.3, 0.6
    #                  0.8 -> 4; 0.6 beats 0.1, 0.1, 0.3, ties 0.6 -> 3.5; 7.5/8
    assert m["auroc"] == pytest.approx((1 + 5.5 / 8 + 7.5 / 8) / 3)  # 0.875


def test_three_class_with_a_class_absent_from_targets() -> None:
    targets = np.array([0, 0, 1, 1])  # class 2 never occurs
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # true 0, predicted 0
            [0.2, 0.2, 0.6],  # true 0, predicted 2
            [0.1, 0.7, 0.2],  # true 1, predicted 1
            [0.3, 0.6, 0.1],  # true 1, predicted 1
        ]
    )
    m = metrics_no_warning(probs, targets, 3)
    #   class 0: TP 1, FN 1, FP 0, TN 2 -> sens 1/2, spec 1,   f1 2/3
    #   class 1: TP 2, FN 0, FP 0, TN 2 -> sens 1,   spec 1,   f1 1
    #   class 2: TP 0, FN 0, FP 1, TN 3 -> sens NaN, spec 3/4, f1 0/(0+1+0) = 0
    assert m["sensitivity"] == pytest.approx((1 / 2 + 1) / 2)  # over classes 0 and 1 only
    assert m["specificity"] == pytest.approx((1 + 1 + 3 / 4) / 3)  # 11/12
    assert m["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # 5/9
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)  # recalls of the present classes 0 and 1
    assert m["accuracy"] == pytest.approx(3 / 4)
    # AUROC, 2 x 2 pairs per class; class 2 has no positives and is left out of the mean:
    #   class 0 on p0: positives 0.8, 0.2; negatives 0.1, 0.3 -> 2 + 1 = 3/4
    #   class 1 on p1: positives 0.7, 0.6; negatives 0.1, 0.2 -> 4/4
    assert m["auroc"] == pytest.approx((3 / 4 + 1) / 2)  # 0.875


def test_three_class_single_class_targets_have_no_auroc() -> None:
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    m = metrics_no_warning(probs, np.array([1, 1]), 3)
    assert math.isnan(m["auroc"])  # no class has both positives and negatives
    assert m["balanced_accuracy"] == pytest.approx(1 / 2)  # recall of class 1
    # specificity: class 0 TN 2 -> 1; class 1 undefined (no negatives); class 2 TN 1, FP 1 -> 1/2
    assert m["specificity"] == pytest.approx((1 + 1 / 2) / 2)


# --- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs,targets,num_classes,message",
    [
        (np.full((3, 2), 0.5), np.array([0, 1]), 2, "3 rows but targets has 2"),
        (np.full((2, 3), 1 / 3), np.array([0, 1]), 2, r"shape \(n, 2\)"),
        (np.array([0.2, 0.8]), np.array([1]), 2, r"shape \(n, 2\)"),
        (np.full((2, 2), 0.5), np.array([0, 2]), 2, r"labels in \[0, 2\); found 2"),
        (np.full((2, 2), 0.5), np.array([-1, 0]), 2, r"labels in \[0, 2\); found -1"),
        (np.full((2, 2), 0.5), np.array([0.0, 0.5]), 2, "integer labels"),
        (np.full((2, 2), 0.5), np.array([[0, 1]]), 2, "1-D"),
        (np.array([[0.5, 0.5], [np.nan, 0.5]]), np.array([0, 1]), 2, "NaN or infinite values .* row 1"),
        (np.array([[0.5, 0.5], [np.inf, 0.5]]), np.array([0, 1]), 2, "NaN or infinite"),
        (np.array([[2.0, -1.0], [0.5, 0.5]]), np.array([0, 1]), 2, "not logits"),
        (np.array([[0.5, 0.5], [0.4, 0.4]]), np.array([0, 1]), 2, "row 1 sums to 0.8"),
        (np.full((2, 1), 1.0), np.array([0, 0]), 1, "num_classes must be an integer >= 2"),
    ],
)
def test_classification_input_errors(
    probs: np.ndarray, targets: np.ndarray, num_classes: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(probs, targets, num_classes)


def test_float32_softmax_and_float_integer_labels_are_accepted() -> None:
    probs = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=np.float32)
    m = classification_metrics(probs, np.array([2.0, 0.0]), 3)
    assert m["accuracy"] == 1.0


def test_confusion_matrix_input_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.array([0, 1, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match=r"pred must hold labels in \[0, 2\); found 3"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 2)


# --- lesion-level detection -------------------------------------------------------------------


def test_lesion_counts_by_hand() -> None:
    truth = np.zeros((2, 6, 6), dtype=np.uint8)
    pred = np.zeros_like(truth)
    # Image 0, true lesion A: classes 1 and 2 side by side, one lesion once classes are merged.
    truth[0, 1, 1] = truth[0, 1, 2] = 1
    truth[0, 2, 2] = 2
    # Predicted in image 0: class 2 at (2,2)-(2,3), overlapping A at (2,2) -> A detected, not a FP.
    pred[0, 2, 2] = pred[0, 2, 3] = 2
    # ... and a blob of two pixels touching only at a corner, away from any lesion -> one FP.
    pred[0, 4, 5] = pred[0, 5, 4] = 1
    # Image 1, true lesion B: two pixels touching only at a corner -> one lesion (8-connectivity).
    # Nothing is predicted in image 1, so B is missed.
    truth[1, 3, 3] = truth[1, 4, 4] = 1
    #
    #   truth[0]      pred[0]       truth[1]      pred[1]
    #   . . . . . .   . . . . . .   . . . . . .   . . . . . .
    #   . 1 1 . . .   . . . . . .   . . . . . .   . . . . . .
    #   . . 2 . . .   . . 2 2 . .   . . . . . .   . . . . . .
    #   . . . . . .   . . . . . .   . . . 1 . .   . . . . . .
    #   . . . . . .   . . . . . 1   . . . . 1 .   . . . . . .
    #   . . . . . .   . . . . 1 .   . . . . . .   . . . . . .
    counts = lesion_counts(pred, truth)
    assert counts == {"true_lesions": 2, "detected_lesions": 1, "false_positive_lesions": 1, "images": 2}
    assert lesion_metrics(counts) == {"lesion_sensitivity": 1 / 2, "lesion_fp_per_image": 1 / 2}


def test_lesions_do_not_connect_across_images() -> None:
    # The same pixel lit in two consecutive images: two lesions, one per image.
    truth = np.zeros((2, 3, 3), dtype=np.int64)
    truth[:, 1, 1] = 1
    pred = np.zeros_like(truth)
    pred[0, 1, 1] = 1  # hits the lesion of image 0 only
    pred[1, 0, 0] = 1  # touches image 1's lesion at a corner but does not overlap it -> FP
    counts = lesion_counts(pred, truth)
    assert counts == {"true_lesions": 2, "detected_lesions": 1, "false_positive_lesions": 1, "images": 2}


def test_one_prediction_over_two_lesions_and_two_predictions_on_one_lesion() -> None:
    truth = np.zeros((1, 5, 7), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0, 0] = truth[0, 0, 2] = 1  # two lesions, a background column apart
    pred[0, 0, 0:3] = 1  # one predicted component covering both: 2 detected, no FP
    truth[0, 3, 2:7] = 1  # one long lesion
    pred[0, 3, 2] = pred[0, 3, 6] = 1  # two separate predicted components on it: neither is a FP
    counts = lesion_counts(pred, truth)
    assert counts == {"true_lesions": 3, "detected_lesions": 3, "false_positive_lesions": 0, "images": 1}


def test_empty_images_and_no_true_lesions() -> None:
    empty = np.zeros((3, 4, 4), dtype=np.uint8)
    counts = lesion_counts(empty, empty)
    assert counts == {"true_lesions": 0, "detected_lesions": 0, "false_positive_lesions": 0, "images": 3}
    metrics = lesion_metrics(counts)
    assert math.isnan(metrics["lesion_sensitivity"])  # nothing to detect: undefined, not 0 or 1
    assert metrics["lesion_fp_per_image"] == 0.0
    # false positives on images without lesions still count
    pred = empty.copy()
    pred[2, 0, 0] = 1
    metrics = lesion_metrics(lesion_counts(pred, empty))
    assert math.isnan(metrics["lesion_sensitivity"])
    assert metrics["lesion_fp_per_image"] == pytest.approx(1 / 3)
    # no images at all
    none = lesion_metrics(lesion_counts(np.zeros((0, 4, 4)), np.zeros((0, 4, 4))))
    assert math.isnan(none["lesion_sensitivity"]) and math.isnan(none["lesion_fp_per_image"])


def test_lesion_counts_pool_across_volumes() -> None:
    # Volume 1: 1 image, one lesion found. Volume 2: 3 images, one lesion missed, 2 FPs.
    v1_truth = np.zeros((1, 4, 4), dtype=np.uint8)
    v1_truth[0, 1, 1] = 1
    v2_truth = np.zeros((3, 4, 4), dtype=np.uint8)
    v2_truth[1, 2, 2] = 1
    v2_pred = np.zeros_like(v2_truth)
    v2_pred[0, 0, 0] = v2_pred[2, 3, 3] = 1
    a, b = lesion_counts(v1_truth, v1_truth), lesion_counts(v2_pred, v2_truth)
    pooled = {key: a[key] + b[key] for key in a}
    # pooled over the whole site: 1 of 2 lesions found, 2 FPs over 4 images
    assert lesion_metrics(pooled) == {"lesion_sensitivity": 1 / 2, "lesion_fp_per_image": 2 / 4}


def test_lesion_input_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        lesion_counts(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"\(n_images, H, W\)"):
        lesion_counts(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="integer labels"):
        lesion_counts(np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="lack images"):
        lesion_metrics({"true_lesions": 1, "detected_lesions": 1, "false_positive_lesions": 0})
