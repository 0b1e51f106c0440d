"""Why a classifier decided: Grad-CAM, integrated gradients, and the MIL model's attention.

- **Grad-CAM**, in its element-wise form, HiResCAM (Draelos and Carin, "Use HiResCAM instead of
  Grad-CAM for faithful explanations of convolutional neural networks", 2020; Grad-CAM: Selvaraju
  et al., ICCV 2017): the feature maps of a layer at 1/8 of the image size (``CAM_LAYERS``) times
  the gradient of the class score at each position, summed over channels, kept where positive and
  upsampled to the image. Classic Grad-CAM first averages each channel's gradient over the image;
  on our synthetic CT its maps lit up bowel gas, dark like the lesions but unrelated to the label
  (2 of 3 trained ResNet-18s put less than 3 times the lesion's share of the image area inside the
  lesion), where the element-wise form put 8 to 12 times. For the exam model ``mil`` the class
  score is the exam's, so each image of the exam gets the map of its share in the exam's decision.
- **Integrated gradients** (Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep
  Networks", ICML 2017): the gradient of the class score averaged along the straight path from a
  black image to the input, times the input. Model-agnostic; MONAI has none, so it is written here.
- **Attention** of ``mil`` (Ilse et al. 2018): the weight of each image in the exam's decision.
- ``lesion_energy``: the share of a map's energy inside the lesion mask, the score a site may share.

Maps are returned per image as float32 arrays (H, W), not normalized: a caller that shows them
normalizes each, and energy shares do not depend on the scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# the layer whose feature maps Grad-CAM weighs, per model: each at 1/8 of the input size
CAM_LAYERS = {
    "resnet18": "layer2",
    "densenet121": "features.denseblock2",
    "mil": "encoder.features.5",
}
IG_STEPS = 16


def gradcam(model: nn.Module, model_name: str, images: torch.Tensor, class_idx: int) -> np.ndarray:
    """Grad-CAM (element-wise, see the module docstring) of ``class_idx`` for ``images`` (n, 1, H, W):
    (n, H, W), >= 0. Image models explain each image on its own; ``mil`` takes ``images`` as one exam."""
    if model_name not in CAM_LAYERS:
        raise ValueError(f"no Grad-CAM layer is defined for model '{model_name}'")
    layer = dict(model.named_modules())[CAM_LAYERS[model_name].removeprefix("mil.")]
    # one entry per forward call of the layer
    activations: list[torch.Tensor] = []
    gradients: dict[int, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        k = len(activations)
        activations.append(output)
        output.register_hook(lambda grad: gradients.__setitem__(k, grad))

    model.eval()
    chunk_size = getattr(model, "chunk_size", None)
    if (
        chunk_size is not None
    ):  # mil: one pass over the exam, not checkpointed chunks that recompute the layer
        model.chunk_size = max(
            chunk_size, images.shape[0]
        )  # the same output: evaluation uses running statistics
    handle = layer.register_forward_hook(keep)  # removed below: the model is left as it was
    try:
        with torch.enable_grad():
            score = _class_score(model, model_name, images.detach(), class_idx)
            model.zero_grad(set_to_none=True)
            score.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        if chunk_size is not None:
            model.chunk_size = chunk_size
    acts = torch.cat(activations)
    grads = torch.cat([gradients.get(k, torch.zeros_like(a)) for k, a in enumerate(activations)])
    cam = torch.relu((acts * grads).sum(1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0].clamp_min(0).cpu().numpy()


def _class_score(model: nn.Module, model_name: str, images: torch.Tensor, class_idx: int) -> torch.Tensor:
    if model_name == "mil":
        return model(images)[0][class_idx]
    return model(images)[:, class_idx].sum()


def integrated_gradients(
    model: nn.Module, model_name: str, images: torch.Tensor, class_idx: int, steps: int = IG_STEPS
) -> np.ndarray:
    """Integrated gradients of ``class_idx`` from a zero baseline: (n, H, W), the attribution summed
    over channels (signed). ``mil`` takes ``images`` as one exam, as in :func:`gradcam`."""
    model.eval()
    images = images.detach()
    total = torch.zeros_like(images)
    with torch.enable_grad():
        for k in range(1, steps + 1):  # right Riemann sum along the path baseline -> input
            point = (images * (k / steps)).requires_grad_(True)
            score = _class_score(model, model_name, point, class_idx)
            (grad,) = torch.autograd.grad(score, point)
            total += grad
    return (images * total / steps).sum(1).detach().float().cpu().numpy()


@torch.no_grad()
def exam_attention(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The exam model's class probabilities (C,) and each image's attention weight (n,), summing to 1."""
    model.eval()
    logits, attention = model(images)
    return torch.softmax(logits.float(), -1).cpu().numpy(), attention.float().cpu().numpy()


def lesion_energy(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float] | None:
    """The share of the maps' energy inside the lesion masks, and the lesion's share of the image
    area, each averaged over the images that show a lesion (maps and masks (n, H, W); maps >= 0). An
    image whose map is empty counts 0 inside. None when no image shows a lesion."""
    lesion = np.asarray(masks) > 0
    keep = lesion.reshape(len(lesion), -1).any(1)
    if not keep.any():
        return None
    maps = np.clip(np.asarray(maps, np.float64)[keep], 0, None)
    lesion = lesion[keep]
    totals = maps.reshape(len(maps), -1).sum(1)
    inside = (maps * lesion).reshape(len(maps), -1).sum(1)
    share = np.divide(inside, totals, out=np.zeros_like(inside), where=totals > 0)
    return float(share.mean()), float(lesion.reshape(len(lesion), -1).mean(1).mean())
