"""A run's model file at a site: the weights of ``global_model.pt`` (or of a round checkpoint) and
the run settings they were trained with, for ``fedscan site explain`` and ``fedscan site predict``.

The file is read with ``torch.load(weights_only=True)``: it can hold tensors and plain values only,
never code. Under FedBN the site's personalized model is the global model with the normalization
layers the site kept in its cache (``fedscan.common.tasks.fedbn_layers``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from fedscan.common.config import RunConfig
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.common.tasks.local_training import run_precision
from fedscan.common.tasks.precision import Precision
from fedscan.common.weights import load_state

log = logging.getLogger(__name__)


@dataclass
class SiteModel:
    """A model ready to run at a site, and what it is."""

    model: nn.Module
    cfg: RunConfig
    server_round: int
    kind: str  # "global", or "personalized" (FedBN: the site's own normalization layers)


DEVICES = ("auto", "cpu", "cuda")


def load_model_file(path: Path, *, device: str = "auto") -> SiteModel:
    """The model and run settings of ``path``, to run on ``device``; a FedscanError names what is wrong."""
    if device not in DEVICES:
        raise FedscanError(f"unknown device '{device}'; allowed: {', '.join(DEVICES)}")
    path = Path(path)
    if not path.is_file():
        raise FedscanError(
            f"model file not found: {path}",
            hint="give the global_model.pt of a run (in the run's output folder)",
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, damaged, or holding more than tensors and plain values
        raise FedscanError(
            f"cannot read the model file {path}: it is truncated, damaged or not a fedscan "
            f"model ({type(exc).__name__})"
        ) from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise FedscanError(
            f"{path} is not a fedscan model file (it holds no weights and run settings)",
            hint="give the global_model.pt or a checkpoints/round-NNN.pt of a fedscan run",
        )
    settings = {k: v for k, v in dict(payload["config"]).items() if k not in ("data_root", "cache_dir")}
    settings["device"] = device
    try:
        cfg = RunConfig.model_validate(settings)
    except ValidationError as exc:
        raise FedscanError(
            f"{path}: its run settings are not valid for this fedscan version "
            f"({exc.error_count()} problem(s))"
        ) from None
    model = build_model(cfg)
    try:
        load_state(model, dict(payload["state_dict"]))
    except ValueError as exc:
        raise FedscanError(
            f"{path}: the weights do not fit the '{cfg.model}' model of its settings: {exc}"
        ) from None
    model.eval()
    return SiteModel(model, cfg, int(payload.get("round", 0)), "global")


def site_precision(site_model: SiteModel) -> Precision:
    """The device and precision to run the model with; asking for CUDA without a GPU is a FedscanError."""
    try:
        return run_precision(site_model.cfg)
    except RuntimeError as exc:
        raise FedscanError(
            str(exc), hint="pass --device cpu, or auto to use a GPU only when there is one"
        ) from None


def personalize(site_model: SiteModel, site: str, cache_root: Path, *, use_global: bool = False) -> SiteModel:
    """Under FedBN, put this site's own normalization layers (from its cache) into the model.

    Other strategies have no personalized model: the global one is returned unchanged. A FedBN
    run whose layers this site does not hold is an error: the global normalization layers were
    never trained (FedBN keeps them at the sites). ``use_global`` keeps them anyway, with a warning.
    """
    if site_model.cfg.strategy != "fedbn":
        return site_model
    if use_global:
        log.warning(
            "the model is from a FedBN run: its global normalization layers were never trained (each "
            "site kept its own), so its predictions and scores are not those of the federation's models"
        )
        return site_model
    from fedscan.common.tasks.fedbn_layers import LocalLayers

    layers = LocalLayers(cache_root, site_model.cfg, site)
    used = layers.apply(site_model.model, site_model.server_round)
    if used is None:
        raise FedscanError(
            f"the model is from a FedBN run, but site '{site}' holds no normalization layers of it under "
            f"{layers.folder}",
            hint="give --cache the cache folder the site trained with and --site the name it trained under "
            "(a deployed site's name is in its site.toml)",
        )
    log.info("site %s: using its own normalization layers of round %d (FedBN)", site, used)
    return SiteModel(site_model.model, site_model.cfg, site_model.server_round, "personalized")
