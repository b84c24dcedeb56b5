"""Shared pieces of the benchmarks: cases, data, interleaved timing, peak memory, tables, command-line options.

Every ratio is measured in one process: the baseline and the candidate run in turn (ABAB…, the order reversed
every other repetition so that a drift in machine load does not favour either), and the ratio reported is the
median of the per-repetition ratios. These machines are shared and noisy; never assert a wall-clock time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mcmi_lab.data.core import ImageData
from mcmi_lab.data.registry import load_dataset
from mcmi_lab.models import build_model
from mcmi_lab.training.runtime import autocast_dtype
from mcmi_lab.utils import get_device

#: Data sets a case can use: real Fashion-MNIST (28x28x1) or random CIFAR-shaped images (32x32x3).
DATA = ("fashion-mnist", "random32")


@dataclass(frozen=True)
class Case:
    """One model on one kind of data, written ``model@data`` on the command line."""

    model: str
    data: str

    @property
    def label(self) -> str:
        return f"{self.model}@{self.data}"


#: The default cases: the demo CNNs on Fashion-MNIST, the CRD ResNets on CIFAR-shaped data.
CASES = (Case("cnn_small", "fashion-mnist"), Case("cnn_tiny", "fashion-mnist"),
         Case("resnet20", "random32"), Case("resnet56", "random32"))
QUICK_CASES = (Case("cnn_tiny", "fashion-mnist"),)


def parse_case(text: str) -> Case:
    model, _, data = text.partition("@")
    data = data or "fashion-mnist"
    if data not in DATA:
        raise argparse.ArgumentTypeError(f"data {data!r} is not known: expected one of {', '.join(DATA)}")
    return Case(model, data)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: mcmi_lab.utils.get_device)")
    p.add_argument("--cases", nargs="+", type=parse_case, default=None, metavar="MODEL@DATA",
                   help=f"default: {' '.join(c.label for c in CASES)}; data is one of {', '.join(DATA)}")
    p.add_argument("--samples", type=int, default=None,
                   help="epoch size for the small CNNs (the ResNets get fewer on a CPU; default per benchmark)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default per benchmark)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64, the reference)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a tiny run for the smoke test (numbers meaningless)")
    return p


def setup(args: argparse.Namespace, samples: int, quick_samples: int, reps: int) -> tuple[argparse.Namespace,
                                                                                          torch.device]:
    """A copy of `args` with the defaults of one benchmark filled in (they depend on --quick); set the threads;
    return it and the device."""
    args = argparse.Namespace(**vars(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cases = args.cases or list(QUICK_CASES if args.quick else CASES)
    args.samples = args.samples or (quick_samples if args.quick else samples)
    args.reps = args.reps or (2 if args.quick else reps)
    return args, get_device(args.device)


def case_samples(case: Case, samples: int, batch_size: int, device: torch.device) -> int:
    """Epoch size for a case: the ResNets are 5-20x slower per image than the small CNNs on a CPU, so they get
    fewer samples there (still whole batches, at least 4 of them)."""
    scale = {"resnet20": 4, "resnet56": 12}.get(case.model, 1) if device.type == "cpu" else 1
    return max(4 * batch_size, samples // scale // batch_size * batch_size)


# ---- data and models ------------------------------------------------------------------------------------------

_FASHION: dict[str, ImageData] = {}


def make_data(name: str, n: int, seed: int = 0) -> ImageData:
    """`n` training samples (CPU): the first `n` of Fashion-MNIST's training set (so that the usual loop can take the
    same ones from torchvision's dataset), or random uint8 32x32x3 images with the CIFAR augmentation (pad 4, flip)
    and 10 classes."""
    if name == "fashion-mnist":
        if "train" not in _FASHION:
            _FASHION["train"] = load_dataset("fashion-mnist", "train")
        full = _FASHION["train"]
        return full.take(torch.arange(n)) if n < len(full) else full
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return ImageData(images, labels, tuple(str(i) for i in range(10)), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     name="random32", pad=4, flip=True)


def make_model(case: Case, data: ImageData, device: torch.device, seed: int = 0,
               memory_format=torch.channels_last) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(case.model, data.num_classes, data.in_channels)
    return model.to(device=device, memory_format=memory_format)


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What precision "auto" resolves to on `device`: "bf16" or "fp32"."""
    return "bf16" if autocast_dtype(precision, device) is not None else "fp32"


# ---- timing ---------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(module, argv=None) -> dict:
    """A benchmark module's command line: the common options and the module's own (`add_options`), then its `run`
    at its `DEFAULTS`; returns the headline ratios."""
    p = parser(module.__doc__.splitlines()[0])
    if hasattr(module, "add_options"):
        module.add_options(p)
    args, device = setup(p.parse_args(argv), **module.DEFAULTS)
    return module.run(args, device)


def interleave(fns: dict[str, Callable[[], object]], reps: int, device: torch.device,
               warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns; `warmup` untimed rounds first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over repetitions of time[slow] / time[fast] (pairs from the same repetition)."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def median(values) -> float:
    return statistics.median(values)


# ---- peak memory ----------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory allocated by torch above the starting level, for the code run inside
    ``with PeakMemory(device) as peak:``, in MiB (``peak.mib``). CUDA: torch.cuda.max_memory_allocated. CPU: the
    allocations and frees that torch.profiler records (profile_memory=True), replayed in time order; torch's CPU
    allocator is invisible to tracemalloc, and the process's peak RSS mixes in what glibc keeps cached."""

    def __init__(self, device: torch.device):
        self.device, self.mib, self._prof = device, None, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():
                self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
            return
        with _quiet_stderr():
            self._prof.__exit__(*exc)
            events = self._prof.events()
        # an op's own net allocation (self_cpu_memory_usage) at its start; frees are "[memory]" events
        deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events
                        if e.self_cpu_memory_usage and e.device_type.name == "CPU")
        level = peak = 0
        for _, delta in deltas:
            level += delta
            peak = max(peak, level)
        self.mib = peak / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (file descriptor 2) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- output ---------------------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table; floats with 3 significant digits (ratios with 2 decimals)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if v is None:
        return "n/a"
    return str(v)


def ratio_line(ratios: dict[str, float | None]) -> str:
    """``ratios: a/b=0.93 c/d=3.4`` (n/a for a ratio that was not measured)."""
    return "ratios: " + " ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in ratios.items())


def header(title: str, device: torch.device, args: argparse.Namespace) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    return (f"== {title} | device {device} ({precision_name(device)} autocast auto) | torch {torch.__version__} | "
            f"threads {threads} | batch {args.batch_size} | reps {args.reps} (median of interleaved pairs)")
