"""The training loop against its compute limit and against the loop people usually write.

For every case, in one process and interleaved:

* fit      — one epoch of ``mcmi_lab.training.loop.fit`` (MLL objective, batch augmentation, precision "auto", channels-last);
* limit    — the same number of bare forward + backward + SGD steps of the same model on one resident random batch
             of the same shape, same precision and memory format: what the hardware allows;
* usual    — RepDistiller's loop: a torchvision dataset with per-sample transforms RandomCrop(padding) +
             RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with workers, ``loss.item()`` per step
             (persistent workers, so that the short benchmark epochs do not charge it a worker start each);
             in fp32 as people run it, and with the same bf16 autocast + channels-last as fit (where fit uses
             them), so the table shows how much of the gain is precision and how much the input pipeline.

Ratios are throughputs: loop/limit = t(limit) / t(fit) (target ≥ 0.9), loop/usual = t(usual fp32) / t(fit)
(target ≥ 3 on a CPU). Run: ``python -m benchmarks.loop [--cases cnn_small@fashion-mnist ...] [--device cuda]``;
``--profile`` adds, per case, where the limit's step spends its time (torch.profiler, self time by kind of op);
``--compile`` adds fit with ``compile=True`` (``TrainConfig.compile``; ``--compile-mode``, e.g. "reduce-overhead"
for CUDA graphs), its first epoch (which compiles) reported apart: whether compiling pays on the device.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mcmi_lab.data.core import ImageData
from mcmi_lab.data.registry import fashion_mnist_root
from mcmi_lab.training.loop import COMPILE_MODES, fit
from mcmi_lab.training.runtime import autocast_dtype

from . import common

#: epoch size of the small CNNs (see common.case_samples), --quick size, interleaved repetitions
DEFAULTS = dict(samples=2048, quick_samples=256, reps=5)


# ---- the usual loop -------------------------------------------------------------------------------------------

class ArrayDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR10 ``__getitem__``: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, targets: list[int], transform):
        self.data, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def usual_dataset(data: ImageData):
    """The torchvision dataset people would build for `data`, with RepDistiller's training transforms."""
    import torchvision.transforms as T

    h, w = data.image_size
    transform = T.Compose([T.RandomCrop((h, w), padding=data.pad), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.mean, data.std)])
    if data.name == "fashion-mnist":
        from torchvision.datasets import FashionMNIST

        full = FashionMNIST(str(fashion_mnist_root()), train=True, transform=transform)
        return torch.utils.data.Subset(full, range(len(data)))  # common.make_data takes the first n samples
    return ArrayDataset(data.images.permute(0, 2, 3, 1).numpy(), data.labels.tolist(), transform)


def usual_epoch(model: nn.Module, loader, optimizer, device: torch.device, amp: torch.dtype | None,
                memory_format) -> None:
    """One epoch of RepDistiller's ``train_vanilla``: per-step .item() for the running loss and accuracy."""
    model.train()
    loss_sum = acc_sum = 0.0
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        loss_sum += loss.item() * len(labels)
        acc_sum += (logits.argmax(1) == labels).float().sum().item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ---- the compute limit ----------------------------------------------------------------------------------------

def limit_steps(model: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor, steps: int,
                amp: torch.dtype | None) -> None:
    """`steps` bare training steps on one resident batch."""
    model.train()
    for _ in range(steps):
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


#: kinds of op in the profile of a step: (label, substrings of the op name), the first match wins
OP_KINDS = (("convolution", ("conv",)), ("batch norm", ("batch_norm",)), ("relu", ("threshold", "relu", "clamp_min")),
            ("pooling", ("pool",)), ("linear", ("addmm", "aten::mm", "linear")), ("optimizer", ("optimizer", "_foreach")))


def profile_step(model: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor,
                 amp: torch.dtype | None, steps: int = 30) -> tuple[dict[str, float], float]:
    """Share of the self time per kind of op (:data:`OP_KINDS`, the rest "other") and the ms per step."""
    from torch.profiler import ProfilerActivity, profile

    limit_steps(model, optimizer, images, labels, 5, amp)  # warm-up
    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        limit_steps(model, optimizer, images, labels, steps, amp)
        if cuda:
            torch.cuda.synchronize()
    kinds = {label: 0.0 for label, _ in OP_KINDS} | {"other": 0.0}
    for event in prof.key_averages():
        t = event.self_device_time_total if cuda else event.self_cpu_time_total
        name = event.key.lower()
        kind = next((label for label, keys in OP_KINDS if any(k in name for k in keys)), "other")
        kinds[kind] += t
    total = sum(kinds.values()) or 1.0
    return {k: v / total for k, v in kinds.items()}, total / steps / 1e3


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


# ---- one case -------------------------------------------------------------------------------------------------

def measure_case(case: common.Case, args, device: torch.device) -> dict:
    n = common.case_samples(case, args.samples, args.batch_size, device)
    data = common.make_data(case.data, n)
    b = args.batch_size
    amp = autocast_dtype("auto", device)
    cl = torch.channels_last

    fit_model = common.make_model(case, data, device)
    fit_data = data.to(device)
    fit_kwargs = dict(epochs=1, batch_size=b, device=str(device), log=False, progress="off", check_every=50)

    limit_model = common.make_model(case, data, device)
    limit_opt = _sgd(limit_model)
    g = torch.Generator().manual_seed(0)
    limit_x = torch.randn((b, data.in_channels, *data.image_size), generator=g).to(device).contiguous(memory_format=cl)
    limit_y = torch.randint(0, data.num_classes, (b,), generator=g).to(device)

    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(usual_dataset(data), batch_size=b, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    usual32 = common.make_model(case, data, device, memory_format=torch.contiguous_format)
    usual32_opt = _sgd(usual32)

    fns = {
        "fit": lambda: fit(fit_model, fit_data, **fit_kwargs),
        "limit": lambda: limit_steps(limit_model, limit_opt, limit_x, limit_y, n // b, amp),
        "usual fp32": lambda: usual_epoch(usual32, loader, usual32_opt, device, None, torch.contiguous_format),
    }
    if amp is not None:
        usual16 = common.make_model(case, data, device)
        usual16_opt = _sgd(usual16)
        fns["usual bf16"] = lambda: usual_epoch(usual16, loader, usual16_opt, device, amp, cl)
    compile_s = None
    if getattr(args, "compile", False):
        compiled_model = common.make_model(case, data, device)
        compiled_kwargs = dict(fit_kwargs, compile=args.compile_mode or True)
        t0 = time.perf_counter()
        fit(compiled_model, fit_data, **compiled_kwargs)  # the first epoch compiles forward and backward
        common.sync(device)
        compile_s = time.perf_counter() - t0
        fns["fit compiled"] = lambda: fit(compiled_model, fit_data, **compiled_kwargs)
    times = common.interleave(fns, args.reps, device)
    out = {"case": case.label, "n": n, "workers": workers,
           "img/s": {k: n / common.median(v) for k, v in times.items()},
           "loop/limit": common.ratio(times, "limit", "fit"),
           "loop/usual": common.ratio(times, "usual fp32", "fit")}
    if amp is not None:
        out["loop/usual bf16"] = common.ratio(times, "usual bf16", "fit")
    if compile_s is not None:
        out.update(compile_s=compile_s, compiled_fit=common.ratio(times, "fit", "fit compiled"))
    if getattr(args, "profile", False):
        out["profile"] = profile_step(limit_model, limit_opt, limit_x, limit_y, amp)
    return out


def report(results: list[dict], headline: dict) -> list[str]:
    names = ["fit", "limit", "usual fp32", "usual bf16"]
    rows = [[r["case"], r["n"]] + [r["img/s"].get(k) for k in names]
            + [r["loop/limit"], r["loop/usual"], r.get("loop/usual bf16")] for r in results]
    return [common.table(["case", "n", *(f"{k} img/s" for k in names), "fit/limit", "fit/usual", "fit/usual bf16"],
                         rows),
            f"(usual loop: DataLoader with {results[0]['workers']} workers; limit: same precision and memory format)",
            common.ratio_line(headline)]


def run(args, device: torch.device) -> dict:
    """Measure every case; print the table; return the headline ratios (the first case)."""
    print(common.header("training loop vs compute limit vs usual loop", device, args), flush=True)
    results = []
    for case in args.cases:
        results.append(measure_case(case, args, device))
        print(f"  {case.label}: loop/limit={results[-1]['loop/limit']:.2f} "
              f"loop/usual={results[-1]['loop/usual']:.2f}", flush=True)
    headline = {"loop/limit": results[0]["loop/limit"], "loop/usual": results[0]["loop/usual"]}
    for r in results:
        if "compile_s" in r:
            print(f"  torch.compile, {r['case']}: fit compiled / fit = {r['compiled_fit']:.2f}x throughput; first "
                  f"epoch (compiling) {r['compile_s']:.1f} s (mode {args.compile_mode or 'default'})", flush=True)
        if "profile" in r:
            shares, ms = r["profile"]
            print(f"  profile of the limit step, {r['case']}: {ms:.1f} ms per step; "
                  + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()), flush=True)
    print("\n".join(report(results, headline)), flush=True)
    return headline


def add_options(p) -> None:
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the usual loop "
                   "(default min(8, cores); RepDistiller uses 8)")
    p.add_argument("--profile", action="store_true", help="also profile the limit step: time per kind of op")
    p.add_argument("--compile", action="store_true", help="also time fit with compile=True (torch.compile)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode")


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
