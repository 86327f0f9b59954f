"""ConvNet of DC / MTT: depth × [conv 3×3 (width), instance norm, ReLU, avg-pool 2] + linear.

Instance norm is ``GroupNorm(width, width)`` with affine parameters, as in the DC/MTT code
(``nn.GroupNorm(channel, channel, affine=True)``); it has no running statistics, so train and eval
mode compute the same function, and no image's output depends on the rest of its batch.

Depth follows the resolution as in DC/MTT: ConvNet (depth 3) at 32 px, ConvNetD4 at 64 px (Tiny-ImageNet),
ConvNetD5 at 128 px (MTT's ImageNet subsets) — i.e. halve until the feature map is at most 4×4:
``depth = max(1, ceil(log2(resolution / 4)))`` (28 px, MNIST-sized, also gets 3). An explicit depth wins.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from guardx.models._registry import register_model


def depth_for_resolution(resolution: int) -> int:
    """3 at 32 px, 4 at 64 px, 5 at 128 px (DC/MTT); the same rule elsewhere (2 at 16 px, 6 at 224 px)."""
    return max(1, math.ceil(math.log2(resolution / 4)))


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 128, depth: int | None = None, resolution: int = 32):
        super().__init__()
        depth = depth_for_resolution(resolution) if depth is None else depth
        layers: list[nn.Module] = []
        in_ch, res = 3, resolution
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            in_ch, res = width, res // 2
        self.depth = depth
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * res * res, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(torchvision=None, batchnorm=False)
def convnet(num_classes: int = 10, width: int = 128, depth: int | None = None, resolution: int = 32) -> ConvNet:
    """DC/MTT ConvNet; ``depth=None`` picks it from ``resolution`` (3 at 32 px, 4 at 64, 5 at 128)."""
    return ConvNet(num_classes, width, depth, resolution)
