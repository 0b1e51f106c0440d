"""Models by name: the run config's ``model`` field picks one of these builders.

Every model takes 1-channel images. Segmentation models return per-pixel logits
(N, num_classes, H, W); image classifiers return (N, num_classes); the exam classifier
``mil`` takes one exam (a bag of images) and returns (num_classes,) logits and attention.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedscan.common.config import RunConfig
from fedscan.common.errors import FedscanError

IN_CHANNELS = 1


def _unet(cfg: RunConfig) -> nn.Module:
    from fedscan.common.models.unet import build_unet

    return build_unet(IN_CHANNELS, cfg.num_classes, cfg.base_channels, depth=cfg.unet_depth)


def _segnet(cfg: RunConfig) -> nn.Module:
    from fedscan.common.models.segnet import build_segnet

    return build_segnet(IN_CHANNELS, cfg.num_classes, width=cfg.segnet_width)


def _densenet121(cfg: RunConfig) -> nn.Module:
    from fedscan.common.models.classifiers import build_densenet121

    return build_densenet121(IN_CHANNELS, cfg.num_classes)


def _resnet18(cfg: RunConfig) -> nn.Module:
    from fedscan.common.models.classifiers import build_resnet18

    return build_resnet18(IN_CHANNELS, cfg.num_classes)


def _mil(cfg: RunConfig) -> nn.Module:
    from fedscan.common.models.mil import AttentionMIL

    return AttentionMIL(
        IN_CHANNELS, cfg.num_classes, base_channels=cfg.base_channels, chunk_size=cfg.mil_chunk_size
    )


_BUILDERS: dict[str, Callable[[RunConfig], nn.Module]] = {
    "unet": _unet,
    "segnet": _segnet,
    "densenet121": _densenet121,
    "resnet18": _resnet18,
    "mil": _mil,
}


def available() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def build_model(cfg: RunConfig) -> nn.Module:
    """A freshly initialised model for the run; the same seed gives the same weights."""
    try:
        builder = _BUILDERS[cfg.model]
    except KeyError:
        raise FedscanError(f"unknown model '{cfg.model}'; available: {', '.join(_BUILDERS)}") from None
    return builder(cfg)
