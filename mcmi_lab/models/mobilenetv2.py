"""MobileNetV2 of RepDistiller / CRD for CIFAR (``mobile_half``: expansion 6, width multiplier 0.5).

Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks, https://arxiv.org/abs/1801.04381.
Module names match RepDistiller's ``models/mobilenetv2.py`` so its checkpoints load.
Input (B, C, H, W) with H, W >= 16 (four stride-2 steps); output logits (B, K).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# (expansion, channels, blocks, first stride) per stage; expansion "T" is the model's expand_ratio.
STAGES = ((1, 16, 1, 1), ("T", 24, 2, 1), ("T", 32, 3, 2), ("T", 64, 4, 2), ("T", 96, 3, 1),
          ("T", 160, 3, 2), ("T", 320, 1, 1))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear); residual when shapes allow."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_planes * expand_ratio
        self.use_res_connect = stride == 1 and in_planes == out_planes
        self.conv = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_planes, 1, 1, 0, bias=False), nn.BatchNorm2d(out_planes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """conv1 (3x3, stride 2), seven stages in ``blocks``, conv2 (1x1 to 1280), global average pool, classifier."""

    def __init__(self, expand_ratio: int, width_mult: float, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in STAGES:
            out = int(c * width_mult)
            ratio = expand_ratio if t == "T" else t
            stage = []
            for stride in [s] + [1] * (n - 1):
                stage.append(InvertedResidual(channels, out, stride, ratio))
                channels = out
            self.blocks.append(nn.Sequential(*stage))
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channel, 1, 1)
        # The reference pools with AvgPool2d(H // 16, ceil_mode=True) = a global average on 32x32 inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobile_half(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(6, 0.5, num_classes, in_channels)
