"""ReviewKD (Chen et al., "Distilling knowledge via knowledge review", CVPR 2021, https://arxiv.org/abs/2104.09044)
as mdistiller runs it (``ReviewKD.py``): the student's stage maps and pooled vector, deepest first, pass through
attention-based fusion (ABF) modules that merge each level with the residual of the deeper one; the outputs are
compared with the teacher's pre-ReLU stage maps and pooled vector by the hierarchical context loss
(:func:`mcmi_lab.losses.feature.hcl_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.feature import hcl_loss
from ..utils import check_int
from .base import DistillObjective, _zoo_layers


class ABF(nn.Module):
    """One attention-based fusion level (mdistiller's ``ABF``): 1x1 conv + BN to `mid` channels; when `fuse`, the
    deeper level's residual, upsampled (nearest) to this map's size, is mixed in with two sigmoid attention maps
    from a 1x1 conv of both; the result is resized (nearest) to the teacher's size, and a 3x3 conv + BN gives the
    output of `out_channels`. forward(x, residual) -> (output, residual for the next, shallower level)."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def _as_map(f: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, 1); maps pass."""
    return f if f.dim() == 4 else f[:, :, None, None]


class ReviewKDObjective(DistillObjective):
    """ReviewKD (Chen et al., CVPR 2021) with mdistiller's defaults: ce_weight · CE + min(epoch/warmup, 1) · beta ·
    HCL(ABF(student), teacher), beta 5 (its CIFAR-100 config), warmup 20 epochs (counted from 1), the ABFs' middle
    width min(512, C of the student's pooled vector). Student features: its stage outputs (``student_preact=True``:
    before the last ReLU) and the pooled vector as a 1x1 map; teacher: its pre-ReLU stage maps and pooled vector.
    ``student_layers`` / ``teacher_layers`` name the modules instead (outputs, shallowest first; a (B, C) output
    counts as a 1x1 map). The term "reviewkd" is unwarmed. The ABFs are trained with the student."""

    name = "reviewkd"
    takes = "review"

    def __init__(self, teacher: nn.Module, beta: float = 5.0, warmup: int = 20, student_preact: bool = False,
                 **common):
        super().__init__(teacher, beta, **common)
        self.warmup = check_int("warmup", warmup, minimum=0)
        if not isinstance(student_preact, bool):
            raise ValueError(f"student_preact={student_preact!r} is not accepted: expected True or False")
        self.student_preact = student_preact

    def _select(self, model, override, who):
        if override is not None:
            return [(name, "out") for name in override]
        try:
            names, classifier = _zoo_layers(model, preact=who == "teacher" or self.student_preact)
        except ValueError as e:
            raise ValueError(f"{e}; or pass {who}_layers= naming the modules whose outputs REVIEWKD compares") from None
        return [(name, "out") for name in names[1:]] + [(classifier, "in")]

    def build(self, s, t):
        for layer, shape in s + t:
            if len(shape) not in (2, 4):
                raise ValueError(f"REVIEWKD needs (B, C, H, W) maps or (B, C) vectors: layer {layer!r} gives {shape}")
        s_shapes, t_shapes = ([tuple(shape) + (1, 1) * (len(shape) == 2) for _, shape in side] for side in (s, t))
        mid = min(512, s_shapes[-1][1])
        self.abfs = nn.ModuleList(ABF(ss[1], mid, ts[1], fuse=i < len(s) - 1)
                                  for i, (ss, ts) in enumerate(zip(s_shapes, t_shapes)))
        self._out_sizes = [ts[2:] for ts in t_shapes]

    def method_weight(self) -> float:
        ramp = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        return self.beta * ramp

    def review(self, s: list) -> list[torch.Tensor]:
        """The ABF outputs, shallowest first, from the student features (shallowest first)."""
        outs, residual = [], None
        for i in reversed(range(len(s))):  # deepest (the pooled vector) first
            out, residual = self.abfs[i](_as_map(s[i]), residual, self._out_sizes[i])
            outs.insert(0, out)
        return outs

    def distill_loss(self, s, t, labels, index):
        return hcl_loss(self.review(s), [_as_map(f) for f in t])
