"""Local training at a site, without Flower: device choice, seeding, train and evaluate.

The ClientApp (``fedscan.client.app``) only converts Flower records to and from the
calls here.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedscan.common.config import RunConfig
from fedscan.common.data.dataset import SiteData, prepare_site, split_patients
from fedscan.common.data.layout import SiteDir
from fedscan.common.models.registry import NUM_CLASSES
from fedscan.common.tasks import segmentation

log = logging.getLogger(__name__)


def resolve_device(preference: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def site_seed(seed: int, site: str, server_round: int) -> int:
    """A per-site, per-round seed derived from the run seed: reproducible, not shared."""
    digest = hashlib.sha256(f"{seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class LocalSite:
    """A site's prepared data and its patient-level split."""

    name: str
    data: SiteData
    train_idx: np.ndarray
    val_idx: np.ndarray


def open_site(site: SiteDir, cfg: RunConfig, cache_root: Path | None) -> LocalSite:
    data = prepare_site(site, cfg, cache_root)
    train_idx, val_idx = split_patients(data.patient, cfg.val_fraction, cfg.seed)
    return LocalSite(site.name, data, train_idx, val_idx)


def train_local(
    model: nn.Module,
    site: LocalSite,
    cfg: RunConfig,
    *,
    server_round: int,
    epochs: int,
    lr: float,
    batch_size: int,
) -> dict[str, float]:
    device = resolve_device(cfg.device)
    metrics = segmentation.train(
        model, site.data, site.train_idx, epochs=epochs, lr=lr, batch_size=batch_size,
        device=device, seed=site_seed(cfg.seed, site.name, server_round),
    )
    model.to("cpu")
    metrics["num-examples"] = float(site.train_idx.size)
    return metrics


def evaluate_local(model: nn.Module, site: LocalSite, cfg: RunConfig) -> dict[str, float]:
    device = resolve_device(cfg.device)
    metrics = segmentation.evaluate(
        model, site.data, site.val_idx, batch_size=max(cfg.batch_size, 16), device=device,
        n_classes=NUM_CLASSES,
    )
    model.to("cpu")
    return metrics
