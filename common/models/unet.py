"""The classic 2D U-Net (Ronneberger, Fischer and Brox, MICCAI 2015).

An encoder-decoder with skip connections: four 2x max-pool stages down, four up with
concatenated skips. Built on MONAI's ``BasicUNet``; ``base_channels`` sets the width
(features b, b, 2b, 4b, 8b on the way down).
"""

from __future__ import annotations

from monai.networks.nets import BasicUNet
from torch import nn


def build_unet(in_channels: int, out_channels: int, base_channels: int = 16) -> nn.Module:
    b = base_channels
    return BasicUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        features=(b, b, 2 * b, 4 * b, 8 * b, b),
        norm=("instance", {"affine": True}),
        dropout=0.0,
    )
