"""`fedscan site explain`: why the model predicts what it does, on the site's own validation data.

Everything is computed at the site and written to a local folder; nothing is sent anywhere:

- segmentation, per validation series: the predicted mask, the voxel-wise uncertainty (entropy
  of test-time augmentation, ``fedscan.common.tasks.uncertainty``) and a confidence per lesion;
- image classifiers, per validation image: Grad-CAM and integrated gradients
  (``fedscan.common.tasks.attribution``);
- the exam model ``mil``, per validation exam: the attention weight of every image, and Grad-CAM
  and integrated gradients on the image with the most attention.

OUT gets ``index.html`` (self-contained, ``fedscan.client.explain_page``), ``explain.json`` (every
case's numbers) and ``cases/<case>.png``. The most wrong or uncertain cases come first. These
files hold SeriesInstanceUIDs so the site can find a case in its PACS: they are for the site's
eyes only. The site-level scores in them are the ones a site may share, and shares, in the
federated evaluation's final round (``explain_scores``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.visualize import blend_images
from pydantic import BaseModel
from torch import nn

from fedscan.client.model_file import load_model_file, personalize, site_precision
from fedscan.client.site_output import check_out
from fedscan.common import __version__
from fedscan.common.config import EXAM_MODELS, RunConfig
from fedscan.common.data.layout import SiteDir
from fedscan.common.data.site_arrays import SiteData
from fedscan.common.data.site_reader import SiteReader
from fedscan.common.errors import FedscanError
from fedscan.common.html_page import png_bytes
from fedscan.common.tasks import classification, segmentation
from fedscan.common.tasks import local_training as training
from fedscan.common.tasks.attribution import exam_attention, gradcam, integrated_gradients
from fedscan.common.tasks.precision import Precision
from fedscan.common.tasks.uncertainty import lesion_confidences, tta_predict, uncertainty_auroc

log = logging.getLogger(__name__)

EXPLAIN_JSON = "explain.json"
INDEX_HTML = "index.html"
CASES_DIR = "cases"
DPI = 110


class Lesion(BaseModel):
    slice: int  # 0-based, in the series' geometric order
    label: int  # the class
    pixels: int
    confidence: float  # mean TTA probability of the class over the lesion


class Case(BaseModel):
    """One explained case: a series (segmentation), an image, or an exam."""

    id: str
    kind: Literal["series", "image", "exam"]
    series_uid: str
    slice: int | None = (
        None  # image classifiers: the image's place among its series' labelled images (0-based)
    )
    slices: int
    figure: str | None  # cases/<id>.png, for the cases shown
    # classification
    true_class: int | None = None
    predicted_class: int | None = None
    probabilities: list[float] | None = None
    correct: bool | None = None
    attention: list[float] | None = None  # mil: per image, in geometric order
    lesion_slices: list[int] | None = None  # mil: images that show a lesion, where masks exist
    # segmentation
    dice: float | None = None
    wrong_voxels: float | None = None  # fraction of the series' voxels predicted wrong
    mean_uncertainty: float | None = None
    uncertainty_auroc: float | None = None
    lesions: list[Lesion] | None = None
    # both: larger is more uncertain (normalized entropy of the probabilities)
    uncertainty: float


class Explanation(BaseModel):
    """What `fedscan site explain` wrote: explain.json."""

    fedscan_version: str
    site: str
    task: str
    model: str
    strategy: str
    round: int
    weights: Literal["global", "personalized"]
    validation_cases: int
    shown: int
    scores: dict[str, float | None]  # the site's shareable explanation scores on all its validation cases
    metrics: dict[str, float | None]  # the usual validation metrics, for context
    cases: list[
        Case
    ]  # every validation case, the most wrong or uncertain first; the first `shown` have figures


# cases, the site's shareable scores, its validation metrics, and each shown case's figure
_Results = tuple[list["Case"], dict[str, float], dict[str, float], dict[str, bytes]]


def _clean(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _entropy(p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum() / math.log(len(p)))


def _series_uids(site: SiteDir) -> list[str]:
    """The SeriesInstanceUID of each series index that SiteData.series refers to."""
    return [hdr.series_uid for hdr in SiteReader(site).series]


def explain_site(
    data: Path,
    model_file: Path,
    out: Path,
    *,
    n: int = 20,
    cache_root: Path,
    use_global: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    on_case: Callable[[int, int], None] | None = None,
    site_name: str | None = None,
) -> Explanation:
    """Explain the model on the site's validation data and write OUT; see the module docstring."""
    data, out = Path(data), Path(out)
    if n < 1:
        raise FedscanError(f"--n must be at least 1, got {n}")
    if not data.is_dir():
        raise FedscanError(
            f"site data folder not found: {data}", hint="give the folder holding images/ and labels/"
        )
    if out.exists() and not out.is_dir():
        raise FedscanError(f"{out} exists and is not a folder", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FedscanError(
            f"{out} already exists and is not empty",
            hint="choose another --out, or pass --overwrite to replace the explanations in it",
        )
    site = SiteDir(site_name or data.resolve().name, data)
    check_out(out, site)
    site_model = personalize(
        load_model_file(model_file, device=device), site.name, cache_root, use_global=use_global
    )
    cfg = site_model.cfg
    precision = site_precision(site_model)
    local = training.open_site(site, cfg, cache_root)
    model = precision.place_model(site_model.model).eval()
    uids = _series_uids(site)
    if cfg.task == "segmentation":
        cases, scores, metrics, figures = _segmentation(model, local, cfg, precision, uids, n, on_case)
    else:
        cases, scores, metrics, figures = _classification(model, local, cfg, precision, uids, n, on_case)
    result = Explanation(
        fedscan_version=__version__,
        site=site.name,
        task=cfg.task,
        model=cfg.model,
        strategy=cfg.strategy,
        round=site_model.server_round,
        weights="personalized" if site_model.kind == "personalized" else "global",
        validation_cases=len(cases),
        shown=min(n, len(cases)),
        scores={k: _clean(v) for k, v in scores.items()},
        metrics={k: _clean(v) for k, v in metrics.items()},
        cases=cases,
    )
    _write(out, result, figures)
    return result


def _write(out: Path, result: Explanation, figures: dict[str, bytes]) -> None:
    """Write OUT whole or not at all: into a temporary folder beside it, then moved into place. An
    existing OUT (``--overwrite``) loses only an earlier explanation's files; others stay."""
    from fedscan.client.explain_page import explain_html

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CASES_DIR).mkdir()
        for case in result.cases:
            if case.figure is not None:
                (tmp / case.figure).write_bytes(figures[case.id])
        (tmp / EXPLAIN_JSON).write_text(result.model_dump_json(indent=2) + "\n")
        (tmp / INDEX_HTML).write_text(explain_html(result, figures))
        if not out.is_dir():
            tmp.rename(out)
            return
        for name in (EXPLAIN_JSON, INDEX_HTML, CASES_DIR):  # the explanation file last in, first out
            old = out / name
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        for name in (CASES_DIR, INDEX_HTML, EXPLAIN_JSON):
            (tmp / name).rename(out / name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- segmentation -----------------------------------------------------------------------------


def _segmentation(
    model: nn.Module,
    local: training.LocalSite,
    cfg: RunConfig,
    precision: Precision,
    uids: list[str],
    n: int,
    on_case: Callable[[int, int], None] | None,
) -> _Results:
    data: SiteData = local.data
    idx = np.asarray(local.val_idx)
    preds, loss, entropy = segmentation.predict(
        model, data, idx, batch_size=max(cfg.batch_size, 16), precision=precision, uncertainty=True
    )
    assert entropy is not None
    masks = np.asarray(data.masks)[idx]
    metrics = segmentation.prediction_metrics(preds, loss, entropy, data, idx, cfg)
    metrics.pop("num-examples", None)
    scores = {k: metrics.pop(k) for k in segmentation.SCORES}
    series = np.asarray(data.series)[idx]
    ranked = []
    for s in np.unique(series):
        sel = np.flatnonzero(series == s)
        pred, truth, unc = preds[sel], masks[sel], entropy[sel]
        spacing = tuple(float(v) for v in np.asarray(data.spacing)[idx[sel][0]])
        dice = segmentation.volume_metrics(pred, truth, spacing, cfg.num_classes)["dice"]  # type: ignore[arg-type]  # spacing: numpy row
        # a series without lesion has no Dice: it is right when nothing is predicted either
        error = (1.0 - dice) if math.isfinite(dice) else float((pred > 0).any())
        ranked.append((error, float(unc.mean()), int(s), sel, dice))
    ranked.sort(key=lambda r: (-r[0], -r[1]))
    cases, figures = [], {}
    for k, (_error, mean_unc, s, sel, dice) in enumerate(ranked):
        case_id = f"c{k + 1:03d}"
        pred, truth, unc = preds[sel], masks[sel], entropy[sel]
        case = Case(
            id=case_id,
            kind="series",
            series_uid=uids[s],
            slices=len(sel),
            figure=f"{CASES_DIR}/{case_id}.png" if k < n else None,
            dice=_clean(dice),
            wrong_voxels=float((pred != truth).mean()),
            mean_uncertainty=mean_unc,
            uncertainty_auroc=_clean(uncertainty_auroc(unc, pred, truth)),
            uncertainty=mean_unc,
        )
        if k < n:  # the lesions' confidences and the figure only for the cases shown
            probs = _tta_probabilities(
                model, np.asarray(data.images[idx[sel]]), precision, max(cfg.batch_size, 16)
            )
            case.lesions = [
                Lesion(slice=j, label=c, pixels=px, confidence=conf)
                for j in range(len(sel))
                for c, px, conf in lesion_confidences(pred[j], probs[j].numpy())
            ]
            figures[case_id] = _segmentation_figure(np.asarray(data.images[idx[sel]]), truth, pred, unc, case)
            if on_case:
                on_case(min(k + 1, n), min(len(ranked), n))
        cases.append(case)
    return cases, scores, metrics, figures


def _tta_probabilities(
    model: nn.Module, images: np.ndarray, precision: Precision, batch_size: int
) -> torch.Tensor:
    """TTA mean probabilities (n, C, H, W) of a series' slices, in batches."""
    parts = []
    for lo in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[lo : lo + batch_size], dtype=np.float32))[:, None]
        parts.append(tta_predict(model, x, precision)[1])
    return torch.cat(parts)


def _blend(image: np.ndarray, label: np.ndarray, alpha: float | np.ndarray, cmap: str) -> np.ndarray:
    """``label`` (H, W, in [0, 1]) over the grey image with MONAI's ``blend_images``: (H, W, 3)."""
    rgb = blend_images(
        np.asarray(image, np.float32)[None],
        np.asarray(label, np.float32)[None],
        alpha=alpha,
        cmap=cmap,
        rescale_arrays=True,
        transparent_background=True,
    )
    return np.clip(np.moveaxis(np.asarray(rgb), 0, -1), 0, 1)


def _overlay(image: np.ndarray, heat: np.ndarray, cmap: str) -> np.ndarray:
    """A heat map (>= 0), scaled to its peak, over the image; the hotter, the more opaque."""
    heat = np.asarray(heat, np.float32)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    return _blend(image, heat, 0.6 * heat[None], cmap)


def _mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return _blend(image, np.asarray(mask) > 0, 0.45, "autumn")


def _axes_off(fig: Figure, n: int) -> list[Any]:
    axes = fig.subplots(1, n)
    for ax in np.atleast_1d(axes):
        ax.set_axis_off()
    return list(np.atleast_1d(axes))


def _segmentation_figure(
    images: np.ndarray, truth: np.ndarray, pred: np.ndarray, unc: np.ndarray, case: Case
) -> bytes:
    """The slice with the most lesion and error: image, truth, prediction with lesion confidences,
    uncertainty."""
    weight = (truth > 0).sum((1, 2)) + (pred > 0).sum((1, 2)) + (pred != truth).sum((1, 2))
    j = int(np.argmax(weight))
    fig = Figure(figsize=(11, 3.2))
    a0, a1, a2, a3 = _axes_off(fig, 4)
    a0.imshow(images[j], cmap="gray")
    a0.set_title(f"slice {j + 1} of {len(images)}", fontsize=9)
    a1.imshow(_mask_overlay(images[j], truth[j]))
    a1.set_title("ground truth", fontsize=9)
    a2.imshow(_mask_overlay(images[j], pred[j]))
    a2.set_title("prediction", fontsize=9)
    for lesion in case.lesions or []:
        if lesion.slice == j:
            ys, xs = np.nonzero(pred[j] == lesion.label)
            if len(xs):
                a2.text(
                    float(xs.mean()),
                    float(ys.min()) - 1,
                    f"{lesion.confidence:.2f}",
                    color="yellow",
                    fontsize=7,
                    ha="center",
                    va="bottom",
                )
    shown = a3.imshow(unc[j], cmap="magma", vmin=0, vmax=1)
    a3.set_title("uncertainty (TTA entropy)", fontsize=9)
    fig.colorbar(shown, ax=a3, fraction=0.046, pad=0.04)
    return png_bytes(fig, DPI)


# --- classification ---------------------------------------------------------------------------


def _classification(
    model: nn.Module,
    local: training.LocalSite,
    cfg: RunConfig,
    precision: Precision,
    uids: list[str],
    n: int,
    on_case: Callable[[int, int], None] | None,
) -> _Results:
    data: SiteData = local.data
    samples = data.samples_of(local.val_idx)
    targets = np.asarray(data.target)[samples].astype(np.int64)
    probs = classification.predict(model, data, samples, cfg, precision=precision)
    metrics = classification.probability_metrics(probs, targets, cfg)
    energy = classification.gradcam_lesion_energy(model, data, samples, cfg, precision=precision)
    scores = {"ece": metrics.pop("ece")}
    scores["gradcam_lesion_energy"], scores["lesion_area_share"] = energy or (math.nan, math.nan)
    # the most wrong or uncertain first: the lowest probability of the true class
    order = np.argsort(probs[np.arange(len(samples)), targets], kind="stable")
    slices_of = data.slices_of()
    exam = cfg.model in EXAM_MODELS
    cases, figures = [], {}
    for k, i in enumerate(order):
        sample = int(samples[i])
        idx = slices_of[sample]
        series = int(np.asarray(data.series)[idx[0]])
        in_series = np.flatnonzero(np.asarray(data.series) == series)
        case_id = f"c{k + 1:03d}"
        p = probs[i]
        case = Case(
            id=case_id,
            kind="exam" if exam else "image",
            series_uid=uids[series],
            slice=None if exam else int(np.searchsorted(in_series, idx[0])),
            slices=len(idx),
            figure=f"{CASES_DIR}/{case_id}.png" if k < n else None,
            true_class=int(targets[i]),
            predicted_class=int(p.argmax()),
            probabilities=[float(v) for v in p],
            correct=bool(p.argmax() == targets[i]),
            uncertainty=_entropy(p),
        )
        if k < n:
            figures[case_id] = _classification_case(model, data, cfg, precision, sample, case)
            if on_case:
                on_case(min(k + 1, n), min(len(order), n))
        cases.append(case)
    return cases, scores, metrics, figures


def _classification_case(
    model: nn.Module, data: SiteData, cfg: RunConfig, precision: Precision, sample: int, case: Case
) -> bytes:
    """Grad-CAM and integrated gradients for the predicted class; for ``mil`` also the attention."""
    idx = data.slices_of()[sample]
    images = torch.from_numpy(np.array(data.images[idx], dtype=np.float32))[:, None]
    target = int(case.predicted_class or 0)
    lesion_idx, lesion_masks = classification.lesion_images(data, sample)
    lesion_of = {int(j): m for j, m in zip(lesion_idx, lesion_masks, strict=False)}
    if cfg.model in EXAM_MODELS:
        _, attention = exam_attention(model, precision.place(images))
        case.attention = [float(a) for a in attention]
        if lesion_of:
            case.lesion_slices = [
                j for j, s in enumerate(idx) if int(s) in lesion_of and (lesion_of[int(s)] == 1).any()
            ]
        j = int(np.argmax(attention))
        cam = gradcam(model, cfg.model, precision.place(images), target)[j]
        ig = np.abs(integrated_gradients(model, cfg.model, precision.place(images), target))[j]
    else:
        j = 0
        cam = gradcam(model, cfg.model, precision.place(images), target)[0]
        ig = np.abs(integrated_gradients(model, cfg.model, precision.place(images), target))[0]
    image = images[j, 0].numpy()
    truth = lesion_of.get(int(idx[j]))
    panels = 4 if case.attention is not None else 3
    fig = Figure(figsize=(3.0 * panels, 3.2))
    axes = _axes_off(fig, panels)
    axes[0].imshow(image if truth is None else _mask_overlay(image, truth), cmap="gray")
    axes[0].set_title(
        "image" + (" (lesion outlined)" if truth is not None and truth.any() else ""), fontsize=9
    )
    axes[1].imshow(_overlay(image, cam, "jet"))
    axes[1].set_title(f"Grad-CAM, class {target}", fontsize=9)
    axes[2].imshow(_overlay(image, ig, "hot"))
    axes[2].set_title("integrated gradients", fontsize=9)
    if case.attention is not None:
        ax = axes[3]
        ax.set_axis_on()
        colors = ["#c0392b" if s in (case.lesion_slices or []) else "#4a6fa5" for s in range(len(idx))]
        ax.bar(np.arange(1, len(idx) + 1), case.attention, color=colors)
        ax.set_xlabel("image of the exam" + (" (red: lesion)" if case.lesion_slices else ""), fontsize=8)
        ax.set_title("attention", fontsize=9)
        ax.tick_params(labelsize=7)
        axes[0].set_title(f"image {j + 1} of {len(idx)} (most attention)", fontsize=9)
    return png_bytes(fig, DPI)


def load_explanation(out: Path) -> Explanation:
    """Read OUT/explain.json back."""
    return Explanation.model_validate(json.loads((Path(out) / EXPLAIN_JSON).read_text()))
