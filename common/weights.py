"""Model weights <-> Flower ArrayRecords, and loading aggregated weights back safely."""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import nn


def to_record(model: nn.Module) -> ArrayRecord:
    """The model's full state (parameters and BatchNorm buffers) as an ArrayRecord."""
    return ArrayRecord(model.state_dict())


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


# seconds a site spent handling a message (open data, train or evaluate): a metric both
# replies carry; the server keeps it apart from the model's metrics
COMPUTE_SECONDS = "compute_seconds"

# under SecAgg+, the fraction of a site's update that the clipping range cut: the server warns
# when it is not zero (the aggregate is then biased)
CLIPPED_FRACTION = "secagg_clipped"
