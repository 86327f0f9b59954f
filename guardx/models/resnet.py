"""ResNet-18, readable top to bottom.

Parameter names follow torchvision's ``resnet18`` (conv1, bn1, layer1..4, fc, downsample.0/1), so a
torchvision ImageNet checkpoint loads into ``resnet18`` unchanged. Two stems:

* ``imagenet``: 7×7 stride-2 conv + 3×3 max-pool (224 px inputs),
* ``small``: 3×3 stride-1 conv, no pool (the CIFAR/Tiny-ImageNet variant for ≤ 64 px inputs).

``width`` scales every stage (64 is the standard network); the CPU demo uses a narrower one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from guardx.models._registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, width: int = 64, stem: str = "imagenet"):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        w = [width, width * 2, width * 4, width * 8]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = w[0]
        for i, (n, ch) in enumerate(zip(layers, w)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = ch
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))      # (B, w, H/4, W/4) imagenet stem; (B, w, H, W) small
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w, H/32, W/32) imagenet; (B, 8w, H/8, W/8) small
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(torchvision="resnet18", batchnorm=True)
def resnet18(num_classes: int = 1000, width: int = 64, resolution: int | None = None) -> ResNet:
    """ResNet-18 with the ImageNet stem (224 px)."""
    return ResNet((2, 2, 2, 2), num_classes, width, stem="imagenet")


# torchvision=None: same parameter names as torchvision's resnet18, but a 3x3 conv1, so its state_dict does not load
@register_model(torchvision=None, batchnorm=True)
def resnet18_small(num_classes: int = 10, width: int = 64, resolution: int | None = None) -> ResNet:
    """ResNet-18 with the small-image stem (32/64 px: CIFAR, Tiny-ImageNet, the digits demo)."""
    return ResNet((2, 2, 2, 2), num_classes, width, stem="small")
