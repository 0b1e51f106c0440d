"""Image-level classifiers (2D): MONAI's DenseNet-121 and ResNet-18.

Both map ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``. They keep the published
batch norm, so their running statistics are averaged with the weights in federated training.
"""

from __future__ import annotations

from monai.networks.nets import DenseNet121, resnet18
from torch import nn


def build_densenet121(in_channels: int, num_classes: int) -> nn.Module:
    """DenseNet-121: "Densely Connected Convolutional Networks", G. Huang, Z. Liu, L. van der Maaten,
    K. Q. Weinberger, CVPR 2017. Growth rate 32, blocks (6, 12, 24, 16), randomly initialised."""
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


def build_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-18: "Deep Residual Learning for Image Recognition", K. He, X. Zhang, S. Ren, J. Sun,
    CVPR 2016. Basic blocks (2, 2, 2, 2), randomly initialised.

    MONAI's stem defaults to a stride-1 7x7 conv and to biased 1x1 shortcut convs; both are set
    here to the paper's design (stride 2, shortcut conv without bias, followed by batch norm).
    """
    return resnet18(
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=num_classes,
        conv1_t_stride=2,
        bias_downsample=False,
    )
