"""Model weights <-> Flower ArrayRecords, and loading aggregated weights back safely."""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import nn


def to_record(model: nn.Module, exclude: frozenset[str] | set[str] = frozenset()) -> ArrayRecord:
    """The model's state (parameters and BatchNorm buffers) as an ArrayRecord, less ``exclude``."""
    return ArrayRecord({k: v for k, v in model.state_dict().items() if k not in exclude})


# normalization layers: BatchNorm and InstanceNorm (both _NormBase), GroupNorm, LayerNorm
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module) -> frozenset[str]:
    """The state keys of the model's normalization layers (weights, biases, running statistics):
    what FedBN keeps at each site."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            keys.update(f"{name}.{k}" if name else k for k in module.state_dict())
    return frozenset(keys)


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load an ArrayRecord into ``model``, casting back to each tensor's own dtype.

    Averaging turns integer buffers such as BatchNorm's ``num_batches_tracked`` into floats;
    they are rounded back here.
    """
    incoming = record.to_torch_state_dict()
    own = model.state_dict()
    missing = set(own) - set(incoming)
    extra = set(incoming) - set(own)
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    fixed = {}
    for name, t in incoming.items():
        ref = own[name]
        if t.shape != ref.shape:
            raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        fixed[name] = t.round().to(ref.dtype) if not ref.is_floating_point() else t.to(ref.dtype)
    model.load_state_dict(fixed)
