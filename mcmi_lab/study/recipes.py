"""The paper's steps as one call each: the run data, an MLL teacher, its MCMI fine-tune, the fair controls
(λ = 0, label smoothing, temperature scaling), a student, and the metrics a teacher is judged by.

Every recipe is `fit` with a particular objective and config; nothing here trains in its own loop.
Model selection never looks at the test set: the teacher is the last epoch's weights.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..training import distributed as dist_utils
from ..training.checkpoint import save_checkpoint, save_model
from ..data.core import ImageData, stratified_split, subset
from ..data.registry import load_dataset
from ..training.evaluate import measure_cmi, metrics_from_logits, predict
from ..kd import build_objective, distill, method_hparams
from ..models import build_model
from ..models.wrappers import TemperatureScaled
from ..training.objectives import collapse_floor, mcmi_objective, mll_objective
from ..training.stack import stack_problem
from ..training.stack_fit import fit_stack
from ..metrics.stats import brier_score, expected_calibration_error
from ..training.teacher_objectives import build_teacher_objective
from ..training.loop import TrainConfig, fit
from ..utils import check_float, set_seed

#: A dose reached within this relative distance of its target counts as matched (±25%).
DOSE_TOLERANCE = 0.25


def matched(reached: float, target: float, tolerance: float = DOSE_TOLERANCE) -> bool:
    """True when `reached` lies within ±`tolerance` (relative) of `target`."""
    return abs(reached - target) <= tolerance * target


def _model(model: str | nn.Module, data: ImageData, seed: int, **model_kwargs) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    set_seed(seed)  # the initial weights are a function of the seed
    return build_model(model, data.num_classes, data.in_channels, **model_kwargs)


def _split_fit_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(fit's keywords: TrainConfig fields and callbacks, the rest: an objective's hyper-parameters)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {"callbacks"}
    return ({k: v for k, v in kwargs.items() if k in fields}, {k: v for k, v in kwargs.items() if k not in fields})


class _EpochKeeper:
    """A fit callback that saves the weights after each epoch of `epochs` (1-based) as ``<folder>/model_epoch<N>.pt``
    (:func:`mcmi_lab.training.checkpoint.save_model`, loadable by load_model; save_checkpoint for a model without a spec) and
    names the file in that epoch's history record ("kept"). Rank 0 writes."""

    def __init__(self, epochs: Sequence[int], folder: str | os.PathLike, total: int):
        if isinstance(epochs, (int, str)) or any(isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= total
                                                 for e in epochs):
            raise ValueError(f"keep_epochs={epochs!r} is not accepted: expected a list of epoch numbers in "
                             f"[1, {total}]")
        self.epochs, self.folder = set(epochs), Path(folder)

    def __call__(self, record: dict, model: nn.Module) -> None:
        if record["epoch"] not in self.epochs:
            return
        net = getattr(model, "module", model)
        path = self.folder / f"model_epoch{record['epoch']}.pt"
        if dist_utils.rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_model(path, net) if getattr(net, "spec", None) is not None else save_checkpoint(path, model=net)
        record["kept"] = str(path)


def train_teacher(data: ImageData, model: str | nn.Module = "cnn_small", epochs: int = 240, *,
                  objective: str = "mll", seed: int = 0, eval_data: ImageData | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False, model_kwargs: dict | None = None,
                  keep_epochs: Sequence[int] = (), keep_dir: str | os.PathLike | None = None,
                  **fit_kwargs_and_hparams) -> tuple[nn.Module, list[dict]]:
    """A teacher trained from scratch with `objective`, a name of
    :data:`mcmi_lab.training.teacher_objectives.TEACHER_OBJECTIVES` ("mll", "label_smoothing", "mse", "cmim", "ncmi", "mcmi").

    Keywords naming :class:`TrainConfig` fields (or ``callbacks``) go to fit; the others are the objective's
    hyper-parameters (``label_smoothing=0.1`` for mll, ``lam=0.5, temperatures=[1, 4]`` for cmim). Defaults: the
    reference schedule (SGD 0.05, ×0.1 at 5/8, 3/4, 7/8 of the epochs, wd 5e-4, batch 64).
    keep_epochs: early-stopped teachers of the same run (Cho & Hariharan, ICCV 2019, https://arxiv.org/abs/1910.01348):
    after each of these epochs (1-based) the weights are saved as ``model_epoch<N>.pt`` in `keep_dir` (default: the
    checkpoint's folder) and the record of that epoch names the file ("kept"). Returns (model, history).
    """
    fit_kwargs, hparams = _split_fit_kwargs(fit_kwargs_and_hparams)
    obj = build_teacher_objective(objective, **hparams)
    callbacks = list(fit_kwargs.pop("callbacks", ()))
    if keep_epochs:
        if keep_dir is None and checkpoint is None:
            raise ValueError(f"keep_epochs={list(keep_epochs)!r} needs keep_dir= or checkpoint=: the folder where the "
                             "early-stopped teachers are saved")
        callbacks.append(_EpochKeeper(keep_epochs, keep_dir if keep_dir is not None else Path(checkpoint).parent,
                                      epochs))
    net = _model(model, data, seed, **(model_kwargs or {}))
    smoothing = hparams.get("label_smoothing", 0.0)
    label = f"teacher {model if isinstance(model, str) else type(model).__name__}" + (
        "" if objective == "mll" else f" {objective}") + (f" ε={smoothing:g}" if smoothing else "")
    fit_kwargs.setdefault("name", label)  # prefixes its log lines and bar: which run is which
    hist = fit(net, data, obj, TrainConfig(epochs=epochs, seed=seed), eval_data=eval_data, checkpoint=checkpoint,
               resume=resume, callbacks=callbacks, **fit_kwargs)
    return net, hist


def finetune_teacher(teacher: nn.Module, data: ImageData, objective: str, epochs: int = 20, *, seed: int = 0,
                     lr: float = 0.05, schedule: str = "cosine", eval_data: ImageData | None = None,
                     checkpoint: str | os.PathLike | None = None, resume: bool = False,
                     **fit_kwargs_and_hparams) -> tuple[nn.Module, list[dict]]:
    """A copy of a trained teacher fine-tuned with any teacher objective (``"cmim"``, ``"ncmi"``, ``"mse"`` ...) on
    the MCMI fine-tune recipe (SGD 0.05 cosine, wd 5e-4, batch 64, `epochs`), so that every objective gets the
    same extra epochs. Keywords: TrainConfig fields go to fit, the others are the objective's hyper-parameters.
    Returns (fine-tuned copy, history); `teacher` is not modified. (The dose-targeted MCMI is finetune_mcmi.)"""
    fit_kwargs, hparams = _split_fit_kwargs(fit_kwargs_and_hparams)
    obj = build_teacher_objective(objective, **hparams)
    model = copy.deepcopy(teacher).requires_grad_(True)
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr, schedule=schedule,
                      name=fit_kwargs.pop("name", f"fine-tune {objective}"))
    hist = fit(model, data, obj, cfg, eval_data=eval_data, checkpoint=checkpoint, resume=resume, **fit_kwargs)
    return model, hist


def finetune_mcmi(teacher: nn.Module, data: ImageData, lam: float | None = None, epochs: int = 20, *,
                  target_cmi: float | None = None, update: str = "running", seed: int = 0, lr: float = 0.05,
                  schedule: str = "cosine", ema_decay: float = 0.999, guard: bool = True,
                  refresh_steps: int | None = None, centroid_pass: str = "eval", control: dict | None = None,
                  eval_data: ImageData | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False,
                  **fit_kwargs) -> tuple[nn.Module, list[dict]]:
    """The paper's step: fine-tune a copy of a trained MLL teacher with CE − λ·KL(P_x ‖ Q_y) (SGD 0.05 cosine,
    wd 5e-4, batch 64). `lam=0` is the fair control: the same extra epochs without the CMI term.

    target_cmi: instead of `lam` (give exactly one), the dose: λ is adapted during the fine-tune so that the train
    CMI reaches `target_cmi` nats and stays there (:class:`mcmi_lab.training.objectives.MCMIObjective`; `control` passes its
    options, e.g. ``{"control_gain": 0.5}``). λ, the train CMI and the eval-mode train accuracy per epoch are in
    the history ("lam", "train_cmi", "train_acc_eval"). An epoch whose eval-mode train accuracy is below half the
    starting teacher's (:func:`mcmi_lab.training.objectives.collapse_floor`) is never selected. The model returned is the
    last epoch's when its train CMI is within ±25% of the dose, else the last epoch that was (history[-1]
    ["selected_epoch"]; train data only), else the last epoch above the floor with a warning naming the CMI
    reached; when no epoch was above the floor, history[-1]["collapsed"] is True (a warning says so) and the model
    is the final one: not a teacher to distil.
    update, refresh_steps: the centroid update: "running" (default: class means of the training outputs, refreshed
    every `refresh_steps` steps and per epoch, no extra pass), "epoch" (a full pass per epoch), "frozen" (the
    reference code's step) or "ema". centroid_pass: "eval" (default) or "reference" (the reference code's pass:
    train mode over augmented batches; see MCMIObjective). Returns (fine-tuned copy, history); `teacher` is not
    modified.
    """
    if lam is not None:
        check_float("lam", lam, 0.0)
    model = copy.deepcopy(teacher).requires_grad_(True)  # a teacher that has taught a student comes back frozen
    objective = mcmi_objective(lam, update=update, ema_decay=ema_decay, guard=guard, refresh_steps=refresh_steps,
                               target_cmi=target_cmi, centroid_pass=centroid_pass, **(control or {}))
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr, schedule=schedule,
                      name=fit_kwargs.pop("name", f"mcmi CMI→{target_cmi:g}" if target_cmi is not None
                                          else "control λ=0" if lam == 0 else f"mcmi λ={lam:g}"))
    dosed = _DoseRecorder(target_cmi, data, objective) if target_cmi is not None else None
    callbacks = [*fit_kwargs.pop("callbacks", ()), *([dosed] if dosed else [])]
    hist = fit(model, data, objective, cfg, eval_data=eval_data, checkpoint=checkpoint, resume=resume,
               callbacks=callbacks, **fit_kwargs)
    if target_cmi is not None:
        _warn_unreached(dosed.select(model, hist), target_cmi, hist)
    return model, hist


def finetune_mcmi_doses(teacher: nn.Module, data: ImageData, targets: Sequence[float], epochs: int = 20, *,
                        update: str = "running", seed: int = 0, lr: float = 0.05, schedule: str = "cosine",
                        ema_decay: float = 0.999, guard: bool = True, refresh_steps: int | None = None,
                        centroid_pass: str = "eval", control: dict | None = None,
                        **fit_kwargs) -> list[tuple[nn.Module, list[dict]]]:
    """``finetune_mcmi(teacher, data, target_cmi=c, ...)`` for every dose c in `targets`, trained as one stack
    (:func:`mcmi_lab.training.stack_fit.fit_stack`: each member its own CMI target, controller, centroids and epoch
    selection) when the teacher's architecture stacks, else one at a time; the same models and histories either way
    (to rounding, tests/test_stack.py). A member the collapse guard stops stops the stack: StopTraining is raised
    and the caller can run the doses one at a time (as ``dose.dose_teachers`` does) to keep the others.
    Returns [(fine-tuned copy, history)] in the order of `targets`; `teacher` is not modified."""
    targets = check_doses(targets)
    _refuse_lam(fit_kwargs)
    kw = dict(update=update, seed=seed, lr=lr, schedule=schedule, ema_decay=ema_decay, guard=guard,
              refresh_steps=refresh_steps, centroid_pass=centroid_pass, control=control)
    models = [copy.deepcopy(teacher).requires_grad_(True) for _ in targets]
    if (len(targets) < 2 or {"checkpoint", "resume", "name"} & fit_kwargs.keys()
            or stack_problem(models) is not None):
        return [finetune_mcmi(teacher, data, target_cmi=c, epochs=epochs, **kw, **fit_kwargs) for c in targets]
    objectives = [mcmi_objective(None, update=update, ema_decay=ema_decay, guard=guard, refresh_steps=refresh_steps,
                                 target_cmi=c, centroid_pass=centroid_pass, **(control or {})) for c in targets]
    configs = [TrainConfig(epochs=epochs, seed=seed, lr=lr, schedule=schedule, name=f"mcmi CMI→{c:g}")
               for c in targets]
    recorders = {id(m): _DoseRecorder(c, data, o) for m, c, o in zip(models, targets, objectives)}
    eval_data, callbacks = fit_kwargs.pop("eval_data", None), list(fit_kwargs.pop("callbacks", ()))
    histories = fit_stack(models, data, objectives, configs, eval_data=eval_data,
                          callbacks=[*callbacks, lambda record, model: recorders[id(model)](record, model)],
                          **fit_kwargs)
    for model, hist, target in zip(models, histories, targets):
        _warn_unreached(recorders[id(model)].select(model, hist), target, hist)
    return list(zip(models, histories))


def check_doses(doses, name: str = "doses") -> list[float]:
    """A non-empty list of train-CMI doses (positive numbers); one ValueError line otherwise."""
    if not isinstance(doses, (list, tuple)) or not doses or any(
            isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0 for d in doses):
        raise ValueError(f"{name}={doses!r} is not accepted: expected a non-empty list of train-CMI doses in nats "
                         f"(positive numbers), e.g. [0.1, 0.3]")
    return [float(d) for d in doses]


def _refuse_lam(kwargs: dict) -> None:
    if "lam" in kwargs or "target_cmi" in kwargs:
        key = "lam" if "lam" in kwargs else "target_cmi"
        raise ValueError(f"{key}={kwargs[key]!r} is not accepted beside doses: each dose is a CMI target whose λ the "
                         "controller adapts; for a fixed λ call finetune_mcmi(teacher, data, lam=...)")


def _warn_unreached(reached: float, target: float, hist: list[dict]) -> None:
    if not matched(reached, target) and not hist[-1].get("collapsed"):
        warnings.warn(f"MCMI did not reach train CMI {target:g} within ±25%: it reached {reached:.4f} nats after "
                      f"{hist[-1]['epoch']} epochs (final λ {hist[-1]['lam']:.3g}); more epochs or a larger control_gain may "
                      "reach it", stacklevel=3)


class _DoseRecorder:
    """Per epoch of a dose-targeted fine-tune: the train CMI and the eval-mode train accuracy, from one pass (into
    the history as "train_cmi" and "train_acc_eval"), and copies of the weights of the last epoch that is eligible
    (eval-mode train accuracy at or above the collapse floor, :func:`mcmi_lab.training.objectives.collapse_floor` of the
    starting teacher's, which `objective` measured before its first step) and of the last eligible one within ±25%
    of the target. An epoch below the floor is never selected: `select` leaves in the model the final weights when
    they are eligible and within the dose, else the last eligible matched epoch's, else the last eligible epoch's,
    else (no epoch passed the floor: history[-1]["collapsed"] is True) the final ones. history[-1]
    ["selected_epoch"] says which. Train data only: no test-set selection. Epochs trained before a resume are not
    candidates."""

    def __init__(self, target: float, data: ImageData, objective):
        self.target, self.data, self.objective = target, data, objective
        self.kept = self.eligible = None  # (epoch, state) of the last eligible matched epoch / last eligible epoch

    def floor(self) -> float | None:
        start = float(getattr(self.objective, "start_acc", -1.0))
        return collapse_floor(start, self.data.num_classes) if start > 0 else None

    def __call__(self, record: dict, model: nn.Module) -> None:
        stats = measure_cmi(getattr(model, "module", model), self.data)
        record["train_cmi"], record["train_acc_eval"] = float(stats["cmi"]), float(stats["accuracy"])
        floor = self.floor()
        if floor is not None and record["train_acc_eval"] < floor:
            return  # a teacher that does not work in eval mode is never a dose
        state = (record["epoch"], {k: v.detach().clone() for k, v in model.state_dict().items()})
        self.eligible = state
        if matched(record["train_cmi"], self.target):
            self.kept = state

    def select(self, model: nn.Module, hist: list[dict]) -> float:
        last = hist[-1]
        if "train_cmi" not in last or "train_acc_eval" not in last:  # not recorded here: measure the final weights
            stats = measure_cmi(model, self.data)
            last["train_cmi"], last["train_acc_eval"] = float(stats["cmi"]), float(stats["accuracy"])
        floor = self.floor()
        last["collapse_floor"] = floor
        last["collapsed"] = False
        final_ok = floor is None or last["train_acc_eval"] >= floor
        choice = None if final_ok and matched(last["train_cmi"], self.target) else self.kept or (
            None if final_ok else self.eligible)
        last["selected_epoch"] = last["epoch"] if choice is None else choice[0]
        if choice is None and not final_ok:
            last["collapsed"] = True
            warnings.warn(f"MCMI at train CMI {self.target:g} collapsed: no epoch kept the eval-mode train accuracy "
                          f"at or above the floor {floor:.1%} (half the starting teacher's); the final epoch had "
                          f"{last['train_acc_eval']:.1%}", stacklevel=3)
            return last["train_cmi"]
        if choice is not None:
            model.load_state_dict(choice[1])
        return next(r["train_cmi"] for r in hist if r["epoch"] == last["selected_epoch"])


def finetune_control(teacher: nn.Module, data: ImageData, epochs: int = 20, **kwargs) -> tuple[nn.Module, list[dict]]:
    """The λ = 0 control: the MCMI fine-tune recipe with the CMI term switched off (same epochs, lr, schedule)."""
    return finetune_mcmi(teacher, data, 0.0, epochs, **kwargs)


def finetune_label_smoothing(teacher: nn.Module, data: ImageData, smoothing: float, epochs: int = 20, *,
                             seed: int = 0, lr: float = 0.05, schedule: str = "cosine",
                             eval_data: ImageData | None = None, checkpoint: str | os.PathLike | None = None,
                             resume: bool = False, **fit_kwargs) -> tuple[nn.Module, list[dict]]:
    """The label-smoothing control: the MCMI fine-tune recipe (same epochs, lr, schedule) with cross-entropy on
    labels smoothed by `smoothing` instead of the CMI term. Returns (fine-tuned copy, history)."""
    check_float("smoothing", smoothing, 0.0, 1.0, high_open=True)
    model = copy.deepcopy(teacher).requires_grad_(True)
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr, schedule=schedule,
                      name=fit_kwargs.pop("name", f"label smoothing ε={smoothing:g}"))
    hist = fit(model, data, mll_objective(smoothing), cfg, eval_data=eval_data, checkpoint=checkpoint, resume=resume,
               **fit_kwargs)
    return model, hist


def temperature_scale(model: nn.Module, val_data: ImageData, steps: int = 100) -> TemperatureScaled:
    """The temperature-scaled control teacher: T fitted by minimising NLL on held-out (validation, not test) data."""
    logits, labels = predict(model, val_data)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    return TemperatureScaled(copy.deepcopy(model), float(log_t.exp()))


def load_run_data(dataset: str = "fashion-mnist", train_size: int | None = None, test_size: int | None = None,
                  val_fraction: float = 0.1, seed: int = 0, root: str | None = None
                  ) -> tuple[ImageData, ImageData, ImageData]:
    """(train, val, test) of one run: `train_size` class-interleaved samples of the training split (seeded), less a
    stratified validation part of `val_fraction` that only temperature scaling reads; the first `test_size`
    samples of a seeded class-interleaved test subset. The same arguments give the same tensors in every notebook."""
    full = load_dataset(dataset, "train", root=root)
    pool = subset(full, train_size, seed=seed) if train_size is not None and train_size < len(full) else full
    train, val = stratified_split(pool, val_fraction, seed=seed)
    test = load_dataset(dataset, "test", root=root)
    if test_size is not None and test_size < len(test):
        test = subset(test, test_size, seed=0)  # one fixed test subset for every seed
    return train, val, test


def train_student(teacher: nn.Module | None, data: ImageData, method: str = "kd", model: str = "cnn_tiny",
                  epochs: int = 10, *, seed: int = 0, temperature: float = 4.0, lr: float = 0.05,
                  model_kwargs: dict | None = None, **fit_kwargs) -> tuple[nn.Module, list[dict]]:
    """A fresh `model` (initialised from `seed`) distilled from `teacher` with KD `method` (``kd.KD_METHODS``, their
    literature defaults at temperature T); ``teacher=None`` or ``method="ce"`` trains it on the labels alone (the
    no-teacher baseline). The recipe is the same for every teacher (DESIGN.md §2): SGD `lr`, step schedule,
    `epochs`, data order from `seed`. `fit_kwargs`: TrainConfig fields (batch_size, device, ...), fit's keywords
    (eval_data, checkpoint, resume) and the method's hyper-parameters (``beta=...``). Returns (student, history)."""
    set_seed(seed)
    student = build_model(model, data.num_classes, data.in_channels, **(model_kwargs or {}))
    method = "ce" if teacher is None else method
    teacher_name = "labels only" if teacher is None else type(getattr(teacher, "model", teacher)).__name__
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr,
                      name=fit_kwargs.pop("name", f"student {model} {method} ← {teacher_name}"))
    # "ce" reads no teacher and "ctkd" learns its temperature: only the methods that take one get `temperature`
    logit_kd = {"temperature": temperature} if "temperature" in method_hparams(method) else {}
    return student, distill(student, teacher, data, method, cfg, **logit_kd, **fit_kwargs)


def train_students(teachers: Sequence[nn.Module], data: ImageData, method: str = "kd", model: str = "cnn_tiny",
                   epochs: int = 10, *, seed: int = 0, temperature: float = 4.0, lr: float = 0.05,
                   model_kwargs: dict | None = None, names: Sequence[str] | None = None,
                   **fit_kwargs) -> list[tuple[nn.Module, list[dict]]]:
    """One student per teacher, each as :func:`train_student` trains it (same initialisation, data order and recipe):
    as one stack (:func:`mcmi_lab.training.stack_fit.fit_stack`, the students fused into one network, and their teachers too)
    when the method is "kd" and the student architecture stacks (:func:`mcmi_lab.training.stack.stack_problem`), else one at
    a time. A stacked student matches its one-at-a-time run to rounding (tests/test_stack.py). `names`: one per
    teacher, what each student's progress lines and TensorBoard run are called (default: by the teacher's class).
    Returns [(student, history)] in the order of `teachers`."""
    teachers = list(teachers)
    if names is not None and len(names) != len(teachers):
        raise ValueError(f"names of length {len(names)} are not accepted: expected one per teacher ({len(teachers)})")
    if names is None and "name" in fit_kwargs:
        names = [fit_kwargs.pop("name")] * len(teachers)
    students = [_model(model, data, seed, **(model_kwargs or {})) for _ in teachers]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if (method != "kd" or len(teachers) < 2 or any(t is None for t in teachers)
            or {"checkpoint", "resume"} & fit_kwargs.keys() or stack_problem(students) is not None):
        return [train_student(t, data, method, model, epochs, seed=seed, temperature=temperature, lr=lr,
                              model_kwargs=model_kwargs, **({} if names is None else {"name": names[i]}),
                              **fit_kwargs) for i, t in enumerate(teachers)]
    names = names or [f"student {model} kd ← {type(getattr(t, 'model', t)).__name__}" for t in teachers]
    eval_data, callbacks = fit_kwargs.pop("eval_data", None), fit_kwargs.pop("callbacks", ())
    overrides = {k: v for k, v in fit_kwargs.items() if k in fields}
    objectives = [build_objective("kd", t, temperature=temperature,
                                  **{k: v for k, v in fit_kwargs.items() if k not in fields}) for t in teachers]
    configs = [TrainConfig(epochs=epochs, seed=seed, lr=lr, name=n) for n in names]
    histories = fit_stack(students, data, objectives, configs, eval_data=eval_data, callbacks=callbacks, **overrides)
    return list(zip(students, histories))


def model_metrics(model: nn.Module, train: ImageData, test: ImageData) -> dict[str, Any]:
    """Accuracy, CMI, NCMI and the separation Γ on train and test, test NLL, top-label ECE and Brier score: a flat,
    JSON-ready dict (the study rows; ``mcmi_lab.study.report_card`` gives the full card of one model).

    Test-set values come from one `predict` pass; train-set values from one streaming `measure_cmi` pass.
    """
    on_train = measure_cmi(model, train)
    logits, labels = predict(model, test)
    on_test = metrics_from_logits(logits, labels, test.num_classes)
    probs = torch.softmax(logits.double(), 1)
    return {
        "train_acc": on_train["accuracy"], "train_cmi": float(on_train["cmi"]), "train_ncmi": float(on_train["ncmi"]),
        "train_separation": float(on_train["separation"]),
        "test_acc": on_test["accuracy"], "test_cmi": on_test["cmi"], "test_ncmi": on_test["ncmi"],
        "test_separation": on_test["separation"],
        "test_nll": on_test["nll"], "test_ece": expected_calibration_error(probs, labels),
        "test_brier": brier_score(probs, labels),
        "train_per_class_cmi": on_train["per_class_cmi"].tolist(),
    }
