"""Model wrappers that change a model's outputs but not its layers (features, CAM layers stay reachable as `.model`)."""
from __future__ import annotations

import torch
from torch import nn


class TemperatureScaled(nn.Module):
    """A model whose logits are divided by a fixed temperature (Guo et al. 2017, temperature scaling)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.spec = getattr(model, "spec", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature
