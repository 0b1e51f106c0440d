"""Model state dicts <-> Flower ArrayRecords: the one place fedscan converts between the two.

Training, FedBN's layers and weight loading (``fedscan.common.weights``) work on torch state
dicts; the Flower glue (the ClientApp's ``fedscan.client.site_round``, the ServerApp, the
strategies, the SecAgg+ bridge, the checkpoints) holds ArrayRecords and converts here.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedscan.common.weights import StateValues, load_state, model_state


def _numpy(key: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic)):  # numpy arithmetic turns 0-d arrays into scalars
        return np.asarray(value)
    raise TypeError(f"weight {key} is a {type(value).__name__}, not an array")


def from_state(state: StateValues) -> ArrayRecord:
    """A state dict (tensors or numpy arrays) as an ArrayRecord, in the state dict's order."""
    return ArrayRecord({k: Array(_numpy(k, v)) for k, v in state.items()})


def to_state(record: ArrayRecord, keys: AbstractSet[str] | None = None) -> dict[str, torch.Tensor]:
    """The record as a torch state dict, in its order; with ``keys`` only those arrays are decoded."""
    return {k: torch.from_numpy(record[k].numpy()) for k in record if keys is None or k in keys}


def to_record(model: nn.Module, exclude: AbstractSet[str] = frozenset()) -> ArrayRecord:
    """The model's state (parameters and BatchNorm buffers) as an ArrayRecord, less ``exclude``."""
    return from_state(model_state(model, exclude))


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load an ArrayRecord into ``model`` (``fedscan.common.weights.load_state`` checks and casts)."""
    load_state(model, to_state(record))
