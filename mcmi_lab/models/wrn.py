"""Wide ResNets WRN-d-k of RepDistiller / CRD (pre-activation blocks, depth 6n + 4, widths 16k-32k-64k).

Zagoruyko & Komodakis, Wide Residual Networks, https://arxiv.org/abs/1605.07146. Module names (including the
reference's ``convShortcut``) match RepDistiller's ``models/wrn.py``, so its checkpoints load.
Input (B, C, H, W) with H, W >= 4; output logits (B, K).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv plus the shortcut.

    When the width or stride changes, the shortcut (a 1x1 conv) starts from the pre-activated input, as in the
    reference; so the output of ``bn1`` of a stage's first block is the previous stage's pre-ReLU feature.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()  # never in place: hooks on bn1 must keep the pre-ReLU value
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """One stage: ``layer`` holds the blocks (the wrapper keeps RepDistiller's ``blockN.layer.i`` names)."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(BasicBlock(in_planes, out_planes, stride),
                                   *(BasicBlock(out_planes, out_planes, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """conv1, block1..block3, then bn1-relu on the last stage, global average pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth!r} is not accepted: expected 6n + 4 with n >= 1 (10, 16, 22, ...)")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(8), for any input size
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels)


def wrn_16_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_channels)


def wrn_40_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_channels)
