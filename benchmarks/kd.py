"""Training-step cost of every KD method relative to plain (Hinton) KD.

For every teacher → student pair, in one process and interleaved: one epoch of ``fit`` per method of
``mcmi_lab.kd.KD_METHODS`` with the literature defaults (``build_objective``), the same student initialisation,
data, batch size and precision. A method that cannot connect the pair is listed with its reason.
method/kd = t(method) / t(kd): above 1 the method's features, connectors and loss cost that much more per step.
Run: ``python -m benchmarks.kd [--pairs cnn_small:cnn_tiny@fashion-mnist ...] [--device cuda]``.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from mcmi_lab.data.core import ImageData, batches
from mcmi_lab.training.loop import fit
from mcmi_lab.training.objectives import StopTraining

from . import common

#: epoch size of the small CNNs (see common.case_samples), --quick size, interleaved repetitions
DEFAULTS = dict(samples=512, quick_samples=128, reps=3)

PAIRS = ("cnn_small:cnn_tiny@fashion-mnist", "resnet56:resnet20@random32")
QUICK_PAIRS = ("cnn_tiny:cnn_tiny@fashion-mnist",)
QUICK_METHODS = ("kd", "at", "dkd")


def parse_pair(text: str) -> tuple[common.Case, common.Case]:
    models, _, data = text.partition("@")
    teacher, _, student = models.partition(":")
    if not student:
        raise argparse.ArgumentTypeError(f"pair {text!r} is not accepted: expected TEACHER:STUDENT[@DATA]")
    data = data or "fashion-mnist"
    return common.parse_case(f"{teacher}@{data}"), common.parse_case(f"{student}@{data}")


def calibrate_batchnorm(model: nn.Module, data: ImageData) -> nn.Module:
    """Give a random teacher the BatchNorm statistics of `data` (one pass, cumulative averages), then eval mode.
    Fresh statistics (mean 0, variance 1) make eval-mode BN the identity, and a deep random ResNet's activations
    then grow until CC and FSP overflow; a trained teacher has statistics like these."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for images, _ in batches(data, 256):
            model(images.contiguous(memory_format=torch.channels_last))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def measure_pair(teacher_case: common.Case, student_case: common.Case, args, device: torch.device) -> dict:
    from mcmi_lab.kd import KD_METHODS, build_objective

    n = common.case_samples(teacher_case, args.samples, args.batch_size, device)
    data = common.make_data(student_case.data, n).to(device)
    teacher = calibrate_batchnorm(common.make_model(teacher_case, data, device, seed=1), data)
    # a tiny learning rate: the same work per step, and no method diverges on random data with a random teacher
    kwargs = dict(epochs=1, batch_size=args.batch_size, lr=1e-4, device=str(device), log=False, progress="off")
    fns, failed = {}, {}
    for method in args.methods or (QUICK_METHODS if args.quick else KD_METHODS):
        student = common.make_model(student_case, data, device)
        try:
            objective = build_objective(method, teacher)
            fit(student, data, objective, **kwargs)  # builds the connectors; also the warm-up
        except (ValueError, RuntimeError, StopTraining) as err:
            failed[method] = str(err).splitlines()[0][:100]
            continue
        fns[method] = (lambda s=student, o=objective: fit(s, data, o, **kwargs))
    times = common.interleave(fns, args.reps, device, warmup=0)
    steps = n // args.batch_size
    rows = {m: {"ms/step": 1e3 * common.median(t) / steps,
                "/kd": common.ratio(times, m, "kd") if "kd" in times else None} for m, t in times.items()}
    return {"pair": f"{teacher_case.model}→{student_case.model}@{student_case.data}", "n": n, "rows": rows,
            "failed": failed}


def run(args, device: torch.device) -> dict:
    print(common.header("KD step cost per method", device, args), flush=True)
    ratios = {}
    pairs = args.pairs or [parse_pair(p) for p in (QUICK_PAIRS if args.quick else PAIRS)]
    for teacher_case, student_case in pairs:
        r = measure_pair(teacher_case, student_case, args, device)
        print(f"  {r['pair']} (n={r['n']}):")
        print(common.table(["method", "ms/step", "method/kd"],
                           [[m, v["ms/step"], v["/kd"]] for m, v in r["rows"].items()]))
        for method, why in r["failed"].items():
            print(f"  {method}: not run ({why})")
        if not ratios:
            ratios = {f"{m}/kd": v["/kd"] for m, v in r["rows"].items() if m != "kd"}
    print(common.ratio_line(ratios), flush=True)
    return ratios


def add_options(p) -> None:
    p.add_argument("--pairs", nargs="+", type=parse_pair, default=None, metavar="TEACHER:STUDENT@DATA",
                   help=f"default: {' '.join(PAIRS)} (--quick: {' '.join(QUICK_PAIRS)})")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method of mcmi_lab.kd.KD_METHODS")


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
