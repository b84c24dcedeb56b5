"""Epoch time of an MCMI fine-tune against an MLL epoch.

For every case, in one process and interleaved, one epoch of ``fit`` each (same model, data, batch size,
precision "auto"):

* mll          — cross-entropy;
* mcmi frozen  — CE − λ·KL(P_x ‖ Q_y) with centroids from one pass before the first epoch (the reference);
* mcmi epoch   — the same with the centroids recomputed by a full pass over the training set at the start of
                 every epoch, the pass included in the epoch time;
* mcmi running — per-epoch centroids from the epoch's own training outputs (no pass after the first);
* pass         — that centroid pass alone (``MCMIObjective.on_epoch_start``), to show where the time goes, and
                 the same pass at the training precision (``measure_cmi(..., precision="auto")``).

mcmi/mll = t(mcmi U) / t(mll) for each update U (target ≤ 1.05); the line of ratios starts with the library's
default update. Run: ``python -m benchmarks.mcmi [--cases ...] [--device cuda]``.
"""
from __future__ import annotations

import inspect
import sys

import torch

from mcmi_lab.training.evaluate import measure_cmi
from mcmi_lab.training.loop import fit
from mcmi_lab.training.objectives import mcmi_objective, mll_objective

from . import common

#: epoch size of the small CNNs (see common.case_samples), --quick size, interleaved repetitions
DEFAULTS = dict(samples=2048, quick_samples=256, reps=5)

LAM = 0.2
#: the library's default centroid update, the headline ratio
DEFAULT_UPDATE = inspect.signature(mcmi_objective).parameters["update"].default


def measure_case(case: common.Case, args, device: torch.device) -> dict:
    n = common.case_samples(case, args.samples, args.batch_size, device)
    data = common.make_data(case.data, n).to(device)
    kwargs = dict(epochs=1, batch_size=args.batch_size, lr=0.01, device=str(device), log=False, progress="off")
    runs = {"mll": mll_objective(),
            "mcmi frozen": mcmi_objective(LAM, update="frozen", guard=False),
            "mcmi epoch": mcmi_objective(LAM, update="epoch", guard=False),
            "mcmi running": mcmi_objective(LAM, update="running", guard=False)}
    models = {name: common.make_model(case, data, device) for name in runs}
    pass_model = common.make_model(case, data, device)
    pass_objective = mcmi_objective(LAM, update="epoch", guard=False).to(device)

    def one_epoch(name):
        return lambda: fit(models[name], data, runs[name], **kwargs)

    fns = {name: one_epoch(name) for name in runs}
    fns["pass"] = lambda: pass_objective.on_epoch_start(pass_model, data, 0)
    # the same pass at the training precision (what the pass would cost if fit ran it under its autocast)
    fns["pass auto"] = lambda: measure_cmi(pass_model, data, precision="auto")
    times = common.interleave(fns, args.reps, device)  # the warm-up round computes the frozen centroids
    return {"case": case.label, "n": n, "s": {k: common.median(v) for k, v in times.items()},
            "epoch/mll": common.ratio(times, "mcmi epoch", "mll"),
            "frozen/mll": common.ratio(times, "mcmi frozen", "mll"),
            "running/mll": common.ratio(times, "mcmi running", "mll"),
            "pass/mll": common.ratio(times, "pass", "mll"), "pass auto/mll": common.ratio(times, "pass auto", "mll")}


def run(args, device: torch.device) -> dict:
    print(common.header("MCMI fine-tune epoch vs MLL epoch", device, args) + f" | lambda {LAM}", flush=True)
    results = []
    for case in args.cases:
        results.append(measure_case(case, args, device))
        r = results[-1]
        print(f"  {case.label}: mcmi(epoch)/mll={r['epoch/mll']:.2f} mcmi(running)/mll={r['running/mll']:.2f} "
              f"mcmi(frozen)/mll={r['frozen/mll']:.2f}", flush=True)
    rows = [[r["case"], r["n"], r["s"]["mll"], r["s"]["mcmi frozen"], r["s"]["mcmi running"], r["s"]["mcmi epoch"],
             r["s"]["pass"], r["frozen/mll"], r["running/mll"], r["epoch/mll"], r["pass/mll"], r["pass auto/mll"]]
            for r in results]
    print(common.table(["case", "n", "mll s", "frozen s", "running s", "epoch s", "pass s", "frozen/mll",
                        "running/mll", "epoch/mll", "pass/mll", f"pass {common.precision_name(device)}/mll"], rows))
    default = DEFAULT_UPDATE + "/mll"
    headline = {"mcmi/mll": results[0][default]}
    others = {f"mcmi({u})/mll": results[0][f"{u}/mll"] for u in ("epoch", "running", "frozen") if u != DEFAULT_UPDATE}
    print(common.ratio_line({**headline, **others}), flush=True)
    return headline


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
