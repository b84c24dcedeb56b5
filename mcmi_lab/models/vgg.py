"""VGG with BatchNorm for CIFAR, as in RepDistiller / CRD: five conv blocks, no FC stack, one linear layer.

Simonyan & Zisserman, Very Deep Convolutional Networks, https://arxiv.org/abs/1409.1556 (the ``vgg*_bn``
configurations; RepDistiller's "vgg8" is its configuration "S"). Module names match RepDistiller's
``models/vgg.py`` so its checkpoints load; the parameter-free ``relu0..relu4`` are added so that each block's
post-ReLU output is a module output a hook can see (the reference applies F.relu inline).
Input (B, C, H, W) with H, W >= 8 (three 2x2 max-pools); output logits (B, K).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# Channels of the conv layers in block0..block4.
CONFIGS = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(channels: tuple[int, ...], in_channels: int) -> nn.Sequential:
    """conv(bias)-BN-ReLU per entry, without the last ReLU: the block's output is pre-activation."""
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        in_channels = c
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """block0..block4 (each followed by reluN), max-pools after blocks 0-2, global average pool, classifier."""

    def __init__(self, config: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        cfg = CONFIGS[config]
        ins = (in_channels,) + tuple(block[-1] for block in cfg[:-1])
        for i, (channels, c_in) in enumerate(zip(cfg, ins)):
            setattr(self, f"block{i}", _block(channels, c_in))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        for i in range(5):
            setattr(self, f"relu{i}", nn.ReLU())
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        for m in self.modules():  # RepDistiller's initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if height == 64:  # as the reference: a fourth pool only for 64x64 inputs (Tiny-ImageNet)
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def vgg8(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG("S", num_classes, in_channels)


def vgg11(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG("A", num_classes, in_channels)


def vgg13(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG("B", num_classes, in_channels)


def vgg16(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG("D", num_classes, in_channels)


def vgg19(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG("E", num_classes, in_channels)
