"""Device placement and numeric precision for the training and evaluation loops.

On CUDA, training uses automatic mixed precision (bfloat16 where the GPU supports it,
float16 with loss scaling otherwise), the channels_last memory layout for convolutional
models, and pinned host memory for non-blocking copies. On the CPU everything stays in
float32 with the default layout, so that CPU runs, which the tests use, are deterministic.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn


def move_model(model: nn.Module, device: torch.device | str, memory_format: torch.memory_format) -> nn.Module:
    """``model.to(device, memory_format=...)``, which torch accepts and its type stubs leave out."""
    return model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # keyword not in stubs


@dataclass(frozen=True)
class Precision:
    """How the loops place tensors and run the forward pass on one device."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: full float32
    channels_last: bool = False

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Loss scaling is needed for float16 only; bfloat16 has float32's range."""
        if self.amp_dtype == torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    def place_model(self, model: nn.Module) -> nn.Module:
        if self.channels_last:
            return move_model(model, self.device, torch.channels_last)
        return model.to(self.device)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device; 4D image batches get the model's memory layout."""
        if self.channels_last and x.dim() == 4 and x.is_floating_point():
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)


def choose_precision(
    device: torch.device,
    *,
    amp: bool = True,
    channels_last: bool = True,
    bf16_supported: bool | None = None,
) -> Precision:
    """AMP and channels_last on CUDA when enabled; plain float32 everywhere else."""
    if device.type != "cuda":
        return Precision(device)
    dtype: torch.dtype | None = None
    if amp:
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16_supported else torch.float16
    return Precision(device, dtype, channels_last)
