"""The four-stage bottleneck ResNets of RepDistiller's ``models/resnetv2.py`` (ResNet50, ResNet152).

He et al., Deep Residual Learning for Image Recognition, https://arxiv.org/abs/1512.03385: the ImageNet
layout (64-128-256-512 bottlenecks, expansion 4) with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs.
(RepDistiller calls the file "v2"; these are not the pre-activation ResNets v2.) Module names match the
reference, so its checkpoints load. Input (B, C, H, W) with H, W >= 8; output logits (B, K).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), plus the shortcut, then ReLU. ``preact`` marks the pre-ReLU sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # empty = identity
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_planes))
        self.preact = nn.Identity()  # parameter-free hook point for the pre-ReLU feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class ResNetV2(nn.Module):
    """Stem (conv1, bn1, relu) at 64 channels, layer1..layer4 of bottlenecks, global average pool, linear."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        planes_in = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(planes_in, planes, stride)]
            planes_in = planes * Bottleneck.expansion
            stage += [Bottleneck(planes_in, planes) for _ in range(count - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes_in, num_classes)
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int, in_channels: int = 3) -> ResNetV2:
    return ResNetV2((3, 4, 6, 3), num_classes, in_channels)


def resnet152(num_classes: int, in_channels: int = 3) -> ResNetV2:
    """RepDistiller's ``resnetv2.ResNet152`` (3, 8, 36, 3 bottlenecks; 58,341,028 parameters at 100 classes),
    registered as ``MODELS["ResNet152"]``. ``MODELS["resnet152"]`` is the MCMI authors' CIFAR basic-block
    ResNet (:func:`mcmi_lab.models.resnet.resnet152`), the network their checkpoints hold."""
    return ResNetV2((3, 8, 36, 3), num_classes, in_channels)
