"""Baselines and cross-site evaluation for a simulated federation, without Flower.

What joining a federation does for a hospital shows only beside what it would get alone. For
the same sites, split and seed, ``fedscan simulate --baselines`` also trains:

- **local-only**: each site alone, for as many rounds and local epochs as the federation ran,
  i.e. the same local optimizer steps per site as it took in the federation (its own optimizer
  state restarting each round, as in the federation; no averaging);
- **pooled**: all sites' training data in one place, for the same rounds and epochs, so its
  steps are at least the sum of the sites' steps (a batch per site and epoch more at most,
  since each epoch drops one incomplete batch instead of one per site).

Every model starts from the federation's initial weights (the run seed). Then every model is
evaluated on every site's validation split: the cross-site matrix (as NVIDIA FLARE's
cross-site evaluation does), keys ``global``, ``local:<site>``, ``pooled`` and, for FedBN,
``personalized:<site>`` (the global model with that site's own normalization layers).
``federated_gain`` per site is the federated model's main metric minus the local-only model's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedscan.common.config import RunConfig
from fedscan.common.data.quality import quality_factor
from fedscan.common.data.site_arrays import SiteData
from fedscan.common.models.registry import build_model
from fedscan.common.tasks.fedbn_layers import LocalLayers
from fedscan.common.tasks.local_training import LocalSite, evaluate_local, run_precision, site_seed
from fedscan.common.tasks.precision import move_model
from fedscan.common.tasks.registry import get_task, task_metrics
from fedscan.common.tasks.schedule import round_lr
from fedscan.server.checkpoint import load_checkpoint

log = logging.getLogger("fedscan.simulate")

POOLED = "pooled"


def initial_model(run: RunConfig) -> nn.Module:
    """The federation's initial model: the ServerApp seeds torch with the run seed, then builds it."""
    torch.manual_seed(run.seed)
    return build_model(run)


def pool_sites(sites: list[LocalSite]) -> LocalSite:
    """All sites' data as one site: arrays concatenated, patient, series and sample indices
    offset so that they stay distinct, and the train and validation splits kept as they were."""
    datas = [s.data for s in sites]
    fields: dict[str, Any] = {}
    for name in ("images", "spacing", "masks", "target", "snr"):
        parts = [getattr(d, name) for d in datas]
        if all(p is not None for p in parts):
            fields[name] = np.concatenate([np.asarray(p) for p in parts])
    for name in ("patient", "series"):  # indices that must stay distinct across sites
        out, offset = [], 0
        for d in datas:
            values = np.asarray(getattr(d, name))
            out.append(values + offset)
            offset += int(values.max(initial=-1)) + 1
        fields[name] = np.concatenate(out).astype(np.int32)
    if all(d.sample is not None for d in datas):  # classification: sample k of site i follows site i-1's
        sample_starts = np.cumsum([0] + [d.n_samples for d in datas[:-1]])
        fields["sample"] = np.concatenate(
            [np.asarray(d.sample) + o for d, o in zip(datas, sample_starts, strict=True)]
        ).astype(np.int32)
    starts = np.cumsum([0] + [len(d) for d in datas[:-1]])
    train = np.concatenate([s.train_idx + o for s, o in zip(sites, starts, strict=True)])
    val = np.concatenate([s.val_idx + o for s, o in zip(sites, starts, strict=True)])
    return LocalSite(POOLED, SiteData(**fields), train, val)


def train_like_federation(model: nn.Module, site: LocalSite, run: RunConfig) -> int:
    """Train ``model`` on ``site`` as the federation's rounds would, without averaging: ``rounds``
    times ``local_epochs`` epochs, with the per-round seeds and learning rates the site used.
    Returns the optimizer steps."""
    task = get_task(run.task)
    steps = 0
    for r in range(1, run.rounds + 1):
        metrics = task.train(
            model,
            site.data,
            site.train_idx,
            run,
            epochs=run.local_epochs,
            lr=round_lr(run, r),
            batch_size=run.batch_size,
            seed=site_seed(run.seed, site.name, r),
            precision=run_precision(run),
        )
        steps += int(metrics.get("steps", 0))
        move_model(model, "cpu", torch.contiguous_format)
    return steps


def _row(metrics: dict[str, float], task: str) -> dict[str, float | None]:
    names = (*task_metrics(task)[0], "loss")
    return {k: (None if not np.isfinite(metrics[k]) else float(metrics[k])) for k in names if k in metrics}


def federated_models(run: RunConfig, out: Path, site_names: list[str]) -> dict[str, nn.Module]:
    """The federation's final model(s): ``global``, and under FedBN each site's personalized model."""
    state = load_checkpoint(Path(out) / "global_model.pt")["state_dict"]
    models: dict[str, nn.Module] = {}
    glob = build_model(run)
    glob.load_state_dict(state)
    models["global"] = glob
    if run.strategy == "fedbn" and run.cache_dir is not None:
        for name in site_names:
            model = build_model(run)
            model.load_state_dict(state)
            if LocalLayers(run.cache_dir, run, name).apply(model, run.rounds) is None:
                log.warning(
                    "FedBN: no local layers of site %s were found; its personalized model is left out", name
                )
                continue
            models[f"personalized:{name}"] = model
    return models


def run_baselines(
    run: RunConfig, sites: list[LocalSite], say: Callable[[str], None]
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Train the local-only and pooled baselines; the models and a summary of their budget."""
    models: dict[str, nn.Module] = {}
    steps: dict[str, int] = {}
    for site in sites:
        say(f"baseline: training {site.name} alone ({run.rounds} x {run.local_epochs} epochs)")
        model = initial_model(run)
        steps[site.name] = train_like_federation(model, site, run)
        models[f"local:{site.name}"] = model
    say(f"baseline: training on all {len(sites)} sites' data pooled")
    model = initial_model(run)
    pooled_steps = train_like_federation(model, pool_sites(sites), run)
    models[POOLED] = model
    summary = {
        "steps_per_site": steps,
        "pooled_steps": pooled_steps,
        "note": (
            f"same split, seed and initial weights as the federation; each model trained {run.rounds} "
            f"rounds x {run.local_epochs} local epochs at the federation's learning rate of each round: "
            "local-only models take the optimizer steps each site took in the federation, "
            "the pooled model about their sum"
        ),
    }
    return models, summary


def cross_site_matrix(
    models: dict[str, nn.Module], sites: list[LocalSite], run: RunConfig, say: Callable[[str], None]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Every model evaluated on every site's validation split: {model: {site: {metric: value}}}."""
    say(f"cross-site evaluation: {len(models)} models on {len(sites)} sites")
    matrix: dict[str, dict[str, dict[str, float | None]]] = {}
    for key, model in models.items():
        matrix[key] = {site.name: _row(evaluate_local(model, site, run), run.task) for site in sites}
    return matrix


def federated_gain(
    matrix: dict[str, dict[str, dict[str, float | None]]], site_names: list[str], main: str, fedbn: bool
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Per site: the federated model's main metric there minus its local-only model's. Under FedBN
    the federated model of a site is its personalized model."""
    gain: dict[str, float | None] = {}
    used: dict[str, str] = {}
    for name in site_names:
        key = f"personalized:{name}" if fedbn and f"personalized:{name}" in matrix else "global"
        fed = matrix.get(key, {}).get(name, {}).get(main)
        local = matrix.get(f"local:{name}", {}).get(name, {}).get(main)
        gain[name] = None if fed is None or local is None else round(fed - local, 6)
        used[name] = key
    return gain, used


def quality_summary(
    run: RunConfig, sites: list[LocalSite], report: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each site's quality profile summary: SNR, quality factor, its share of the last round's
    aggregate (under quality weighting) and its training images."""
    shares = {}
    if report.get("history"):
        shares = report["history"][-1].get("aggregation", {}).get("weight_share", {})
    out = {}
    for site in sites:
        snr = site.snr()
        out[site.name] = {
            "snr": None if snr is None else round(snr, 2),
            "quality_factor": round(quality_factor(snr, run.quality_snr_reference, run.quality_floor), 4),
            "weight_share": shares.get(site.name),
            "train_images": int(site.train_idx.size),
        }
    return out
