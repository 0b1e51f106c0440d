"""Secure aggregation, the site's half: Flower's ``secaggplus_mod`` around a legacy train reply.

When the server runs SecAgg+, the train message carries the protocol's stage in a
``secaggplus_configs`` record. The mod handles the key agreement and secret sharing stages
itself; in the masking stage it trains like the plaintext path and answers in the legacy
FitRes form the mod expects, with the update encoded as ``fedscan.common.secagg_numerics``
describes, which the mod then quantizes and masks. What leaves the site in that stage: the
masked vector, the (optionally rounded, and capped at ``secagg_max_weight``) example count, and
the scalar training metrics, among them the fraction of the update cut by the clipping range.

The evaluation of the global model it carries (the previous round's) rides on that stage as on a
plaintext training message: its config comes in the FitIns config (``EVALUATE_PREFIX``), the site
evaluates before it trains, and the evaluation's metrics go back in plaintext beside the training
metrics (``EVALUATION_PREFIX``), as a separate evaluation reply would have sent them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedscan.common.message_keys import (
    CLIPPED_FRACTION,
    EVALUATE_FIRST,
    EVALUATE_PREFIX,
    EVALUATED_SITE,
    EVALUATION_PREFIX,
    QUALITY_FACTOR,
)
from fedscan.common.secagg_numerics import encode_update

log = logging.getLogger("fedscan.client")

# (global arrays, round config, context) -> (the trained model's state as numpy arrays by name, its
# metrics, the site's name); this module is imported per message, so it does not import torch
TrainFn = Callable[[ArrayRecord, dict, Context], tuple[Mapping[str, np.ndarray], dict[str, float], str]]
# (global arrays, evaluation config, context) -> (the evaluation's metrics, the site's name), or None
# when the evaluation failed (the site logs why and trains on)
EvaluateFn = Callable[[ArrayRecord, dict, Context], tuple[dict[str, float], str] | None]


def is_secure(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def round_count(n: int, step: int) -> int:
    """The example count a site discloses: rounded up to a multiple of ``step`` (1: exact)."""
    return n if step <= 1 else int(-(-n // step) * step)


def split_evaluation(config: dict) -> tuple[dict, dict | None]:
    """A FitIns config as (the training config, the evaluation config riding on it or None)."""
    if not config.get(EVALUATE_FIRST):
        return config, None
    train = {k: v for k, v in config.items() if k != EVALUATE_FIRST and not k.startswith(EVALUATE_PREFIX)}
    return train, {k[len(EVALUATE_PREFIX) :]: v for k, v in config.items() if k.startswith(EVALUATE_PREFIX)}


def quantization_seed(seed: int, server_round: int, site: str) -> int:
    """The seed of a site's stochastic rounding in one round's SecAgg+ quantization: the run's
    seed, the round and the site's name, hashed (so each site and round draws its own)."""
    digest = hashlib.sha256(f"fedscan-secagg-rounding:{seed}:{server_round}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def secure_train(
    msg: Message,
    context: Context,
    train: TrainFn,
    keys: Callable[[], list[str]],
    seed: int = 0,
    evaluate: EvaluateFn | None = None,
) -> Message:
    """Run SecAgg+ for this message; ``train(global_arrays, config, context)`` does the training
    (and reports the example count already rounded); ``keys()`` names the model's arrays in
    order, asked for only in the stage that trains; ``evaluate`` evaluates the global arrays
    first when the server folded an evaluation into that stage.

    Flower's quantizer rounds stochastically with numpy's global generator, unseeded
    (``flwr.common.secure_aggregation.quantization.quantize``, right after this function's reply
    is handed back to ``secaggplus_mod``); the stage that trains seeds it with
    ``quantization_seed(seed, round, site)`` as it answers, so that a round run again (a resumed
    run) sends the same quantized update and the aggregate comes out bit for bit the same. The
    rounding is not what hides the update (the masks are), so a seed the coordinator could know
    costs nothing."""

    def masked_stage(inner: Message, ctxt: Context) -> Message:
        fitins = recorddict_to_fitins(inner.content, keep_input=True)
        global_np = parameters_to_ndarrays(fitins.parameters)
        model_keys = keys()
        if len(global_np) != len(model_keys):
            raise ValueError(f"the server sent {len(global_np)} arrays; the model has {len(model_keys)}")
        arrays = ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(model_keys, global_np, strict=True)})
        config, eval_config = split_evaluation(dict(fitins.config))
        evaluation = evaluate(arrays, eval_config, ctxt) if evaluate and eval_config is not None else None
        local, metrics, site = train(arrays, config, ctxt)
        for k, a in zip(model_keys, global_np, strict=True):  # the arrays pair with the names by position
            if np.shape(local[k]) != np.shape(a):
                raise ValueError(
                    f"the server's array for {k} has shape {np.shape(a)}, the model's {np.shape(local[k])}"
                )
        params = ctxt.state.config_records[RECORD_KEY_STATE]  # saved by the mod at setup
        # numbers there: the mod keeps them as SecAggPlusState's float fields
        clip = float(cast(float, params["clipping_range"]))
        max_weight = float(cast(float, params["max_weight"]))
        n = int(metrics["num-examples"])
        if QUALITY_FACTOR in metrics:  # quality weighting: the masked weight is count x quality factor
            n = max(1, round(n * float(metrics[QUALITY_FACTOR])))
        if n > max_weight:
            log.warning(
                "this site's %d examples count as secagg_max_weight = %g (its weight is capped)",
                n,
                max_weight,
            )
            n = int(max_weight)
        delta, clipped = encode_update(
            global_np, [np.asarray(local[k]) for k in model_keys], clip, n / max_weight
        )
        if clipped:
            log.warning(
                "%.2g%% of this update's values exceed the SecAgg+ clipping range of +-%g and are cut; "
                "raise secagg_clipping_range",
                100 * clipped,
                clip,
            )
        scalars: dict[str, Scalar] = {k: float(v) for k, v in metrics.items() if k != "num-examples"}
        scalars[CLIPPED_FRACTION] = clipped
        if evaluation is not None:  # sent as a separate evaluation reply would send it: ints stay ints
            eval_metrics, eval_site = evaluation
            scalars.update({f"{EVALUATION_PREFIX}{k}": v for k, v in eval_metrics.items()})
            scalars[EVALUATED_SITE] = eval_site
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), n, scalars)
        server_round = int(cast(int, config.get("server-round", 0)))
        np.random.seed(quantization_seed(seed, server_round, site))  # noqa: NPY002 - Flower's quantizer draws from it
        return Message(fitres_to_recorddict(res, keep_input=False), reply_to=inner)

    return secaggplus_mod(msg, context, masked_stage)
