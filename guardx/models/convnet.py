"""ConvNet of DC / MTT: depth × [conv 3×3 (width), instance norm, ReLU, avg-pool 2] + linear.

Instance norm is ``GroupNorm(width, width)`` with affine parameters, as in the DC/MTT code
(``nn.GroupNorm(channel, channel, affine=True)``); it has no running statistics, so train and eval
mode compute the same function.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from guardx.models._registry import register_model


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 128, depth: int = 3, resolution: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, res = 3, resolution
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            in_ch, res = width, res // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * res * res, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(torchvision=None, batchnorm=False)
def convnet(num_classes: int = 10, width: int = 128, depth: int = 3, resolution: int = 32) -> ConvNet:
    return ConvNet(num_classes, width, depth, resolution)
