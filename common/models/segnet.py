"""SegNet (Badrinarayanan, Kendall and Cipolla, IEEE TPAMI 2017), written with plain ``torch.nn``.

MONAI has no SegNet, so this module builds it from conv, batch-norm and pooling layers.
The encoder is the 13-conv VGG16 with batch norm; the decoder upsamples with the encoder's
max-pooling indices (``MaxUnpool2d``) instead of transposed convolutions or skip concatenation.
"""

from __future__ import annotations

import torch
from torch import nn

# VGG16: (convolutions, output channels) for each of the five pooling stages.
_VGG16_STAGES: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SegNet(nn.Module):
    """SegNet: "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image Segmentation",
    V. Badrinarayanan, A. Kendall, R. Cipolla, IEEE TPAMI 39(12), 2017.

    Encoder: the five VGG16 stages (2, 2, 3, 3, 3 convs; 64, 128, 256, 512, 512 channels times
    ``width``), each conv3x3 + BatchNorm + ReLU and each stage followed by a 2x2 max pool that keeps
    its argmax indices. Decoder: for each stage, deepest first, ``MaxUnpool2d`` with that stage's
    indices, then as many conv + BN + ReLU as the encoder stage, the last of which maps to the
    channels of the shallower stage. As in the reference Caffe model, the shallowest decoder ends
    with a plain conv3x3 to ``out_channels`` (no BN, no ReLU) that gives the logits.

    Layout, for inspection: ``encoder[i]`` and ``pools[i]`` are encoder stage ``i`` (0 = shallowest);
    ``unpools[j]`` and ``decoder[j]`` run in execution order, so they undo stage ``4 - j``.

    Input ``(N, in_channels, H, W)`` gives logits ``(N, out_channels, H, W)``. H and W should be
    multiples of 32 so that every pooling is exact; other sizes of at least 32 work too, because
    each unpool is given the size of the tensor before its pooling.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        depths = [n for n, _ in _VGG16_STAGES]
        channels = [max(1, round(c * width)) for _, c in _VGG16_STAGES]

        self.encoder = nn.ModuleList()
        self.pools = nn.ModuleList()
        previous = in_channels
        for depth, c in zip(depths, channels, strict=True):
            layers: list[nn.Module] = []
            for k in range(depth):
                layers += _conv_bn_relu(previous if k == 0 else c, c)
            self.encoder.append(nn.Sequential(*layers))
            self.pools.append(nn.MaxPool2d(2, 2, return_indices=True))
            previous = c

        self.unpools = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for stage in reversed(range(len(depths))):
            c = channels[stage]
            layers = []
            for _ in range(depths[stage] - 1):
                layers += _conv_bn_relu(c, c)
            if stage > 0:
                layers += _conv_bn_relu(c, channels[stage - 1])
            else:
                layers.append(nn.Conv2d(c, out_channels, 3, padding=1))
            self.unpools.append(nn.MaxUnpool2d(2, 2))
            self.decoder.append(nn.Sequential(*layers))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encoder_convs(self) -> list[nn.Conv2d]:
        """The 13 encoder convolutions, shallowest first."""
        return [m for stage in self.encoder for m in stage.children() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved: list[tuple[torch.Tensor, torch.Size]] = []
        for stage, pool in zip(self.encoder, self.pools, strict=True):
            x = stage(x)
            size = x.shape[-2:]
            x, indices = pool(x)
            saved.append((indices, size))
        for unpool, stage in zip(self.unpools, self.decoder, strict=True):
            indices, size = saved.pop()
            x = stage(unpool(x, indices, output_size=size))
        return x


def build_segnet(in_channels: int, out_channels: int, width: float = 1.0) -> SegNet:
    """SegNet (Badrinarayanan et al., TPAMI 2017) with VGG16 channel counts scaled by ``width``."""
    return SegNet(in_channels=in_channels, out_channels=out_channels, width=width)
