"""SecAgg+ numerics, shared by both halves: how a site encodes its update before Flower masks it,
how the server decodes the aggregate, the default quantization range, and the error bound.

A site sends its update as a delta (local minus global weights), flattened to 1-D float64
arrays: Flower's quantizer mishandles 0-D arrays, and it computes in the arrays' own precision,
where float32 would lose the low bits of quantization levels above 2^24. (The float arrays stay
at the site; what leaves is the masked integer vector.) Integer buffers, such as BatchNorm's
``num_batches_tracked``, are step counters: their delta is sent as zero, so they keep the global
value (the ClientApp resets them before any reply; a count of local steps would tell the
site's exact example count, and BatchNorm with momentum does not read it). Flower then scales
each delta by the site's weight ``n / max_weight``, clips it to ±clip and quantizes it with
stochastic rounding to a step of ``2 * clip / Q``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODULUS = 2**32  # Flower's SecAgg+ modulus range: its default and its maximum


def quantization_range(n_sites: int) -> int:
    """The largest power of two Q with ``n_sites * Q < MODULUS``: the sum of the sites' quantized
    values (each in [0, Q], and Flower's weight factor, at most Q) then cannot wrap around."""
    if n_sites < 1:
        raise ValueError(f"needs at least one site, got {n_sites}")
    return 1 << (((MODULUS - 1) // n_sites).bit_length() - 1)


def _is_counter(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind in "iub"


def encode_update(
    global_arrays: Sequence[np.ndarray], local_arrays: Sequence[np.ndarray], clip: float, weight_ratio: float
) -> tuple[list[np.ndarray], float]:
    """The site's delta, ready for Flower's quantizer, and the fraction of its values that the
    clipping range will cut (after Flower's scaling by ``weight_ratio = n / max_weight``)."""
    if len(global_arrays) != len(local_arrays):
        raise ValueError(f"{len(local_arrays)} local arrays for {len(global_arrays)} global ones")
    out, clipped, total = [], 0, 0
    for g, loc in zip(global_arrays, local_arrays, strict=True):
        if g.shape != loc.shape:
            raise ValueError(f"a local array has shape {loc.shape}, the global one {g.shape}")
        delta = (
            np.zeros(g.size)
            if _is_counter(g.dtype)
            else (loc.astype(np.float64) - g.astype(np.float64)).reshape(-1)
        )
        if not np.isfinite(delta).all():  # it would corrupt everyone's sum; the site drops out instead
            raise ValueError("the update holds NaN or infinite values")
        clipped += int(np.count_nonzero(np.abs(delta) * min(weight_ratio, 1.0) > clip))
        total += delta.size
        out.append(delta)
    return out, clipped / max(total, 1)


def decode_aggregate(
    global_arrays: dict[str, np.ndarray], aggregate: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """global + the aggregated delta, array by array, in each array's own dtype and shape
    (integer buffers keep their global value)."""
    if len(aggregate) != len(global_arrays):
        raise ValueError(f"the aggregate has {len(aggregate)} arrays, the model {len(global_arrays)}")
    out = {}
    for (key, g), d in zip(global_arrays.items(), aggregate, strict=True):
        if d.size != g.size:
            raise ValueError(f"the aggregate's {key} has {d.size} values, the model's {g.size}")
        if _is_counter(g.dtype):
            out[key] = g.copy()
        else:
            out[key] = (g.astype(np.float64) + d.astype(np.float64).reshape(g.shape)).astype(g.dtype)
    return out


def error_bound(clip: float, q_range: int, max_weight: float, counts: Sequence[int]) -> float:
    """Largest difference between a float weight of the secure aggregate and of the plaintext
    example-weighted mean, before both are rounded to the model's precision, for updates whose
    values lie within ±clip (the site reports the fraction that does not).

    Flower computes Σ dq_i·x_i / Σ dq_i with dq_i = round(Q·n_i/max_weight)/Q, each site's term
    quantized with stochastic rounding (an error below one step 2·clip/Q). So the k sites add
    less than k·2·clip/Q, and weighting by dq_i rather than n_i/max_weight (each off by at most
    1/(2Q)) moves the mean by at most k·(spread of the x_i ≤ 2·clip)/(Q·Σ dq_i); Σ dq_i is at least
    Σ n_i/max_weight − k/(2Q)."""
    k = len(counts)
    total = sum(min(n, max_weight) for n in counts) / max_weight - k / (2 * q_range)
    if total <= 0:
        raise ValueError("no examples")
    return k * 4 * clip / q_range / total
