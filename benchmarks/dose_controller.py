"""How well finetune_mcmi(target_cmi=c) lands its dose on a demo-sized teacher (not a speed benchmark: the README's
controller numbers come from here).

    python -m benchmarks.dose_controller [--targets 0.05 0.1 0.2 0.3] [--epochs 8] [--lr 0.05]

Trains the MLL teacher as 01_teachers does in the demo (cnn_small, 5,000 Fashion-MNIST images less 10% validation,
40 epochs, no augmentation), then one dose-targeted fine-tune per target; prints the CMI reached, its relative
error, train accuracy, the epoch selected and λ per epoch. About 2 min for the teacher and 40 s per target here.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

from mcmi_lab import derive_seeds, finetune_mcmi, load_run_data, measure_cmi, train_teacher


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--teacher-epochs", type=int, default=40)
    a = p.parse_args(argv)
    seeds = derive_seeds(0)
    train, _, _ = load_run_data("fashion-mnist", a.train_size, seed=seeds["teacher"])
    teacher, _ = train_teacher(train, "cnn_small", a.teacher_epochs, seed=seeds["teacher"], augment=False, progress="off", log=False)
    start = measure_cmi(teacher, train)
    print(f"MLL teacher: train CMI {float(start['cmi']):.4f}, train accuracy {start['accuracy']:.3f}", flush=True)
    rows = []
    for target in a.targets:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, hist = finetune_mcmi(teacher, train, target_cmi=target, epochs=a.epochs, lr=a.lr,
                                        schedule=a.schedule, seed=seeds["finetune"], augment=False, progress="off",
                                        log=False)
        reached = measure_cmi(model, train)
        row = {"target": target, "reached": round(float(reached["cmi"]), 4),
               "relative_error": round(float(reached["cmi"]) / target - 1, 3),
               "train_acc": round(reached["accuracy"], 3), "selected_epoch": hist[-1]["selected_epoch"],
               "lam": [round(r["lam"], 3) for r in hist], "train_cmi": [round(r["train_cmi"], 3) for r in hist],
               "seconds": round(time.perf_counter() - t0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    within = sum(abs(r["relative_error"]) <= 0.25 for r in rows)
    print(f"within ±25%: {within}/{len(rows)}")
    return rows


if __name__ == "__main__":
    main()
