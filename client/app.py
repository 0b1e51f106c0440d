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
from fedscan.common.config import AppConfig
from fedscan.common.data.layout import SiteDir
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model
from fedscan.common.weights import COMPUTE_SECONDS, load_record, to_record

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


def _open(context: Context, cfg: AppConfig) -> training.LocalSite:
    site = _site_dir(context, cfg)
    node_cache = str(context.node_config.get("cache-dir", ""))
    cache_root = cfg.run.cache_dir or (Path(node_cache) if node_cache else DEFAULT_CACHE)
    return training.open_site(site, cfg.run, cache_root)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = AppConfig.from_run_config(context.run_config)
    with _site_errors("training"):
        if secagg.is_secure(msg):  # the SecAgg+ protocol drives this message
            return secagg.secure_train(
                msg, context, lambda arrays, conf, ctxt: _train(arrays, conf, ctxt, cfg),
                lambda: list(build_model(cfg.run).state_dict().keys()),
            )
        model, metrics, name = _train(msg.content["arrays"], dict(msg.content["config"]), context, cfg)
    content = RecordDict({"arrays": to_record(model), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": name})})
    return Message(content=content, reply_to=msg)


def _train(arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig) -> tuple[Any, dict[str, float], str]:
    """Local training from the global ``arrays``: the model, its metrics and the site's name."""
    t0 = time.perf_counter()
    site = _open(context, cfg)
    model = build_model(cfg.run)
    load_record(model, arrays)
    metrics = training.train_local(
        model, site, cfg.run,
        server_round=int(conf["server-round"]),
        epochs=int(conf.get("local-epochs", cfg.run.local_epochs)),
        lr=float(conf.get("lr", cfg.run.learning_rate)),
        batch_size=int(conf.get("batch-size", cfg.run.batch_size)),
        proximal_mu=float(conf.get("proximal-mu", 0.0)),  # FedProx's µ, sent by its strategy
    )
    _keep_global_counters(model, arrays)
    steps = metrics.pop("steps", 0.0)  # kept here: it would tell the exact count despite count_rounding
    log.info("site %s round %s: trained on %d examples (%d steps), loss %.4f", site.name,
             conf["server-round"], int(metrics["num-examples"]), int(steps), metrics["train_loss"])
    # the example count the site discloses (for the weighting), rounded as the run asks
    metrics["num-examples"] = secagg.round_count(int(metrics["num-examples"]), cfg.run.count_rounding)
    metrics[COMPUTE_SECONDS] = time.perf_counter() - t0
    return model, metrics, site.name


def _keep_global_counters(model: Any, arrays: ArrayRecord) -> None:
    """Integer buffers (BatchNorm's ``num_batches_tracked``) go back to their global values before
    the update leaves: they count local steps, which would tell the site's exact example count
    despite count_rounding, and BatchNorm with momentum does not read them."""
    for name, value in model.state_dict().items():  # only the counters are read back from the record
        if not value.is_floating_point() and name in arrays:
            value.copy_(torch.from_numpy(arrays[name].numpy()))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = AppConfig.from_run_config(context.run_config)
    t0 = time.perf_counter()
    with _site_errors("evaluation"):
        site = _open(context, cfg)
        model = build_model(cfg.run)
        load_record(model, msg.content["arrays"])
        metrics = training.evaluate_local(model, site, cfg.run)
        metrics["num-examples"] = secagg.round_count(int(metrics["num-examples"]), cfg.run.count_rounding)
        metrics[COMPUTE_SECONDS] = time.perf_counter() - t0
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
