"""Classification: of single images, or of whole exams with the attention-MIL model.

Labels come from ``labels/labels.csv`` (see ``fedscan.common.data.labels``): per image
(SOPInstanceUID) for the image classifiers ``densenet121`` and ``resnet18``, per exam
(SeriesInstanceUID or StudyInstanceUID) for ``mil``, which reads every image of the exam.

- Loss: cross-entropy, optionally weighted per class (``class_weights``: a list, or
  ``"balanced"``: each site weights class c by n / (C * n_c) over its own training samples,
  so a rare class counts as much as a common one).
- Metrics (``fedscan.common.tasks.metrics``): ``auroc``, ``balanced_accuracy``,
  ``sensitivity``, ``specificity``, ``f1`` and ``accuracy`` over the site's validation
  samples, plus the unweighted cross-entropy ``loss``. An AUROC on a validation set with a
  single class is undefined and stays NaN (null in reports), never 0 or 0.5.
- ``ece``: expected calibration error of the validation predictions.
- Explanation scores (when asked for, in the final round), where the site has lesion masks:
  ``gradcam_lesion_energy``, the share of Grad-CAM energy inside the lesion on the validation
  images that show one, and ``lesion_area_share``, the lesion's share of those images' area (the
  energy share a map blind to the lesion would have).
- ``num-examples`` counts samples (images or exams), not slices.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedscan.common.config import EXAM_MODELS, RunConfig
from fedscan.common.data.site_arrays import NO_MASK, SiteData
from fedscan.common.data.torch_datasets import ExamDataset, ImageDataset
from fedscan.common.errors import FedscanError
from fedscan.common.models.mil import AttentionMIL
from fedscan.common.tasks.attribution import gradcam, lesion_energy
from fedscan.common.tasks.loops import fit, seeded_loader
from fedscan.common.tasks.metrics import (
    CLASSIFICATION_METRICS,
    classification_metrics,
    expected_calibration_error,
)
from fedscan.common.tasks.precision import Precision

log = logging.getLogger(__name__)

METRICS = (*CLASSIFICATION_METRICS, "ece")
MAIN_METRIC = "balanced_accuracy"
# explanation scores a site may share; the Grad-CAM ones are computed when evaluation is asked for
# them (the final round), and only where the site has lesion masks (NaN elsewhere)
SCORES = ("ece", "gradcam_lesion_energy", "lesion_area_share")


def _collate_exams(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [x for x, _ in items], torch.tensor([y for _, y in items], dtype=torch.long)


def forward_exams(model: nn.Module, bags: list[torch.Tensor]) -> torch.Tensor:
    """Logits (B, C) of a batch of exams of any lengths, for the exam model."""
    if not isinstance(model, AttentionMIL):
        raise TypeError(f"a batch of exams needs the exam model, not {type(model).__name__}")
    return model.forward_bags(bags)[0]


def check_data(data: SiteData, cfg: RunConfig) -> None:
    """Fail early, naming the problem, when the site's labels do not suit the model."""
    if cfg.model in EXAM_MODELS:
        return
    longest = max((len(ix) for ix in data.slices_of()), default=0)
    if longest > 1:
        raise FedscanError(
            f"model '{cfg.model}' classifies single images, but this site's labels.csv labels "
            f"whole exams (up to {longest} images each)",
            hint="use --model mil for exam labels, or label images by SOPInstanceUID",
        )


def loss_weights(cfg: RunConfig, targets: np.ndarray) -> torch.Tensor | None:
    """Per-class loss weights from the config; ``balanced`` uses this site's class counts."""
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "balanced":
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=cfg.num_classes)
        present = counts > 0
        w = np.ones(cfg.num_classes)
        w[present] = counts.sum() / (present.sum() * counts[present])
        return torch.tensor(w, dtype=torch.float32)
    return torch.tensor(cfg.class_weights, dtype=torch.float32)


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
    """Train on the samples of the given slices; ``batch_size`` counts images or exams."""
    samples = data.samples_of(indices)
    targets = np.asarray(data.target)[samples]
    weights = loss_weights(cfg, targets)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(precision.device))
    torch.manual_seed(seed)
    if cfg.model in EXAM_MODELS:
        loader = seeded_loader(
            ExamDataset(data, samples),
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            collate_fn=_collate_exams,
        )
        metrics = fit(
            model,
            lambda: loader,
            loss_fn,
            epochs=epochs,
            lr=lr,
            precision=precision,
            forward=forward_exams,
            proximal_mu=proximal_mu,
        )
    else:
        loader = seeded_loader(
            ImageDataset(data, samples), batch_size=batch_size, seed=seed, precision=precision
        )
        metrics = fit(
            model, lambda: loader, loss_fn, epochs=epochs, lr=lr, precision=precision, proximal_mu=proximal_mu
        )
    metrics["num-examples"] = float(samples.size)
    return metrics


@torch.no_grad()
def predict(
    model: nn.Module, data: SiteData, samples: np.ndarray, cfg: RunConfig, *, precision: Precision
) -> np.ndarray:
    """Class probabilities (n_samples, C) for the given samples, in their order."""
    model = precision.place_model(model).eval()
    probs = []
    if cfg.model in EXAM_MODELS:
        exams = ExamDataset(data, samples)
        for i in range(len(exams)):
            bag, _ = exams[i]
            with precision.autocast():
                logits, _ = model(precision.place(bag))
            probs.append(torch.softmax(logits.float(), dim=-1)[None].cpu())
    else:
        loader = DataLoader(
            ImageDataset(data, samples),
            batch_size=max(cfg.batch_size, 32),
            shuffle=False,
            pin_memory=precision.pin_memory,
        )
        for x, _ in loader:
            with precision.autocast():
                logits = model(precision.place(x))
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    if not probs:
        return np.zeros((0, cfg.num_classes), dtype=np.float64)
    return torch.cat(probs).double().numpy()


def evaluate(
    model: nn.Module,
    data: SiteData,
    indices: np.ndarray,
    cfg: RunConfig,
    *,
    precision: Precision,
    scores: bool = False,
) -> dict[str, float]:
    """Per-site validation metrics over the samples of the given slices, with the calibration error
    ``ece``; with ``scores`` also the Grad-CAM lesion-energy scores (see ``SCORES``)."""
    samples = data.samples_of(indices)
    targets = np.asarray(data.target)[samples].astype(np.int64)
    out = probability_metrics(predict(model, data, samples, cfg, precision=precision), targets, cfg)
    if scores:
        try:
            energy = gradcam_lesion_energy(model, data, samples, cfg, precision=precision)
        except Exception:  # the optional score must not cost the site its evaluation
            log.warning("the Grad-CAM score could not be computed; evaluating without it", exc_info=True)
            energy = None
        out["gradcam_lesion_energy"], out["lesion_area_share"] = energy or (math.nan, math.nan)
    out["num-examples"] = float(samples.size)
    return out


def probability_metrics(probs: np.ndarray, targets: np.ndarray, cfg: RunConfig) -> dict[str, float]:
    """The metrics, ``ece`` and cross-entropy ``loss`` of class probabilities (n, C) for ``targets``."""
    out = classification_metrics(probs, targets, cfg.num_classes)
    out["ece"] = expected_calibration_error(probs, targets, cfg.num_classes)
    picked = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    out["loss"] = float(-np.log(picked).mean()) if len(targets) else float("nan")
    return out


def lesion_images(
    data: SiteData, sample: int, slices_of: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The slices of ``sample`` (geometric order) and their lesion masks, where the site has masks
    (an empty selection otherwise). ``slices_of``: ``data.slices_of()``, when the caller has it."""
    idx = (slices_of if slices_of is not None else data.slices_of())[sample]
    if data.lesion is None:
        return idx[:0], np.zeros((0, *data.images.shape[1:]), np.uint8)
    masks = np.asarray(data.lesion[idx])
    known = masks.reshape(len(idx), -1).max(1) != NO_MASK
    return idx[known], masks[known]


def gradcam_lesion_energy(
    model: nn.Module, data: SiteData, samples: np.ndarray, cfg: RunConfig, *, precision: Precision
) -> tuple[float, float] | None:
    """Over the images of positive ``samples`` (class > 0) that show a lesion: the share of Grad-CAM
    energy (for the sample's class) inside the lesion, and the lesion's share of the image area. None
    when the site has no lesion masks or no such image. A lesion image labelled negative (a missed
    lesion) is left out: its class has no evidence to show."""
    if data.lesion is None:
        return None
    model = precision.place_model(model).eval()
    maps, masks = [], []
    targets = np.asarray(data.target)
    slices_of = data.slices_of()
    for k in np.asarray(samples):
        if targets[k] == 0:
            continue
        idx, les = lesion_images(data, int(k), slices_of)
        if not (les == 1).any():
            continue
        if cfg.model in EXAM_MODELS:  # the exam's images together; the score is the exam's
            full = slices_of[int(k)]
            cam = gradcam(model, cfg.model, precision.place(_images(data, full)), int(targets[k]))
            cam = cam[np.isin(full, idx)]
        else:
            cam = gradcam(model, cfg.model, precision.place(_images(data, idx)), int(targets[k]))
        maps.append(cam)
        masks.append(les)
    if not maps:
        return None
    return lesion_energy(np.concatenate(maps), np.concatenate(masks))


def _images(data: SiteData, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(data.images[idx], dtype=np.float32))[:, None]
