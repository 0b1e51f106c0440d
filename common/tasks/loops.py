"""The optimisation loop shared by the tasks: seeded shuffling, Adam, AMP, finite-loss guard."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedscan.common.tasks.precision import Precision

# (inputs, targets); inputs may be a list of tensors, e.g. exams of different lengths
Batch = tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]


def seeded_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    precision: Precision,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A shuffling loader whose order depends only on ``seed``."""
    if not isinstance(dataset, Sized):  # torch's Dataset declares no __len__; map-style ones have it
        raise TypeError(f"{type(dataset).__name__} has no length")
    n = len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=n > batch_size,
        pin_memory=precision.pin_memory,
        collate_fn=collate_fn,
    )


def fit(
    model: nn.Module,
    batches: Callable[[], Iterable[Batch]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    precision: Precision,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train ``model`` in place with Adam; ``batches()`` yields one epoch of (x, y).

    With ``proximal_mu`` > 0 (FedProx, Li et al. 2020), the loss also holds
    µ/2 · ‖w − w_start‖², w_start being the weights training started from: the global model.

    The loss is computed in float32 on the model's output. The running loss stays on the
    device (no host synchronisation per step); an epoch whose loss is not finite stops
    training with an error rather than sending a broken update.
    """
    model = precision.place_model(model)
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    # foreach: the same updates, bit for bit, as the default loop over the tensors, at 0.6x its
    # cost on the CPU (0.97 against 1.61 ms a step for a 2-level U-Net of width 8); the default on CUDA
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    scaler = precision.grad_scaler()
    total = torch.zeros((), dtype=torch.float64, device=precision.device)
    count, steps = 0, 0
    for _ in range(epochs):
        for x, y in batches():
            x = [precision.place(b) for b in x] if isinstance(x, list) else precision.place(x)
            y = precision.place(y)
            opt.zero_grad(set_to_none=True)
            with precision.autocast():
                out = forward(model, x) if forward else model(x)
            loss = loss_fn(out.float(), y)
            if anchor:
                loss = loss + proximal_mu / 2 * sum(
                    ((p.float() - a.float()) ** 2).sum()
                    for p, a in zip(model.parameters(), anchor, strict=True)
                )
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            n = int(y.shape[0])
            total += loss.detach() * n
            count += n
            steps += 1
        if not torch.isfinite(total):
            raise FloatingPointError("training loss is not finite")
    return {"train_loss": float(total) / max(count, 1), "steps": float(steps)}
