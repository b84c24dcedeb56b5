"""Many small models at once: one epoch of N models trained as a stack (fit_stack) against N fit runs in turn.

For every case and every N in ``--members`` (default 4 and 8), in one process and interleaved:

* sequential — N calls of ``mcmi_lab.training.loop.fit``, one epoch each, seeds 0..N-1 (what a study does one at a time);
* stack      — one ``mcmi_lab.training.stack_fit.fit_stack`` of the same N models, seeds and data: one epoch.

Both with the same objective (``--objective``: "mll" by default; "kd" distils every member from its own copy of a
cnn_small teacher, the study's students, whose teachers the stack fuses too), precision ("auto"), batch size and
channels-last. stack/sequential = t(sequential) / t(stack), a throughput ratio (target ≥ 2 for cnn_tiny × 8 on a
CPU, ≥ 5 on a GPU). Architectures that cannot be stacked (the ResNets) are listed with the reason.

Also the host work, which bounds a GPU step of these small models: the aten operations dispatched per training
step (a TorchDispatchMode count over one epoch of 4 steps: two epochs less one), N steps of `fit` against one of the
stack; their quotient is the ratio a step bound by host work alone would give. It is exact and immune to load.
Run: ``python -m benchmarks.stack [--cases cnn_tiny@fashion-mnist ...] [--members 4 8] [--device cuda]``.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcmi_lab.training.objectives import kd_objective, mll_objective
from mcmi_lab.training.stack import stack_problem
from mcmi_lab.training.stack_fit import fit_stack
from mcmi_lab.training.loop import TrainConfig, fit

from . import common

#: epoch size per member (see common.case_samples), --quick size, interleaved repetitions
DEFAULTS = dict(samples=2048, quick_samples=128, reps=3)
CASES = (common.Case("cnn_tiny", "fashion-mnist"), common.Case("cnn_small", "fashion-mnist"))


def add_options(p) -> None:
    p.add_argument("--members", nargs="+", type=int, default=None, help="stack sizes N (default: 4 8; --quick: 2)")
    p.add_argument("--objective", choices=("mll", "kd"), default="mll",
                   help="mll (default) or kd: every member distilled from its own cnn_small teacher")


def _objectives(kind: str, teachers: list) -> list:
    return [mll_objective() if kind == "mll" else kd_objective(t) for t in teachers]


class _OpCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(train, steps: int) -> float:
    """Operations of one training step: train(epochs) counted at 2 epochs less at 1, over `steps` steps."""
    counts = []
    for epochs in (1, 2):
        with _OpCount() as c:
            train(epochs)
        counts.append(c.n)
    return (counts[1] - counts[0]) / steps


def host_ops(case: common.Case, n: int, args, device: torch.device) -> tuple[float, float]:
    """(aten ops per step of one model in fit, of the stack of N) at 4 steps of the benchmark's batch size."""
    data = common.make_data(case.data, 4 * args.batch_size)
    models = [common.make_model(case, data, device, seed=i) for i in range(n)]
    teachers = [common.make_model(common.Case("cnn_small", case.data), data, device, seed=100 + i) for i in range(n)]
    config = dict(batch_size=args.batch_size, device=str(device), log=False, progress="off")
    single = ops_per_step(lambda e: fit(copy.deepcopy(models[0]), data, _objectives(args.objective, teachers)[0],
                                        TrainConfig(epochs=e, **config)), 4)
    stacked = ops_per_step(lambda e: fit_stack([copy.deepcopy(m) for m in models], data,
                                               _objectives(args.objective, teachers), TrainConfig(epochs=e, **config),
                                               seeds=list(range(n))), 4)
    return single, stacked


def measure(case: common.Case, n: int, args, device: torch.device) -> dict:
    """Seconds per epoch of sequential and stacked training of N models of `case`; their ratio."""
    samples = common.case_samples(case, args.samples, args.batch_size, device)
    data = common.make_data(case.data, samples)
    models = [common.make_model(case, data, device, seed=i) for i in range(n)]
    problem = stack_problem(models)
    if problem:
        return {"case": case.label, "n": n, "why": problem}
    teacher_case = common.Case("cnn_small", case.data)
    teachers = [common.make_model(teacher_case, data, device, seed=100 + i) for i in range(n)]
    config = TrainConfig(epochs=1, batch_size=args.batch_size, device=str(device), log=False, progress="off")
    singles = [copy.deepcopy(m) for m in models]

    def sequential():
        for i, (model, objective) in enumerate(zip(singles, _objectives(args.objective, teachers))):
            fit(model, data, objective, config, seed=i)

    def stacked():
        fit_stack(models, data, _objectives(args.objective, teachers), config, seeds=list(range(n)))

    times = common.interleave({"sequential": sequential, "stack": stacked}, args.reps, device)
    images = n * samples
    single_ops, stack_ops = host_ops(case, n, args, device)
    return {"case": case.label, "n": n, "why": None, "images": images, "ops_fit": single_ops, "ops_stack": stack_ops,
            "sequential_s": common.median(times["sequential"]), "stack_s": common.median(times["stack"]),
            "ratio": common.ratio(times, "sequential", "stack")}


def run(args, device: torch.device) -> dict:
    """Measure every case and N; print the table; return the ratios (headline: the first case at the largest N)."""
    # the benchmarks' default cases: the two small CNNs, and resnet20 to show the refusal (it is not stackable)
    cases = list(CASES) + [common.Case("resnet20", "random32")] if args.cases == list(common.CASES) else args.cases
    members = args.members or ([2] if args.quick else [4, 8])
    print(common.header(f"stack of N models vs N fit runs ({args.objective}, one epoch)", device, args), flush=True)
    results = []
    for case in cases:
        for n in members:
            results.append(measure(case, n, args, device))
            r = results[-1]
            print(f"  {case.label} × {n}: " + (f"stack/sequential={r['ratio']:.2f}" if not r["why"]
                                                else f"not stacked: {r['why']}"), flush=True)
    rows = [[r["case"], r["n"], r.get("images"), r.get("sequential_s"), r.get("stack_s"),
             r["images"] / r["sequential_s"] if not r["why"] else None,
             r["images"] / r["stack_s"] if not r["why"] else None, r.get("ratio"), r.get("ops_fit"),
             r.get("ops_stack"), r["n"] * r["ops_fit"] / r["ops_stack"] if not r["why"] else None] for r in results]
    print(common.table(["case", "N", "images", "sequential s", "stack s", "seq img/s", "stack img/s",
                        "stack/sequential", "ops/step fit", "ops/step stack", "N·ops fit/ops stack"], rows))
    measured = [r for r in results if not r["why"]]
    headline = max(measured, key=lambda r: (r["case"] == cases[0].label, r["n"]), default=None)
    ratios = {"stack/sequential": headline["ratio"] if headline else None}
    ratios.update({f"{r['case'].partition('@')[0]}_x{r['n']}": r["ratio"] for r in measured})
    print(common.ratio_line(ratios), flush=True)
    return ratios


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
