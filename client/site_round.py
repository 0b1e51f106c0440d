"""What a site does with one message: train from the global weights, or evaluate them.

The Flower glue (``fedscan.client.app``) calls in here, and only for the messages that need it:
a deployed SuperNode starts one ClientApp process per message, and the SecAgg+ stages that
only exchange keys and shares should not pay for importing torch, MONAI and the data code.
The weights arrive and leave as Flower ArrayRecords, converted by ``fedscan.common.array_records``;
the work itself is ``fedscan.common.tasks.local_training``'s, on torch models and state dicts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedscan.client.secagg import round_count
from fedscan.common.array_records import from_state, load_record, to_record, to_state
from fedscan.common.config import AppConfig
from fedscan.common.data.layout import SiteDir
from fedscan.common.data.quality import quality_factor
from fedscan.common.errors import FedscanError
from fedscan.common.message_keys import COMPUTE_SECONDS, QUALITY_FACTOR
from fedscan.common.models.registry import build_model
from fedscan.common.tasks import local_training
from fedscan.common.tasks.fedbn_layers import LocalLayers
from fedscan.common.weights import copy_into, norm_keys

log = logging.getLogger("fedscan.client")

# Preprocessed arrays stay on the site's machine, outside the hospital's data folder.
DEFAULT_CACHE = Path.home() / ".cache" / "fedscan"


def site_dir(context: Context, cfg: AppConfig) -> SiteDir:
    """The site's data folder: named by a deployed SuperNode, or by the simulation's partition."""
    nc = context.node_config
    if "data-dir" in nc:  # a deployed SuperNode names its own data folder
        path = Path(str(nc["data-dir"]))
        return SiteDir(str(nc.get("site-name", path.name)), path)
    pid = int(nc["partition-id"])  # simulation: one partition per site folder
    name = cfg.site_names[pid]
    if cfg.run.data_root is None:
        raise FedscanError("the run has no data_root for simulated sites")
    return SiteDir(name, cfg.run.data_root / name)


def cache_root(context: Context, cfg: AppConfig) -> Path:
    """Where this site caches preprocessed arrays and keeps FedBN's layers."""
    node_cache = str(context.node_config.get("cache-dir", ""))
    return Path(cfg.run.cache_dir or (Path(node_cache) if node_cache else DEFAULT_CACHE))


def open_site(context: Context, cfg: AppConfig) -> local_training.LocalSite:
    """The site's data, preprocessed (from the cache when it is there), split by patient."""
    return local_training.open_site(site_dir(context, cfg), cfg.run, cache_root(context, cfg))


def local_layers_of(context: Context, cfg: AppConfig, site: str) -> LocalLayers | None:
    """FedBN's store of this site's normalization layers, or None under other strategies."""
    return LocalLayers(cache_root(context, cfg), cfg.run, site) if cfg.run.strategy == "fedbn" else None


def injected_fault(
    record: ArrayRecord, global_arrays: ArrayRecord, context: Context, cfg: AppConfig, site: str
) -> ArrayRecord:
    """Simulation only (``fault_site``, ``fault_kind``): make this site's update faulty, to test
    how a strategy copes. ``scale``: the update (local minus global) times ``fault_scale``;
    ``nan``: every floating-point value NaN. A deployed site never does this."""
    run = cfg.run
    simulated = "partition-id" in context.node_config and "data-dir" not in context.node_config
    if run.fault_site != site or not simulated:
        return record
    log.warning(
        "site %s: sending a faulty update on purpose (%s), as the simulation asks", site, run.fault_kind
    )
    out = to_state(record)
    glob = to_state(global_arrays, set(out))
    for key, local in out.items():
        if local.is_floating_point():
            if run.fault_kind == "nan":
                out[key] = torch.full_like(local, float("nan"))
            else:
                start = glob[key].to(local.dtype)
                out[key] = start + run.fault_scale * (local - start)
    return from_state(out)


def train(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig, secure: bool = False
) -> tuple[Any, dict[str, float], str]:
    """Local training from the global ``arrays``: the model, its metrics and the site's name.
    Under SecAgg+ (``secure``) with FedBN, the model's normalization layers go back to the global
    ones after they are stored here, so that their masked update is zero: they are never sent."""
    t0 = time.perf_counter()
    site = open_site(context, cfg)
    model = build_model(cfg.run)
    load_record(model, arrays)
    server_round = int(conf["server-round"])
    local_layers = local_layers_of(context, cfg, site.name)
    if local_layers is not None:  # FedBN: this site's own normalization layers, from its last round
        local_layers.forget_from(server_round)  # left by an earlier run, or by this round interrupted
        local_layers.apply(model, server_round - 1)
    metrics = local_training.train_local(
        model,
        site,
        cfg.run,
        server_round=server_round,
        epochs=int(conf.get("local-epochs", cfg.run.local_epochs)),
        lr=float(conf.get("lr", cfg.run.learning_rate)),
        batch_size=int(conf.get("batch-size", cfg.run.batch_size)),
        proximal_mu=float(conf.get("proximal-mu", 0.0)),  # FedProx's µ, sent by its strategy
    )
    keep_global_counters(model, arrays)
    if local_layers is not None:
        local_layers.save(server_round, model)
        if secure:
            restore_global(model, arrays, norm_keys(model))
    steps = metrics.pop("steps", 0.0)  # kept here: it would tell the exact count despite count_rounding
    log.info(
        "site %s round %s: trained on %d examples (%d steps), loss %.4f",
        site.name,
        conf["server-round"],
        int(metrics["num-examples"]),
        int(steps),
        metrics["train_loss"],
    )
    # the example count the site discloses (for the weighting), rounded as the run asks
    metrics["num-examples"] = round_count(int(metrics["num-examples"]), cfg.run.count_rounding)
    if cfg.run.quality_weighting:  # the server weights this site by count x this factor
        metrics[QUALITY_FACTOR] = quality_factor(
            site.snr(), cfg.run.quality_snr_reference, cfg.run.quality_floor
        )
    metrics[COMPUTE_SECONDS] = time.perf_counter() - t0
    return model, metrics, site.name


def keep_global_counters(model: Any, arrays: ArrayRecord) -> None:
    """Integer buffers (BatchNorm's ``num_batches_tracked``) go back to their global values before
    the update leaves: they count local steps, which would tell the site's exact example count
    despite count_rounding, and BatchNorm with momentum does not read them."""
    restore_global(model, arrays, {k for k, v in model.state_dict().items() if not v.is_floating_point()})


def restore_global(model: Any, arrays: ArrayRecord, keys: set[str] | frozenset[str]) -> None:
    """Put the global values of ``keys`` back into ``model`` (only those are read from the record)."""
    copy_into(model, to_state(arrays, keys), keys)


def evaluate(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig
) -> tuple[dict[str, float], str]:
    """The global ``arrays`` on this site's validation split: its metrics and the site's name.
    Under FedBN the site evaluates its personalized model (its own normalization layers)."""
    t0 = time.perf_counter()
    site = open_site(context, cfg)
    model = build_model(cfg.run)
    load_record(model, arrays)
    server_round = int(conf.get("server-round", 10**9))
    local_layers = local_layers_of(context, cfg, site.name)
    if local_layers is not None:  # FedBN: the site's personalized model is what it evaluates
        local_layers.apply(model, server_round)
    # the final round also scores the explanations: single numbers, no image content
    metrics = local_training.evaluate_local(
        model, site, cfg.run, scores=cfg.run.explain_scores and server_round >= cfg.run.rounds
    )
    metrics["num-examples"] = round_count(int(metrics["num-examples"]), cfg.run.count_rounding)
    metrics[COMPUTE_SECONDS] = time.perf_counter() - t0
    return metrics, site.name


def plain_train(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig
) -> tuple[ArrayRecord, dict[str, float], str]:
    """Train without secure aggregation: the update as it is sent, its metrics and the site's name."""
    model, metrics, name = train(arrays, conf, context, cfg)
    # FedBN: the normalization layers stay here
    record = to_record(model, exclude=norm_keys(model) if cfg.run.strategy == "fedbn" else frozenset())
    return injected_fault(record, arrays, context, cfg, name), metrics, name


def secure_train(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig
) -> tuple[dict[str, np.ndarray], dict[str, float], str]:
    """Train for SecAgg+'s masking stage: the trained model's whole state as numpy arrays by name
    (what ``fedscan.client.secagg`` encodes and masks), its metrics and the site's name."""
    model, metrics, name = train(arrays, conf, context, cfg, secure=True)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, metrics, name


def model_keys(cfg: AppConfig) -> list[str]:
    """The model's array names, in order (SecAgg+ sends the arrays by position)."""
    return list(build_model(cfg.run).state_dict().keys())
