"""The classic 2D U-Net (Ronneberger, Fischer and Brox, MICCAI 2015), with configurable depth.

An encoder-decoder with skip connections: ``depth`` 2x max-pool stages down, as many
up-convolution stages up, each concatenating the encoder features of its level. Built from
MONAI's U-Net blocks (``TwoConv``, ``Down``, ``UpCat``). Widths: ``b`` at full resolution,
then ``b * 2**(k-1)`` after pooling stage ``k`` (depth 4: b, b, 2b, 4b, 8b, as in MONAI's
``BasicUNet``). Instance norm rather than batch norm: averaging BatchNorm statistics across
hospitals with different scanners proved unstable under FedAvg.
"""

from __future__ import annotations

import torch
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
_NORM = ("instance", {"affine": True})


class UNet2D(nn.Module):
    """2D U-Net: (N, in_channels, H, W) -> logits (N, out_channels, H, W); H, W multiples of 2**depth."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be at least 1, got {depth}")
        b = base_channels
        feats = [b] + [b * 2 ** (k - 1) for k in range(1, depth + 1)]
        self.depth = depth
        self.stem = TwoConv(2, in_channels, feats[0], _ACT, _NORM, True, 0.0)
        self.down = nn.ModuleList(
            Down(2, feats[k], feats[k + 1], _ACT, _NORM, True, 0.0) for k in range(depth)
        )
        # deepest first; the last (full-resolution) stage does not halve its input channels
        self.up = nn.ModuleList(
            UpCat(
                2,
                feats[k + 1],
                feats[k],
                b if k == 0 else feats[k],
                _ACT,
                _NORM,
                True,
                0.0,
                "deconv",
                halves=k != 0,
            )
            for k in reversed(range(depth))
        )
        self.head = nn.Conv2d(b, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.up:
            y = up(y, skips.pop())
        return self.head(y)


def build_unet(in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4) -> nn.Module:
    return UNet2D(in_channels, out_channels, base_channels, depth)
