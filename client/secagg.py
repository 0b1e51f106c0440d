"""Secure aggregation, the site's half: Flower's ``secaggplus_mod`` around a legacy train reply.

When the server runs SecAgg+, the train message carries the protocol's stage in a
``secaggplus_configs`` record. The mod handles the key agreement and secret sharing stages
itself; in the masking stage it calls ``secure_train``, which trains like the plaintext path
and answers in the legacy FitRes form the mod expects, with the update as a delta (local
weights minus global weights, all as float32) that the mod then quantizes and masks. What
leaves the site in that stage: the masked vector, the (optionally rounded) example count and
the scalar training metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from torch import nn

TrainFn = Callable[[ArrayRecord, dict, Context], tuple[nn.Module, dict[str, float], str]]


def is_secure(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def round_count(n: int, step: int) -> int:
    """The example count a site discloses: rounded up to a multiple of ``step`` (1: exact)."""
    return n if step <= 1 else int(-(-n // step) * step)


def secure_train(msg: Message, context: Context, train: TrainFn, keys: Callable[[], list[str]]) -> Message:
    """Run SecAgg+ for this message; ``train(global_arrays, config, context)`` does the training
    (and reports the example count already rounded); ``keys()`` names the model's arrays in
    order, asked for only in the stage that trains."""

    def masked_stage(inner: Message, ctxt: Context) -> Message:
        fitins = recorddict_to_fitins(inner.content, keep_input=True)
        global_np = parameters_to_ndarrays(fitins.parameters)
        model_keys = keys()
        if len(global_np) != len(model_keys):
            raise ValueError(f"the server sent {len(global_np)} arrays; the model has {len(model_keys)}")
        arrays = ArrayRecord({k: torch.from_numpy(np.array(a)) for k, a in zip(model_keys, global_np, strict=True)})
        model, metrics, _site = train(arrays, dict(fitins.config), ctxt)
        local = model.state_dict()
        delta = [local[k].detach().cpu().numpy().astype(np.float64) - g.astype(np.float64)
                 for k, g in zip(model_keys, global_np, strict=True)]
        n = int(metrics["num-examples"])
        scalars = {k: float(v) for k, v in metrics.items() if k != "num-examples"}
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([d.astype(np.float32) for d in delta]), n, scalars)
        return Message(fitres_to_recorddict(res, keep_input=False), reply_to=inner)

    return secaggplus_mod(msg, context, masked_stage)
