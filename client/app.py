"""The Flower ClientApp: thin glue between Flower messages and ``fedscan.client.site_round``.

What leaves the site: the model weights after local training (masked under SecAgg+, see
``fedscan.client.secagg``), scalar metrics, the example counts (rounded up to a multiple of
``count_rounding``), the site's name, and how long the site computed (for the round-overhead
figures). The README's "What leaves a site" lists it per message. Errors are logged in full
locally; the server gets only a generic reason, never a path, a DICOM value or a patient
identifier.

A deployed SuperNode starts one ClientApp process per message. This module imports only Flower
and the configuration; the work goes through ``fedscan.client.site_runner``: to the site's warm
worker when `fedscan site start` runs one, else in this process (the simulation), where the
training code (torch, MONAI, the data pipeline) is imported when a message first needs it.
A message's arrays come packed into one Flower object (``fedscan.common.packed_records``); the
reply is packed when the request was. A plaintext training message may also ask for the
evaluation of the model it carries (``EVALUATE_CONFIG``, see ``fedscan.server.round_loop``): the
site evaluates first, then trains, and answers both in one reply; when only the training fails,
the reply still carries the evaluation, and the failure's category under ``TRAINING_FAILED``;
when only the evaluation fails, the site trains all the same and the reply carries no evaluation.
Under SecAgg+ the evaluation rides on the protocol's stage that trains (``fedscan.client.secagg``)
in the same way, except that a site whose training fails there sends no reply the protocol could
carry, so its evaluation of that model is missing too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from fedscan.client import secagg, site_runner
from fedscan.common.config import AppConfig
from fedscan.common.errors import FedscanError
from fedscan.common.message_keys import EVALUATE_CONFIG, EVALUATION, TRAINING_FAILED
from fedscan.common.packed_records import packed, unpacked

log = logging.getLogger("fedscan.client")

app = ClientApp()


class SiteFailure(RuntimeError):
    """What the server is told when a site fails: a category, no details."""


def _failure(what: str, exc: Exception) -> SiteFailure:
    """What the server is told of ``exc``, logged here in full."""
    if isinstance(exc, FedscanError):
        log.error("site %s failed: %s", what, exc)
        return SiteFailure(f"site {what} failed: data or configuration problem (see the site log)")
    log.error("site %s failed", what, exc_info=exc)
    return SiteFailure(f"site {what} failed: internal error (see the site log)")


@contextmanager
def _site_errors(what: str) -> Iterator[None]:
    try:
        yield
    except SiteFailure:
        raise  # already told as what it is (an evaluation inside a training message)
    except Exception as exc:
        raise _failure(what, exc) from None


@app.train()
def train(msg: Message, context: Context) -> Message:
    with _site_errors("training"):
        msg, was_packed = unpacked(msg)
    reply = _train(msg, context)
    return packed(reply) if was_packed else reply  # answer as asked: a server that packs unpacks


def _train(msg: Message, context: Context) -> Message:
    cfg = AppConfig.from_run_config(context.run_config)
    with _site_errors("training"):
        if secagg.is_secure(msg):  # the SecAgg+ protocol drives this message

            def masked_train(  # the stage that trains
                arrays: ArrayRecord, conf: dict, ctxt: Context
            ) -> tuple[Mapping[str, np.ndarray], dict[str, float], str]:
                return site_runner.secure_train(arrays, conf, ctxt, cfg)

            def evaluate_first(  # the model it carries, evaluated before it trains
                arrays: ArrayRecord, conf: dict, ctxt: Context
            ) -> tuple[dict[str, float], str] | None:
                try:
                    return site_runner.evaluate(arrays, conf, ctxt, cfg)
                except Exception as exc:  # noqa: BLE001 - as a failed evaluation message: the site trains on
                    _failure("evaluation", exc)  # logged here; the round's report names the site missing
                    return None

            return secagg.secure_train(
                msg,
                context,
                masked_train,
                lambda: site_runner.model_keys(context, cfg),
                seed=cfg.run.seed,
                evaluate=evaluate_first,
            )
        arrays = msg.content.array_records["arrays"]
        evaluation = None
        if EVALUATE_CONFIG in msg.content.config_records:  # the model it carries, evaluated first
            eval_conf = dict(msg.content.config_records[EVALUATE_CONFIG])
            try:
                evaluation, name = site_runner.evaluate(arrays, eval_conf, context, cfg)
            except Exception as exc:  # noqa: BLE001 - as a failed evaluation message: the site trains on
                _failure("evaluation", exc)  # logged here; the round's report names the site missing
        try:
            record, metrics, name = site_runner.plain_train(
                arrays, dict(msg.content.config_records["config"]), context, cfg
            )
        except Exception as exc:
            if evaluation is None:
                raise
            # the evaluation still counts: the training failure goes with it, as its category
            content = RecordDict(
                {
                    EVALUATION: MetricRecord(_values(evaluation)),
                    "site": ConfigRecord({"name": name}),
                    TRAINING_FAILED: ConfigRecord({"reason": str(_failure("training", exc))}),
                }
            )
            return Message(content=content, reply_to=msg)
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord(_values(metrics)), "site": ConfigRecord({"name": name})}
    )
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(_values(evaluation))
    return Message(content=content, reply_to=msg)


def _values(metrics: dict[str, float]) -> dict[str, MetricRecordValues]:
    """The site's metrics as MetricRecord types them (dict is invariant in its values): no copy."""
    return cast(dict[str, MetricRecordValues], metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = AppConfig.from_run_config(context.run_config)
    with _site_errors("evaluation"):
        msg, _ = unpacked(msg)  # the reply holds no arrays
        metrics, name = site_runner.evaluate(
            msg.content.array_records["arrays"], dict(msg.content.config_records["config"]), context, cfg
        )
    content = RecordDict({"metrics": MetricRecord(_values(metrics)), "site": ConfigRecord({"name": name})})
    return Message(content=content, reply_to=msg)
