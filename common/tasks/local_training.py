"""One site's local work, without Flower: open its data, choose device and precision, seed, train, evaluate.

A site's ClientApp (through ``fedscan.client.site_round``) and the server's baselines
(``fedscan.server.baselines``) both call in here. The run's task (``fedscan.common.tasks.registry``)
owns the loss, loops and metrics.
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
from fedscan.common.data.layout import SiteDir
from fedscan.common.data.site_arrays import SiteData, prepare_site, split_patients
from fedscan.common.tasks.precision import Precision, choose_precision, move_model
from fedscan.common.tasks.registry import get_task

log = logging.getLogger(__name__)


def resolve_device(preference: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def run_precision(cfg: RunConfig) -> Precision:
    """The device and numeric precision this site trains with (AMP only on CUDA)."""
    return choose_precision(resolve_device(cfg.device), amp=cfg.amp, channels_last=cfg.channels_last)


def site_seed(seed: int, site: str, server_round: int) -> int:
    """A per-site, per-round seed derived from the run seed: reproducible, not shared."""
    digest = hashlib.sha256(f"{seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class LocalSite:
    """A site's prepared data and its patient-level split (slice indices)."""

    name: str
    data: SiteData
    train_idx: np.ndarray
    val_idx: np.ndarray

    def snr(self) -> float | None:
        """The site's SNR (its quality profile's median over series), for quality weighting."""
        return self.data.site_snr()

    def describe(self) -> str:
        """One line for the site's own log: sizes only, no identifiers."""
        d = self.data
        text = (
            f"{len(d)} images from {d.n_patients} patients "
            f"({self.train_idx.size} train / {self.val_idx.size} validation images)"
        )
        if d.target is not None:
            counts = np.bincount(np.asarray(d.target))
            kind = "exams" if d.n_samples < len(d) else "labelled images"
            text += f"; {d.n_samples} {kind}, per class {counts.tolist()}"
        return text


def open_site(site: SiteDir, cfg: RunConfig, cache_root: Path | None) -> LocalSite:
    data = prepare_site(site, cfg, cache_root)
    get_task(cfg.task).check_data(data, cfg)
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
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    metrics = get_task(cfg.task).train(
        model,
        site.data,
        site.train_idx,
        cfg,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=site_seed(cfg.seed, site.name, server_round),
        precision=run_precision(cfg),
        proximal_mu=proximal_mu,
    )
    move_model(model, "cpu", torch.contiguous_format)
    return metrics


def evaluate_local(
    model: nn.Module, site: LocalSite, cfg: RunConfig, *, scores: bool = False
) -> dict[str, float]:
    """The site's validation metrics; with ``scores`` also its shareable explanation scores."""
    metrics = get_task(cfg.task).evaluate(
        model, site.data, site.val_idx, cfg, precision=run_precision(cfg), scores=scores
    )
    move_model(model, "cpu", torch.contiguous_format)
    return metrics
