"""Which centroid update keeps an MCMI fine-tune stable: `python -m benchmarks.centroids`.

Not a speed benchmark: the study behind the default ``update="running"`` (README, "The science, and the defaults we
chose"). Per seed: an MLL cnn_small teacher on Fashion-MNIST, then the λ = 0 control and one MCMI fine-tune per
update (``UPDATE`` or ``UPDATE:REFRESH_STEPS``) from that teacher, each with the collapse guard on. Prints one row
per fine-tune (train/test accuracy, train CMI, seconds, or the epoch where the guard stopped it) and, with
``--json``, writes them after every run.

The two regimes of the README:
  demo size (71 steps per epoch):  python -m benchmarks.centroids --train-size 5000 --teacher-epochs 40 \\
                                       --finetune-epochs 8 --seeds 0 1
  full data (844 steps per epoch): python -m benchmarks.centroids --teacher-epochs 10 --finetune-epochs 2 \\
                                       --updates epoch running:1000 running:100 running:25 ema
  (running:1000 refreshes only at the end of each epoch there.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mcmi_lab.study.recipes import load_run_data, model_metrics
from mcmi_lab.study.recipes import finetune_mcmi, train_teacher
from mcmi_lab.metrics.stats import derive_seeds
from mcmi_lab.training.objectives import StopTraining, UPDATES
from mcmi_lab.utils import write_json

from .common import table


def parse_update(text: str) -> tuple[str, int | None]:
    update, _, steps = text.partition(":")
    if update not in UPDATES or (steps and (not steps.isdigit() or int(steps) < 1 or update != "running")):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected one of {', '.join(UPDATES)}, or "
                                         "running:N with N >= 1 steps between refreshes")
    return update, int(steps) if steps else None


def run(a: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    kw = dict(batch_size=a.batch_size, augment=False, device=a.device, progress="off", log=False)
    for seed in a.seeds:
        s = derive_seeds(seed)
        train, _, test = load_run_data("fashion-mnist", a.train_size, a.test_size, 0.1, s["teacher"])
        teacher, _ = train_teacher(train, "cnn_small", a.teacher_epochs, seed=s["teacher"], lr=0.05, **kw)
        runs = [("teacher", None, None, None)] + [("control", 0.0, "running", None)]
        runs += [(f"{u}" + (f":{r}" if r else ""), a.lam, u, r) for u, r in a.updates]
        for name, lam, update, refresh in runs:
            t0 = time.perf_counter()
            row = {"seed": seed, "run": name, "lam": lam, "steps_per_epoch": -(-len(train) // a.batch_size)}
            try:
                model = teacher if lam is None else finetune_mcmi(
                    teacher, train, lam, a.finetune_epochs, update=update, refresh_steps=refresh, seed=s["finetune"],
                    lr=a.lr, **kw)[0]
                m = model_metrics(model, train, test)
                row.update(train_acc=m["train_acc"], test_acc=m["test_acc"], train_cmi=m["train_cmi"])
            except StopTraining as err:
                row.update(stopped=str(err).split(". ")[0])
            row["s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"seed {seed} {name:12s} " + ("stopped: " + row["stopped"] if "stopped" in row else
                  f"train acc {row['train_acc']:.4f} test acc {row['test_acc']:.4f} train CMI {row['train_cmi']:.4f}")
                  + f" ({row['s']} s)", flush=True)
            if a.json:
                write_json(a.json, {"args": {k: v for k, v in vars(a).items() if k != "json"}, "rows": rows})
    print(table(["seed", "run", "train acc", "test acc", "train CMI", "s"],
                [[r["seed"], r["run"], r.get("train_acc", "stopped"), r.get("test_acc", "-"), r.get("train_cmi", "-"),
                  r["s"]] for r in rows]))
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", nargs="+", type=parse_update, default=[parse_update(u) for u in (
        "running", "epoch", "ema", "frozen")], help="UPDATE or running:REFRESH_STEPS (default: each update once)")
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-size", type=int, default=None, help="training subset before the 10%% validation split "
                                                                "(default: all 60,000)")
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate (cosine)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here after every run")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return run(a)


if __name__ == "__main__":
    main(sys.argv[1:])
