"""Image preprocessing: CT windowing to [0, 1], padding to square, resizing.

Images are resized with antialiased bilinear interpolation; label maps class by class,
so that multi-class masks stay consistent. Everything works on (n, rows, cols) stacks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to the window ``level +- width/2`` and scale to [0, 1]."""
    lo = level - width / 2.0
    return np.clip((hu - lo) / width, 0.0, 1.0).astype(np.float32)


def pad_to_square(stack: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Pad (n, rows, cols) symmetrically so that rows == cols."""
    n, rows, cols = stack.shape
    side = max(rows, cols)
    if rows == cols:
        return stack
    pr, pc = side - rows, side - cols
    pad = ((0, 0), (pr // 2, pr - pr // 2), (pc // 2, pc - pc // 2))
    return np.pad(stack, pad, constant_values=fill)


def resize_images(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize a float stack (n, s, s) to (n, size, size)."""
    if stack.shape[-1] == size and stack.shape[-2] == size:
        return stack.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].numpy()


def resize_labels(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize an integer label stack (n, s, s) to (n, size, size), class by class."""
    if stack.shape[-1] == size and stack.shape[-2] == size:
        return stack.astype(np.uint8, copy=False)
    n_classes = int(stack.max()) + 1 if stack.size else 1
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.int64))
    onehot = F.one_hot(t, num_classes=max(n_classes, 2)).permute(0, 3, 1, 2).float()
    out = F.interpolate(onehot, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.argmax(dim=1).numpy().astype(np.uint8)
