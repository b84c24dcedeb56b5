"""ShuffleNet (v1) of RepDistiller / CRD for CIFAR: groups 3, widths 240-480-960, 4-8-4 blocks.

Zhang et al., ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices,
https://arxiv.org/abs/1707.01083. Module names match RepDistiller's ``models/ShuffleNetv1.py`` (so its
checkpoints load), plus the parameter-free ``relu`` (stem output), ``avgpool`` and per-block ``preact``.
Input (B, C, H, W) with H, W >= 8; output logits (B, K).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W) with channels reordered from (groups, C/groups) to (C/groups, groups)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; add the input (stride 1) or concatenate its 3x3
    average pool (stride 2), then ReLU. ``preact`` marks the value before that ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(self.preact(torch.cat([out, res], 1) if self.stride == 2 else out + res))


class ShuffleNetV1(nn.Module):
    """Stem (1x1 conv to 24, bn1, relu), layer1..layer3 (each starts with a stride-2 block), pool, linear."""

    def __init__(self, out_planes: tuple[int, int, int], blocks: tuple[int, int, int], groups: int,
                 num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        planes = 24
        for i, (width, count) in enumerate(zip(out_planes, blocks)):
            stage = []
            for j in range(count):
                # The stride-2 block concatenates its input, so its branch makes only the missing channels;
                # the very first 1x1 is not grouped (24 input channels are too few, as in the paper).
                stage.append(Bottleneck(planes, width - planes if j == 0 else width, 2 if j == 0 else 1, groups,
                                        first_groups=1 if i == 0 and j == 0 else groups))
                planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(4), for any input size
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def shuffle_v1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)
