"""CIFAR ResNets of RepDistiller / CRD: a 3x3 stem and three stages of basic blocks, depth 6n + 2.

He et al., Deep Residual Learning for Image Recognition, https://arxiv.org/abs/1512.03385 (the CIFAR variant,
section 4.2); Tian et al., Contrastive Representation Distillation, https://arxiv.org/abs/1910.10699 (the zoo).
Module names match RepDistiller's ``models/resnet.py``, so its checkpoints load with ``load_state_dict``.
``resnet152`` is the one depth RepDistiller lacks: the MCMI authors' fork (github.com/iclr2024mcmi/ICLRMCMI,
``models/resnet.py``) adds it as ``ResNet(152, [16, 16, 32, 64], 'basicblock')``, the seed code's teacher.
Input (B, C, H, W) with H, W >= 8 (32x32 CIFAR, 28x28 Fashion-MNIST); output logits (B, K).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU. ``preact`` marks the sum before that last ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # never in place: a hook on any layer must keep the value it saw
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        # Parameter-free: a hook here sees RepDistiller's `preact` feature (the pre-ReLU sum).
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + shortcut))


class ResNet(nn.Module):
    """CIFAR ResNet: stem (conv1, bn1, relu), layer1..layer3 at widths[1..3], global average pool, fc."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r} is not accepted: expected 6n + 2 with n >= 1 (8, 14, 20, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = _stage(widths[0], widths[1], n, stride=1)
        self.layer2 = _stage(widths[1], widths[2], n, stride=2)
        self.layer3 = _stage(widths[2], widths[3], n, stride=2)
        # Adaptive where RepDistiller has AvgPool2d(8): same result on 32x32, and 28x28 inputs work too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_planes, planes, stride),
                         *(BasicBlock(planes, planes) for _ in range(blocks - 1)))


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # the "x4" models: four times the width of the last stage


def resnet8(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(8, _THIN, num_classes, in_channels)


def resnet14(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(14, _THIN, num_classes, in_channels)


def resnet20(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(20, _THIN, num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(32, _THIN, num_classes, in_channels)


def resnet44(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(44, _THIN, num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(56, _THIN, num_classes, in_channels)


def resnet110(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(110, _THIN, num_classes, in_channels)


def resnet152(num_classes: int, in_channels: int = 3) -> ResNet:
    """The MCMI authors' resnet152: 25 basic blocks per stage at widths 16-32-64 (2,417,076 parameters at
    100 classes). Not RepDistiller's bottleneck ``ResNet152`` (58M parameters): that one is ``MODELS["ResNet152"]``."""
    return ResNet(152, _THIN, num_classes, in_channels)


def resnet8x4(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(8, _WIDE, num_classes, in_channels)


def resnet32x4(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(32, _WIDE, num_classes, in_channels)
