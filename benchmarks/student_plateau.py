"""Where the demo's KD students stop learning (issue 34, item 2), and the eval-mode accuracy of dose fine-tunes.

The demo's data and recipe (pipeline ``demo``: Fashion-MNIST, 2,500 training images less 10% validation, 5,000 test
images, cnn_small teacher 40 epochs, 8-epoch dose fine-tunes at lr 0.05, cnn_tiny students with augmentation, KD
T = 4), run seed 0. One MLL teacher, its λ = 0 control and its MCMI teacher at train CMI 0.3 (the demo's highest
dose); then cnn_tiny KD students of both teachers (one stack per length) for each of `--epochs`, on the full data,
on 25% of it with as many steps (few-shot, ``few_shot_schedule="steps"``) and on the data without class 3
(zero-shot: accuracy on class 3). A length E has plateaued when E and 3E differ by less than 0.5 points.
Per epoch of the fine-tunes, the eval-mode train accuracy (the collapse floor's signal) is printed too.

    PYTHONPATH=$PWD python -m benchmarks.student_plateau --epochs 5 10 15 30

Single-threaded (as each kernel of ``mcmi-lab run``); prints one line per result and the seconds each part took.
"""
from __future__ import annotations

import argparse
import time

import torch

from mcmi_lab import derive_seeds, evaluate, few_shot, load_run_data, measure_cmi, omit_classes
from mcmi_lab.study.recipes import finetune_control, finetune_mcmi, train_students, train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 15, 30])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dose", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = derive_seeds(args.seed)
    train, _, test = load_run_data("fashion-mnist", 2500, 5000, 0.1, seeds["teacher"])
    t0 = time.time()
    # the demo's teachers train without augmentation (parameter augment=False: they converge, DESIGN.md §2)
    mll, _ = train_teacher(train, "cnn_small", 40, seed=seeds["teacher"], lr=0.05, augment=False, progress="off",
                           log=False)
    start = measure_cmi(mll, train)
    print(f"teacher: 40 epochs {time.time() - t0:.0f} s; eval-mode train acc {start['accuracy']:.4f} "
          f"CMI {float(start['cmi']):.4f}; test acc {evaluate(mll, test)['accuracy']:.4f}", flush=True)

    def eval_acc(record, model):  # the eval-mode train accuracy of each epoch (a full pass, as the recorder's)
        record["eval_train_acc"] = measure_cmi(getattr(model, "module", model), train)["accuracy"]

    t0 = time.time()
    fine = dict(seed=seeds["finetune"], lr=0.05, schedule="cosine", augment=False, progress="off", log=False,
                callbacks=[eval_acc])
    control, _ = finetune_control(mll, train, 8, **fine)
    mcmi, hist = finetune_mcmi(mll, train, target_cmi=args.dose, epochs=8, **fine)
    print(f"fine-tunes: {time.time() - t0:.0f} s; MCMI {args.dose:g} per epoch (train CMI, eval-mode train acc, "
          "train-mode running acc): " + ", ".join(f"{r['train_cmi']:.3f}/{r['eval_train_acc']:.3f}/{r['train_acc']:.3f}"
                                                for r in hist), flush=True)
    teachers = {"control": control, f"mcmi {args.dose:g}": mcmi}
    for name, t in teachers.items():
        print(f"{name}: test acc {evaluate(t, test)['accuracy']:.4f}", flush=True)
    kinds = {"kd": train, "few-shot 0.25 (steps)": few_shot(train, 0.25, seeds["student"]),
             "zero-shot (omit 3)": omit_classes(train, [3])}
    for epochs in args.epochs:
        for kind, data in kinds.items():
            t0 = time.time()
            e = epochs * 4 if kind.startswith("few") else epochs
            students = train_students(list(teachers.values()), data, "kd", "cnn_tiny", e, seed=seeds["student"],
                                      temperature=4.0, lr=0.05, augment=True, progress="off", log=False)
            accs = []
            for (student, _), name in zip(students, teachers):
                result = evaluate(student, test)
                accs.append(f"{name} {result['per_class_accuracy'][3] if kind.startswith('zero') else result['accuracy']:.4f}")
            print(f"E={epochs:>3} {kind:<22} {time.time() - t0:5.0f} s  " + "  ".join(accs), flush=True)


if __name__ == "__main__":
    main()
