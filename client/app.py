"""The Flower ClientApp: thin glue between Flower messages and ``fedscan.client.training``.

What leaves the site: the model weights after local training (masked under SecAgg+, see
``fedscan.client.secagg``), scalar metrics, the example counts (rounded up to a multiple of
``count_rounding``), the site's name, and how long the site computed (for the round-overhead
figures). The README's "What leaves a site" lists it per message. Errors are logged in full
locally; the server gets only a generic reason, never a path, a DICOM value or a patient
identifier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedscan.client import secagg, training
from fedscan.client.personal import LocalLayers
from fedscan.common.config import AppConfig
from fedscan.common.data.layout import SiteDir
from fedscan.common.data.quality import quality_factor
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.common.weights import COMPUTE_SECONDS, QUALITY_FACTOR, load_record, norm_keys, to_record

log = logging.getLogger("fedscan.client")

app = ClientApp()

# Preprocessed arrays stay on the site's machine, outside the hospital's data folder.
DEFAULT_CACHE = Path.home() / ".cache" / "fedscan"


class SiteFailure(RuntimeError):
    """What the server is told when a site fails: a category, no details."""


@contextmanager
def _site_errors(what: str) -> Iterator[None]:
    try:
        yield
    except FedscanError as exc:
        log.error("site %s failed: %s", what, exc)
        raise SiteFailure(f"site {what} failed: data or configuration problem (see the site log)") from None
    except Exception:
        log.exception("site %s failed", what)
        raise SiteFailure(f"site {what} failed: internal error (see the site log)") from None


def _site_dir(context: Context, cfg: AppConfig) -> SiteDir:
    nc = context.node_config
    if "data-dir" in nc:  # a deployed SuperNode names its own data folder
        path = Path(str(nc["data-dir"]))
        return SiteDir(str(nc.get("site-name", path.name)), path)
    pid = int(nc["partition-id"])  # simulation: one partition per site folder
    name = cfg.site_names[pid]
    if cfg.run.data_root is None:
        raise FedscanError("the run has no data_root for simulated sites")
    return SiteDir(name, cfg.run.data_root / name)


def _cache_root(context: Context, cfg: AppConfig) -> Path:
    node_cache = str(context.node_config.get("cache-dir", ""))
    return Path(cfg.run.cache_dir or (Path(node_cache) if node_cache else DEFAULT_CACHE))


def _open(context: Context, cfg: AppConfig) -> training.LocalSite:
    return training.open_site(_site_dir(context, cfg), cfg.run, _cache_root(context, cfg))


def _local_layers(context: Context, cfg: AppConfig, site: str) -> LocalLayers | None:
    """FedBN's store of this site's normalization layers, or None under other strategies."""
    return LocalLayers(_cache_root(context, cfg), cfg.run, site) if cfg.run.strategy == "fedbn" else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = AppConfig.from_run_config(context.run_config)
    with _site_errors("training"):
        if secagg.is_secure(msg):  # the SecAgg+ protocol drives this message
            return secagg.secure_train(
                msg, context, lambda arrays, conf, ctxt: _train(arrays, conf, ctxt, cfg, secure=True),
                lambda: list(build_model(cfg.run).state_dict().keys()),
            )
        model, metrics, name = _train(msg.content["arrays"], dict(msg.content["config"]), context, cfg)
        # FedBN: the normalization layers stay here
        record = to_record(model, exclude=norm_keys(model) if cfg.run.strategy == "fedbn" else frozenset())
        record = _injected_fault(record, msg.content["arrays"], context, cfg, name)
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": name})})
    return Message(content=content, reply_to=msg)


def _injected_fault(record: ArrayRecord, global_arrays: ArrayRecord, context: Context, cfg: AppConfig,
                    site: str) -> ArrayRecord:
    """Simulation only (``fault_site``, ``fault_kind``): make this site's update faulty, to test
    how a strategy copes. ``scale``: the update (local minus global) times ``fault_scale``;
    ``nan``: every floating-point value NaN. A deployed site never does this."""
    run = cfg.run
    simulated = "partition-id" in context.node_config and "data-dir" not in context.node_config
    if run.fault_site != site or not simulated:
        return record
    log.warning("site %s: sending a faulty update on purpose (%s), as the simulation asks", site, run.fault_kind)
    out = {}
    for key, arr in record.items():
        local = torch.from_numpy(arr.numpy().copy())
        if local.is_floating_point():
            if run.fault_kind == "nan":
                local.fill_(float("nan"))
            else:
                glob = torch.from_numpy(global_arrays[key].numpy()).to(local.dtype)
                local = glob + run.fault_scale * (local - glob)
        out[key] = local
    return ArrayRecord(out)


def _train(arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig,
           secure: bool = False) -> tuple[Any, dict[str, float], str]:
    """Local training from the global ``arrays``: the model, its metrics and the site's name.
    Under SecAgg+ (``secure``) with FedBN, the model's normalization layers go back to the global
    ones after they are stored here, so that their masked update is zero: they are never sent."""
    t0 = time.perf_counter()
    site = _open(context, cfg)
    model = build_model(cfg.run)
    load_record(model, arrays)
    server_round = int(conf["server-round"])
    local_layers = _local_layers(context, cfg, site.name)
    if local_layers is not None:  # FedBN: this site's own normalization layers, from its last round
        local_layers.forget_from(server_round)  # left by an earlier run, or by this round interrupted
        local_layers.apply(model, server_round - 1)
    metrics = training.train_local(
        model, site, cfg.run,
        server_round=server_round,
        epochs=int(conf.get("local-epochs", cfg.run.local_epochs)),
        lr=float(conf.get("lr", cfg.run.learning_rate)),
        batch_size=int(conf.get("batch-size", cfg.run.batch_size)),
        proximal_mu=float(conf.get("proximal-mu", 0.0)),  # FedProx's µ, sent by its strategy
    )
    _keep_global_counters(model, arrays)
    if local_layers is not None:
        local_layers.save(server_round, model)
        if secure:
            _restore_global(model, arrays, norm_keys(model))
    steps = metrics.pop("steps", 0.0)  # kept here: it would tell the exact count despite count_rounding
    log.info("site %s round %s: trained on %d examples (%d steps), loss %.4f", site.name,
             conf["server-round"], int(metrics["num-examples"]), int(steps), metrics["train_loss"])
    # the example count the site discloses (for the weighting), rounded as the run asks
    metrics["num-examples"] = secagg.round_count(int(metrics["num-examples"]), cfg.run.count_rounding)
    if cfg.run.quality_weighting:  # the server weights this site by count x this factor
        metrics[QUALITY_FACTOR] = quality_factor(site.snr(), cfg.run.quality_snr_reference, cfg.run.quality_floor)
    metrics[COMPUTE_SECONDS] = time.perf_counter() - t0
    return model, metrics, site.name


def _keep_global_counters(model: Any, arrays: ArrayRecord) -> None:
    """Integer buffers (BatchNorm's ``num_batches_tracked``) go back to their global values before
    the update leaves: they count local steps, which would tell the site's exact example count
    despite count_rounding, and BatchNorm with momentum does not read them."""
    _restore_global(model, arrays, {k for k, v in model.state_dict().items() if not v.is_floating_point()})


def _restore_global(model: Any, arrays: ArrayRecord, keys: set[str] | frozenset[str]) -> None:
    """Put the global values of ``keys`` back into ``model`` (only those are read from the record)."""
    for name, value in model.state_dict().items():
        if name in keys and name in arrays:
            value.copy_(torch.from_numpy(arrays[name].numpy()).to(value.dtype))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = AppConfig.from_run_config(context.run_config)
    t0 = time.perf_counter()
    with _site_errors("evaluation"):
        site = _open(context, cfg)
        model = build_model(cfg.run)
        load_record(model, msg.content["arrays"])
        server_round = int(msg.content["config"].get("server-round", 10**9))
        local_layers = _local_layers(context, cfg, site.name)
        if local_layers is not None:  # FedBN: the site's personalized model is what it evaluates
            local_layers.apply(model, server_round)
        # the final round also scores the explanations: single numbers, no image content
        metrics = training.evaluate_local(model, site, cfg.run,
                                          scores=cfg.run.explain_scores and server_round >= cfg.run.rounds)
        metrics["num-examples"] = secagg.round_count(int(metrics["num-examples"]), cfg.run.count_rounding)
        metrics[COMPUTE_SECONDS] = time.perf_counter() - t0
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
