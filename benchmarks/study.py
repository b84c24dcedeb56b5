"""The full Fashion-MNIST study in one process, timed (for a GPU): `python -m benchmarks.study --seeds 0 1 2`.

Per seed: an MLL teacher and a label-smoothing teacher (ε = 0.1) from scratch, the λ = 0 control and the MCMI
fine-tune (λ = 0.5, running centroids) of the MLL teacher; KD students from each; few-shot (5%, 10%) and zero-shot
(class 3; classes 0, 3, 6) students from the control and the MCMI teacher: 4 teachers and 12 students per seed, the
same library calls the notebooks make, without papermill.

By default every step trains all seeds' models of that step as one stack (:func:`mcmi_lab.training.stack_fit.fit_stack`:
each member its own data split, seed, objective and teacher; the same weights as one-at-a-time runs, to rounding,
tests/test_stack.py): the 2·S teachers, the 2·S fine-tunes, and per data view the students of every seed.
`--sequential` trains every model one at a time, seed after seed (the reference). Prints each step's time and the
total wall time; `--json` writes them, after every step.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from mcmi_lab import few_shot, omit_classes
from mcmi_lab.training.evaluate import evaluate
from mcmi_lab.kd import build_objective
from mcmi_lab.models import build_model
from mcmi_lab.training.objectives import StopTraining, mcmi_objective, mll_objective
from mcmi_lab.study.recipes import finetune_control, finetune_mcmi, load_run_data, train_student, train_teacher
from mcmi_lab.training.stack_fit import fit_stack
from mcmi_lab.metrics.stats import derive_seeds
from mcmi_lab.training.loop import COMPILE_MODES, TrainConfig
from mcmi_lab.utils import get_device, set_seed

TEACHERS = ("mll", "label_smoothing", "control", "mcmi")
#: the student data views: (step name, the teachers taught, the view of a seed's training split)
VIEWS = (("KD students", TEACHERS, lambda d, s: d),
         ("few-shot 0.05", ("control", "mcmi"), lambda d, s: few_shot(d, 0.05, s)),
         ("few-shot 0.1", ("control", "mcmi"), lambda d, s: few_shot(d, 0.1, s)),
         ("zero-shot [3]", ("control", "mcmi"), lambda d, s: omit_classes(d, [3])),
         ("zero-shot [0, 3, 6]", ("control", "mcmi"), lambda d, s: omit_classes(d, [0, 3, 6])))


class _Study:
    """The timings log, and one timed step at a time."""

    def __init__(self, a: argparse.Namespace, log: dict):
        self.a, self.log = a, log
        self.common = dict(device=a.device, batch_size=a.batch_size, precision=a.precision, progress="off", log=False,
                           compile=a.compile or False)

    def step(self, name: str, fn, seed: int | None = None):
        t0 = time.perf_counter()
        out = fn()
        if self.a.device.startswith("cuda"):
            torch.cuda.synchronize()
        label = "all seeds" if seed is None else f"seed {seed}"
        self.log["steps"].append({"seed": "all" if seed is None else seed, "step": name,
                                  "s": round(time.perf_counter() - t0, 2)})
        print(f"{label:9s}  {name:34s} {self.log['steps'][-1]['s']:7.1f} s", flush=True)
        self.write()
        return out

    def write(self) -> None:  # after every step, so a run cut short still reports what it did
        if self.a.json:
            with open(self.a.json, "w") as f:
                json.dump(self.log, f, indent=1)

    def score(self, kind: str, name: str, model, test) -> None:
        self.log[kind].setdefault(name, []).append(evaluate(model, test)["accuracy"])


def run_sequential(seed: int, study: _Study, train, test) -> dict:
    """One seed, every model one at a time (train_teacher, finetune_*, train_student). Returns the models by
    (seed, teacher) and (seed, view, teacher)."""
    a, common, s = study.a, study.common, derive_seeds(seed)
    teacher, hist = study.step("teacher (MLL)", lambda: train_teacher(
        train, "cnn_small", a.teacher_epochs, seed=s["teacher"], **common), seed)
    study.log["teacher_images_per_s"].append(round(len(train) * a.teacher_epochs / sum(r["time"] for r in hist)))
    teachers = {"mll": teacher}
    teachers["label_smoothing"] = study.step("teacher (label smoothing)", lambda: train_teacher(
        train, "cnn_small", a.teacher_epochs, seed=s["teacher"], label_smoothing=0.1, **common)[0], seed)
    teachers["control"] = study.step("fine-tune λ=0", lambda: finetune_control(
        teacher, train, a.finetune_epochs, seed=s["finetune"], lr=0.01, **common)[0], seed)
    teachers["mcmi"] = study.step("fine-tune MCMI λ=0.5", lambda: finetune_mcmi(
        teacher, train, 0.5, a.finetune_epochs, seed=s["finetune"], lr=0.01, **common)[0], seed)
    for name, t in teachers.items():
        study.score("teacher_acc", name, t, test)
    models = {(seed, name): t for name, t in teachers.items()}
    for view, names, make in VIEWS:
        data = make(train, s["student"])
        students = study.step(f"{view} ({len(names)})", lambda: [train_student(
            teachers[n], data, "kd", "cnn_tiny", a.student_epochs, seed=s["student"], **common)[0] for n in names], seed)
        models.update({(seed, view, n): m for n, m in zip(names, students)})
        if view == "KD students":
            for name, student in zip(names, students):
                study.score("student_acc", name, student, test)
    return models


def _fit_stack_or_each(study: _Study, models, datas, objectives, configs) -> list[str | None]:
    """fit_stack the models; if the collapse guard stops the stack, train each alone so the others are kept.
    Returns, per model, None or why it stopped."""
    try:
        fit_stack(models, datas, objectives, configs, **study.common)
        return [None] * len(models)
    except StopTraining:
        stopped = []
        for m, d, o, c in zip(models, datas, objectives, configs):
            try:
                fit_stack([m], [d], [o], [c], **study.common)
                stopped.append(None)
            except StopTraining as e:
                stopped.append(str(e))
        return stopped


def _fresh(model: str, data, seed: int):
    """A new `model` for `data`, its weights a function of `seed` (as train_teacher and train_students make them)."""
    set_seed(seed)
    return build_model(model, data.num_classes, data.in_channels)


def run_stacked(seeds: list[int], study: _Study, splits: dict) -> dict:
    """All seeds, each step's models as one stack (the same models as run_sequential's, to rounding). Returns the
    models as run_sequential does."""
    a = study.a
    ds = {seed: derive_seeds(seed) for seed in seeds}
    cells = [(seed, name) for seed in seeds for name in ("mll", "label_smoothing")]
    teachers = {(seed, name): _fresh("cnn_small", splits[seed][0], ds[seed]["teacher"]) for seed, name in cells}
    configs = [TrainConfig(epochs=a.teacher_epochs, seed=ds[seed]["teacher"], name=f"teacher {name} seed {seed}")
               for seed, name in cells]
    study.step(f"teachers (MLL, label smoothing) ×{len(seeds)}", lambda: fit_stack(
        list(teachers.values()), [splits[seed][0] for seed, _ in cells],
        [mll_objective(0.1 if name == "label_smoothing" else 0.0) for _, name in cells], configs, **study.common))

    cells = [(seed, name) for seed in seeds for name in ("control", "mcmi")]
    for cell in cells:
        teachers[cell] = copy.deepcopy(teachers[(cell[0], "mll")])
    configs = [TrainConfig(epochs=a.finetune_epochs, seed=ds[seed]["finetune"], lr=0.01, schedule="cosine",
                           name=f"{name} seed {seed}") for seed, name in cells]
    stopped = study.step(f"fine-tunes (λ=0, MCMI λ=0.5) ×{len(seeds)}", lambda: _fit_stack_or_each(
        study, [teachers[c] for c in cells], [splits[seed][0] for seed, _ in cells],
        [mcmi_objective(0.5 if name == "mcmi" else 0.0) for _, name in cells], configs))
    study.log["stopped"] = {f"{name} seed {seed}": why for (seed, name), why in zip(cells, stopped) if why}
    for seed in seeds:
        for name in TEACHERS:
            study.score("teacher_acc", name, teachers[(seed, name)], splits[seed][2])
    models = {cell: teachers[cell] for cell in sorted(teachers)}

    for view, names, make in VIEWS:
        cells = [(seed, name) for seed in seeds for name in names]
        datas = {seed: make(splits[seed][0], ds[seed]["student"]) for seed in seeds}
        students = [_fresh("cnn_tiny", datas[seed], ds[seed]["student"]) for seed, _ in cells]
        configs = [TrainConfig(epochs=a.student_epochs, seed=ds[seed]["student"], lr=0.05,
                               name=f"student ← {name} seed {seed}") for seed, name in cells]
        study.step(f"{view} ({len(names)}) ×{len(seeds)}", lambda: fit_stack(
            students, [datas[seed] for seed, _ in cells],
            [build_objective("kd", teachers[c], temperature=4.0) for c in cells], configs, **study.common))
        models.update({(seed, view, name): m for (seed, name), m in zip(cells, students)})
        if view == "KD students":
            for (seed, name), s in zip(cells, students):
                study.score("student_acc", name, s, splits[seed][2])
    return models


def main(argv=None) -> dict:
    """Run the study (argv as the command line); return the timings log."""
    return run(argv)[0]


def run(argv=None) -> tuple[dict, dict]:
    """Run the study (argv as the command line); return (the timings log, the models by (seed, teacher) and
    (seed, view, teacher))."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--train-size", type=int, default=None, help="default: all 60,000 images")
    p.add_argument("--test-size", type=int, default=None, help="default: all 10,000 test images")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="TrainConfig.precision (default auto: bf16 autocast where the device has it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--compile", choices=COMPILE_MODES, default=None, help="torch.compile every training run's "
                   "forward in this mode (TrainConfig.compile; default off)")
    p.add_argument("--sequential", action="store_true",
                   help="train every model one at a time, seed after seed (default: each step as one stack)")
    p.add_argument("--json", default=None, help="write the timings here")
    a = p.parse_args(argv)
    a.device = str(get_device(a.device))
    log = {"device": a.device, "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
           "torch": torch.__version__, "args": vars(a), "mode": "sequential" if a.sequential else "stacked",
           "steps": [], "teacher_images_per_s": [], "teacher_acc": {}, "student_acc": {}}
    study = _Study(a, log)
    t0 = time.perf_counter()
    splits = {seed: load_run_data("fashion-mnist", a.train_size, a.test_size, 0.1, seed) for seed in a.seeds}
    log["train_images"] = len(splits[a.seeds[0]][0])
    if a.sequential:
        models = {}
        for seed in a.seeds:
            models.update(run_sequential(seed, study, splits[seed][0], splits[seed][2]))
    else:
        models = run_stacked(a.seeds, study, splits)
    log["wall_s"] = round(time.perf_counter() - t0, 1)
    study.write()
    print(f"study ({log['mode']}): {len(a.seeds)} seed(s) in {log['wall_s']:.0f} s on {log['gpu'] or a.device}, "
          f"{log['train_images']} training images", flush=True)
    return log, models


if __name__ == "__main__":
    main()
