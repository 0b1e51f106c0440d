"""Model weights as torch state dicts: what a site sends, the layers FedBN keeps, and loading
aggregated weights back safely.

No Flower here: the Flower glue converts ArrayRecords to and from these state dicts in
``fedscan.common.array_records``.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet

import numpy as np
import torch
from torch import nn

# a state dict's values as they arrive: torch tensors, or numpy arrays (a checkpoint, SecAgg+'s vectors)
StateValues = Mapping[str, torch.Tensor | np.ndarray]


def model_state(model: nn.Module, exclude: AbstractSet[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The model's state (parameters and BatchNorm buffers), in its order, less ``exclude``."""
    return {k: v for k, v in model.state_dict().items() if k not in exclude}


# normalization layers: BatchNorm and InstanceNorm (both _NormBase), GroupNorm, LayerNorm
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module) -> frozenset[str]:
    """The state keys of the model's normalization layers (weights, biases, running statistics):
    what FedBN keeps at each site."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            keys.update(f"{name}.{k}" if name else k for k in module.state_dict())
    return frozenset(keys)


def _cast(value: torch.Tensor | np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor of ``ref``'s dtype; integer buffers are rounded first (averaging turns
    BatchNorm's ``num_batches_tracked`` into floats)."""
    t = torch.as_tensor(value)
    return t.round().to(ref.dtype) if not ref.is_floating_point() else t.to(ref.dtype)


def load_state(model: nn.Module, state: StateValues) -> None:
    """Load a full state dict into ``model``, casting back to each tensor's own dtype.

    The names and shapes must be the model's own: anything else is a ValueError that says which.
    """
    own = model.state_dict()
    missing = set(own) - set(state)
    extra = set(state) - set(own)
    if missing or extra:
        raise ValueError(
            f"weights do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    fixed = {}
    for name, value in state.items():
        ref = own[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"weight {name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        fixed[name] = _cast(value, ref)
    model.load_state_dict(fixed)


def copy_into(model: nn.Module, state: StateValues, keys: AbstractSet[str]) -> None:
    """Put the values of ``keys`` (those of them that ``state`` holds) into ``model``, in place."""
    for name, value in model.state_dict().items():
        if name in keys and name in state:
            value.copy_(_cast(state[name], value))
