"""Where a model runs: precision (bf16 autocast), memory format, input checks, frozen teachers.

Shared by the training loop (:mod:`mcmi_lab.training.loop`), the passes of :mod:`mcmi_lab.training.evaluate` and the objectives.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..data.core import ImageData
from ..utils import check_choice


def memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's first convolution is stored so (after fit), else contiguous."""
    w = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return torch.channels_last if w is not None and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format


def native_bf16_cpu() -> bool:
    """True on CPUs with native bf16 (AVX-512 BF16 or AMX), where bf16 autocast is the largest speed lever."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for fp32."""
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if precision == "bf16" or device.type == "cuda" or native_bf16_cpu():
        return torch.bfloat16
    return None


def check_model_input(model: nn.Module, data: ImageData, what: str = "this model") -> None:
    """One clear line when the data's channels do not fit the model's first convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != data.in_channels:
        raise ValueError(f"images with {data.in_channels} channel(s) ({data.name}) are not accepted by {what}: "
                         f"its first convolution expects {conv.in_channels}; build it with in_channels={data.in_channels}")
    spec = getattr(getattr(model, "module", model), "spec", None)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outputs = spec.get("num_classes") if isinstance(spec, dict) else linears[-1].out_features if linears else None
    if outputs is not None and outputs != data.num_classes:
        raise ValueError(f"data with {data.num_classes} classes ({data.name}) is not accepted by {what}: it has "
                         f"{outputs} outputs; build it with num_classes={data.num_classes}")


def precision_context(precision: str | None, device: torch.device):
    """The autocast context of a pass: None keeps the caller's; "fp32" off; "bf16" on; "auto" as fit would train."""
    if precision is None:
        return contextlib.nullcontext()  # whatever autocast the caller has set
    check_choice("precision", precision, ("fp32", "bf16", "auto"))
    amp = autocast_dtype(precision, device)
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)


def freeze_teacher(teacher: nn.Module, device, memory_format=torch.contiguous_format) -> nn.Module:
    """Move a teacher to `device`, put it in eval mode and stop its gradients."""
    teacher.to(device=device, memory_format=memory_format).eval().requires_grad_(False)
    return teacher
