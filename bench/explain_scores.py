"""The explanation scores of the models that tests/unit/test_explain.py trains, printed.

The tests assert bounds (Grad-CAM energy in the lesion above 4 times the lesion's area share, MIL
attention on lesion images above 2 times the others', uncertainty AUROC above 0.7); this prints
the values, with the same data, settings and training code (CPU, about 1.5 minutes on 2 cores).

    python bench/explain_scores.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from conftest import write_small_exam_sites  # noqa: E402
from test_explain import _train  # noqa: E402

from fedscan.common.config import RunConfig  # noqa: E402
from fedscan.common.data.layout import SiteDir  # noqa: E402
from fedscan.common.data.synthetic import synthesize  # noqa: E402
from fedscan.common.tasks import classification, segmentation  # noqa: E402
from fedscan.common.tasks.attribution import exam_attention, integrated_gradients, lesion_energy  # noqa: E402
from fedscan.common.tasks.local_training import open_site, run_precision  # noqa: E402


def _site(root: Path, cfg: RunConfig, cache: Path, name: str | None = None):  # noqa: ANN202
    name = name or next(p.name for p in root.iterdir() if p.is_dir())
    return open_site(SiteDir(name, root / name), cfg, cache)


def gradcam_scores(tmp: Path) -> None:
    root = write_small_exam_sites(tmp / "images", exams=(48,), label_level="image")
    cfg = RunConfig(
        task="classification",
        model="resnet18",
        image_size=96,
        batch_size=16,
        device="cpu",
        class_weights="balanced",
    )
    site = _site(root, cfg, tmp / "cache-images")
    model = _train(cfg, site, epochs=4, lr=1e-3, batch_size=16)
    ev = classification.evaluate(
        model, site.data, site.val_idx, cfg, precision=run_precision(cfg), scores=True
    )
    energy, area = ev["gradcam_lesion_energy"], ev["lesion_area_share"]
    print(f"resnet18 on 48 exams' images: validation AUROC {ev['auroc']:.3f}, ECE {ev['ece']:.3f}")
    print(f"  Grad-CAM energy in the lesion {energy:.4f}, lesion area share {area:.4f}: {energy / area:.1f}x")
    picked = [classification.lesion_images(site.data, int(k)) for k in site.data.samples_of(site.val_idx)]
    picked = [(i, m) for i, m in picked if len(i) and (m == 1).any()]
    x = torch.from_numpy(np.array(site.data.images[np.concatenate([i for i, _ in picked])]))[:, None]
    ig = np.abs(integrated_gradients(model, "resnet18", x, 1))
    inside, share = lesion_energy(ig, np.concatenate([m for _, m in picked]))
    print(f"  integrated gradients in the lesion {inside:.4f}: {inside / share:.1f}x")


def attention_scores(tmp: Path) -> None:
    root = write_small_exam_sites(tmp / "exams", exams=(100,), label_level="exam")
    cfg = RunConfig(task="classification", model="mil", image_size=64, base_channels=8, device="cpu")
    site = _site(root, cfg, tmp / "cache-exams")
    model = _train(cfg, site, epochs=1, lr=1e-3, batch_size=4, rounds=10)
    lesion, other, top = [], [], []
    for k in site.data.samples_of(site.val_idx):
        idx, masks = classification.lesion_images(site.data, int(k))
        shows = masks.reshape(len(idx), -1).max(1) == 1
        if not shows.any():
            continue
        _, attention = exam_attention(model, torch.from_numpy(np.array(site.data.images[idx]))[:, None])
        lesion.append(attention[shows].mean())
        other.append(attention[~shows].mean())
        top.append(bool(shows[attention.argmax()]))
    ev = classification.evaluate(model, site.data, site.val_idx, cfg, precision=run_precision(cfg))
    print(
        f"mil on 100 exams: {len(lesion)} validation exams with a lesion; mean attention per lesion image "
        f"{np.mean(lesion):.3f}, per other image {np.mean(other):.3f} "
        f"({np.mean(lesion) / np.mean(other):.1f}x); "
        f"most-attended image shows the lesion in {sum(top)} of {len(top)}; exam AUROC {ev['auroc']:.3f}"
    )


def uncertainty_scores(tmp: Path) -> None:
    synthesize(tmp / "segmentation", n_sites=2, seed=0)
    cfg = RunConfig(
        task="segmentation",
        model="unet",
        image_size=64,
        base_channels=8,
        unet_depth=3,
        batch_size=8,
        device="cpu",
    )
    site = _site(tmp / "segmentation", cfg, tmp / "cache-seg", "hospital-b")
    model = _train(cfg, site, epochs=30, lr=3e-3, batch_size=8)
    ev = segmentation.evaluate(model, site.data, site.val_idx, cfg, precision=run_precision(cfg), scores=True)
    print(f"unet on 15 patients: Dice {ev['dice']:.3f}, uncertainty AUROC {ev['uncertainty_auroc']:.3f}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gradcam_scores(Path(tmp))
        attention_scores(Path(tmp))
        uncertainty_scores(Path(tmp))


if __name__ == "__main__":
    main()
