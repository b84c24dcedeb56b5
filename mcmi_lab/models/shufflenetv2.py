"""ShuffleNetV2 (1x) of RepDistiller / CRD for CIFAR: widths 116-232-464, 3-7-3 blocks, 1x1 conv to 1024.

Ma et al., ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design,
https://arxiv.org/abs/1807.11164. Module names match RepDistiller's ``models/ShuffleNetv2.py`` (so its
checkpoints load), plus the parameter-free ``relu1``/``relu2``/``avgpool`` and per-block ``preact``.
Input (B, C, H, W) with H, W >= 8; output logits (B, K).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shufflenetv1 import ShuffleBlock


class BasicBlock(nn.Module):
    """Split channels in half; the right half goes 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concat, shuffle.

    ``preact`` sees the concatenation with the right half before its last ReLU (RepDistiller's preact).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ShuffleBlock(2)
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        right = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(right)))))
        preact = self.preact(torch.cat([left, self.bn3(self.conv3(right))], 1))
        # The reference concatenates `left` with relu(right); relu of the whole concatenation is the same
        # tensor because `left` is already >= 0 (every block's output is a shuffled concat of ReLU outputs).
        return self.shuffle(F.relu(preact))


class DownBlock(nn.Module):
    """Stride-2 unit: left depthwise 3x3-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """Stem (1x1 conv to 24, bn1, relu1), layer1..layer3 (DownBlock + BasicBlocks), conv2-bn2-relu2, pool, linear."""

    def __init__(self, out_channels: tuple[int, int, int, int], blocks: tuple[int, int, int], num_classes: int,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        channels = 24
        for i, (width, count) in enumerate(zip(out_channels[:3], blocks)):
            stage = [DownBlock(channels, width)] + [BasicBlock(width) for _ in range(count)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            channels = width
        self.conv2 = nn.Conv2d(channels, out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(4), for any input size
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def shuffle_v2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_channels)
