"""`predict` exists once; every metric (accuracy, confusion, CMI, NCMI, soft labels) comes from its logits.

Under torch.distributed each rank takes a contiguous, exact shard (no padding duplicates) and the statistics are
all-reduced, so the numbers equal the single-process ones.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from . import distributed as dist_utils
from ..metrics.cmi import CMIMeter, omitted_mass
from ..data.core import ImageData, batches
from .runtime import check_model_input, memory_format, precision_context
from ..utils import check_float


def eval_batch_size(device: torch.device) -> int:
    """The default batch of a pass: 1000 on accelerators; 256 on a CPU, where batches of 1000 spill the caches and
    ran 1.3-2.5x slower (fp32 and bf16, small CNNs and CIFAR ResNets; see benchmarks/README.md)."""
    return 256 if device.type == "cpu" else 1000


def iter_logits(model: nn.Module, data: ImageData, batch_size: int | None = None, device=None,
                shard: bool = False, precision: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits float32, labels)`` per batch under inference mode; the model's train/eval mode is restored.

    `device` defaults to the model's own device; `batch_size` to :func:`eval_batch_size`. With `shard` under
    torch.distributed, this rank's exact shard only. A float64 model keeps float64 logits (exact comparisons of
    metrics). precision: None (default) runs as the caller's autocast state says (fp32 outside autocast); "fp32"
    turns autocast off; "bf16" turns it on; "auto" is bf16 where fit would train in bf16 (about 3x faster on CPUs
    with native bf16 — for passes that steer training, such as MCMI centroids; report metrics from fp32 logits).
    Inputs take the model's memory format (channels-last after fit), so no layout conversion runs inside the model.
    """
    check_model_input(model, data)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = batch_size or eval_batch_size(device)
    fmt = memory_format(model)
    cast = precision_context(precision, device)
    was_training = model.training
    model.eval()
    rank, world = (dist_utils.rank(), dist_utils.world_size()) if shard else (0, 1)
    try:
        for images, labels in batches(data.to(device), batch_size, rank=rank, world_size=world):
            # contexts around the forward only: a generator must not leave them set in its caller between yields
            with torch.inference_mode(), cast:
                logits = model(images.contiguous(memory_format=fmt))
            yield (logits if logits.dtype == torch.float64 else logits.float()), labels
    finally:
        model.train(was_training)


def predict(model: nn.Module, data: ImageData, batch_size: int | None = None, device=None,
            precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of `data`: ``(N, K) float32 (float64 for a float64 model), (N,) int64`` on the CPU.

    precision: as :func:`iter_logits`."""
    outs = [(logits.cpu(), labels.cpu())
            for logits, labels in iter_logits(model, data, batch_size, device, precision=precision)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def measure_cmi(model: nn.Module, data: ImageData, temperature: float = 1.0, batch_size: int | None = None,
                precision: str | None = None) -> dict:
    """One streaming pass: CMI, per-class CMI, separation, NCMI, centroids and accuracy (memory O(K²), not O(N)).

    Under torch.distributed every rank passes its own shard and the sums are all-reduced. precision: as
    :func:`iter_logits` (the statistics are accumulated in float64 either way).
    """
    check_float("temperature", temperature, 0.0, low_open=True)
    k = data.num_classes
    meter = CMIMeter(k, temperature, device=next(model.parameters()).device)
    correct = torch.zeros((), device=meter.count.device)
    for logits, labels in iter_logits(model, data, batch_size, shard=True, precision=precision):
        meter.update(logits, labels)
        correct += (logits.argmax(1) == labels).sum()
    meter.all_reduce()
    correct = dist_utils.all_reduce_sum(correct)
    out = meter.compute()
    out["accuracy"] = float(correct / meter.count.sum())
    return out


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float = 1.0) -> dict:
    """Accuracy, per-class accuracy, confusion matrix (rows: true class), NLL, CMI, per-class CMI, Γ and NCMI."""
    meter = CMIMeter(num_classes, temperature).update(logits, labels)
    cmi = meter.compute()
    pred = logits.argmax(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels.cpu(), pred.cpu()), torch.ones_like(labels.cpu()), accumulate=True)
    counts = confusion.sum(1)
    per_class = (confusion.diag().double() / counts.clamp_min(1)).tolist()
    nll = torch.nn.functional.cross_entropy(logits.double() / temperature, labels).item()
    return {
        "n": len(labels),
        "accuracy": (pred == labels).double().mean().item(),
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
        "nll": nll,
        "cmi": cmi["cmi"].item(),
        "per_class_cmi": cmi["per_class_cmi"].tolist(),
        "separation": cmi["separation"].item(),
        "ncmi": cmi["ncmi"].item(),
    }


def evaluate(model: nn.Module, data: ImageData, temperature: float = 1.0, batch_size: int | None = None) -> dict:
    """`metrics_from_logits` on `predict`'s logits: a JSON-ready dict."""
    check_float("temperature", temperature, 0.0, low_open=True)
    logits, labels = predict(model, data, batch_size)
    return metrics_from_logits(logits, labels, data.num_classes, temperature)


def teacher_omitted_mass(model: nn.Module, data: ImageData, omitted, temperature: float = 4.0) -> float:
    """:func:`mcmi_lab.metrics.cmi.omitted_mass` of `model` on `data` (one `predict` pass) at the KD temperature: the mean
    probability of the `omitted` classes on the other classes' images, what a zero-shot student learns them from."""
    logits, labels = predict(model, data)
    return omitted_mass(logits, labels, omitted, temperature)
