"""Models by name: the run config's ``model`` field picks one of these builders."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedscan.common.config import RunConfig
from fedscan.common.errors import FedscanError
from fedscan.common.models.unet import build_unet

# Segmentation: background plus one lesion class for now.
NUM_CLASSES = 2

_BUILDERS: dict[str, Callable[[RunConfig], nn.Module]] = {
    "unet": lambda cfg: build_unet(1, NUM_CLASSES, cfg.base_channels),
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
