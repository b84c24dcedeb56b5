"""Small fast models for CPU demos and tests (not from RepDistiller).

``SmallCNN``: three stages of two 3x3 conv-BN-ReLU at widths w, 2w, 4w, a 2x2 max-pool between stages, a global
average pool and one linear layer. ``cnn_small`` (w = 16) is the demo teacher, ``cnn_tiny`` (w = 8) the demo
student. Input (B, C, H, W) with H, W >= 4; output logits (B, K).

``MLP``: the images average-pooled to ``grid`` x ``grid`` (the identity at that size), flattened, two hidden
Linear-ReLU layers of ``width`` and a linear classifier. ``mlp`` is the teacher and student of the known-posterior
task (08): its Bayes classifier is linear in the pixels, which a global-pooling CNN approximates poorly (cnn_small
reached 77.8% against a Bayes accuracy of 90.2% at 28x28). No feature map, so no Eigen-CAM and no feature-based KD.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..utils import check_int


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """stage1, pool1, stage2, pool2, stage3, avgpool, fc. ``stageN.4`` is a stage's last (pre-ReLU) BN."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        check_int("width", width, minimum=1)
        self.stage1 = _stage(in_channels, width)
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = _stage(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = _stage(2 * width, 4 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.pool2(self.stage2(self.pool1(self.stage1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cnn_small(num_classes: int, in_channels: int = 3, width: int = 16) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width)


def cnn_tiny(num_classes: int, in_channels: int = 3, width: int = 8) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width)


class MLP(nn.Module):
    """pool (to grid x grid), fc1, relu1, fc2, relu2, fc."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 256, grid: int = 8) -> None:
        super().__init__()
        check_int("width", width, minimum=1)
        check_int("grid", grid, minimum=1)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc1, self.relu1 = nn.Linear(in_channels * grid * grid, width), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(width, width), nn.ReLU()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def mlp(num_classes: int, in_channels: int = 3, width: int = 256, grid: int = 8) -> MLP:
    return MLP(num_classes, in_channels, width, grid)
