"""The full Fashion-MNIST study in one process, timed (for a GPU): `python -m benchmarks.study --seeds 0 1 2`.

Per seed: an MLL teacher, the λ = 0 control and the MCMI fine-tune (λ = 0.5, running centroids), a
label-smoothing teacher; KD students from each; few-shot (5%, 10%) and zero-shot (class 3; classes 0, 3, 6) students
from the control and the MCMI teacher — the same library calls the notebooks make, without papermill. The students of
one data view train as one stack (recipes.train_students); `--sequential` trains them one at a time. Prints the
teacher's training throughput (images/s), each step's time, and the total wall time; `--json` writes them.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mcmi_lab import few_shot, omit_classes
from mcmi_lab.evaluate import evaluate
from mcmi_lab.recipes import load_run_data, train_student, train_students
from mcmi_lab.recipes import finetune_control, finetune_mcmi, train_teacher
from mcmi_lab.stats import derive_seeds
from mcmi_lab.train import COMPILE_MODES
from mcmi_lab.utils import get_device


def run_seed(seed: int, a: argparse.Namespace, log: dict) -> None:
    s = derive_seeds(seed)
    train, _, test = load_run_data("fashion-mnist", a.train_size, None, 0.1, seed)
    common = dict(device=a.device, batch_size=a.batch_size, progress="off", log=False, compile=a.compile or False)

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        if a.device and a.device.startswith("cuda"):
            torch.cuda.synchronize()
        log["steps"].append({"seed": seed, "step": name, "s": round(time.perf_counter() - t0, 2)})
        print(f"seed {seed}  {name:28s} {log['steps'][-1]['s']:7.1f} s", flush=True)
        if a.json:  # after every step, so a run cut short still reports what it did
            with open(a.json, "w") as f:
                json.dump(log, f, indent=1)
        return out

    teacher, hist = step("teacher (MLL)", lambda: train_teacher(train, "cnn_small", a.teacher_epochs, seed=s["teacher"],
                                                                 **common))
    log["teacher_epoch_s"] = [round(r["time"], 2) for r in hist]
    log["teacher_images_per_s"].append(round(len(train) * a.teacher_epochs / sum(r["time"] for r in hist)))
    teachers = {"mll": teacher}
    teachers["label_smoothing"] = step("teacher (label smoothing)", lambda: train_teacher(
        train, "cnn_small", a.teacher_epochs, seed=s["teacher"], label_smoothing=0.1, **common)[0])
    teachers["control"] = step("fine-tune λ=0", lambda: finetune_control(
        teacher, train, a.finetune_epochs, seed=s["finetune"], lr=0.01, **common)[0])
    teachers["mcmi"] = step("fine-tune MCMI λ=0.5", lambda: finetune_mcmi(
        teacher, train, 0.5, a.finetune_epochs, seed=s["finetune"], lr=0.01, **common)[0])
    for name, t in teachers.items():
        log["teacher_acc"].setdefault(name, []).append(evaluate(t, test)["accuracy"])
    # students: one stack per data view (recipes.train_students fuses same-architecture students and their teachers;
    # --sequential trains them one at a time, the reference it matches to rounding)
    students = (lambda ts, data: [train_student(t, data, "kd", "cnn_tiny", a.student_epochs, seed=s["student"],
                                                **common)[0] for t in ts]) if a.sequential else \
        (lambda ts, data: [m for m, _ in train_students(ts, data, "kd", "cnn_tiny", a.student_epochs,
                                                        seed=s["student"], **common)])
    kd = step(f"KD students from {len(teachers)} teachers", lambda: students(list(teachers.values()), train))
    for name, student in zip(teachers, kd):
        log["student_acc"].setdefault(name, []).append(evaluate(student, test)["accuracy"])
    pair = [teachers["control"], teachers["mcmi"]]
    for frac in (0.05, 0.1):
        step(f"few-shot {frac:g}, control + mcmi", lambda: students(pair, few_shot(train, frac, s["student"])))
    for omit in ([3], [0, 3, 6]):
        step(f"zero-shot {omit}, control + mcmi", lambda: students(pair, omit_classes(train, omit)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--train-size", type=int, default=None, help="default: all 60,000 images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--compile", choices=COMPILE_MODES, default=None, help="torch.compile every training run's "
                   "forward in this mode (TrainConfig.compile; default off)")
    p.add_argument("--sequential", action="store_true", help="train the students one at a time (default: as stacks)")
    p.add_argument("--json", default=None, help="write the timings here")
    a = p.parse_args(argv)
    a.device = str(get_device(a.device))
    log = {"device": a.device, "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
           "torch": torch.__version__, "args": vars(a), "steps": [], "teacher_images_per_s": [], "teacher_acc": {},
           "student_acc": {}}
    t0 = time.perf_counter()
    for seed in a.seeds:
        run_seed(seed, a, log)
        log["wall_s"] = round(time.perf_counter() - t0, 1)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(log, f, indent=1)
    print(f"study: {len(a.seeds)} seed(s) in {log['wall_s']:.0f} s on {log['gpu'] or a.device}; "
          f"teacher training {log['teacher_images_per_s']} images/s", flush=True)
    return log


if __name__ == "__main__":
    main()
