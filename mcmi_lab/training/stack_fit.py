"""``fit_stack``: N models of one architecture trained as one :class:`~mcmi_lab.training.stack.ModelStack`, each as ``fit``
would train it alone: its own data order and augmentation (its seed), objective and hyper-parameters.

One step: every member draws its own batch (the batch ``batches`` would give it with its seed; for all members at
once by ``data.stacked_batches``: one gather, augmentation and normalisation), the fused network computes all the
logits in one forward, each member's objective turns its logits into its loss (it sees a stand-in for its model that
returns them, and the member itself as ``.module`` for its own passes; all-MLL and all-KD stacks compute the
members' losses as batched ops instead, :class:`_StackedLosses`), one backward of the sum gives each member exactly
its own gradient (the members share no parameter), and one SGD with a parameter group per member (its lr, momentum,
weight decay; multi-tensor ops) steps them. KD teachers of one stackable architecture are fused too (one forward for
all). So a step's host work, which bounds small models on a GPU, hardly grows with N (``python -m benchmarks.stack``
counts it).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import load_checkpoint, load_state, save_checkpoint
from ..data.core import ImageData, batches, stacked_batches, stacked_batches_problem
from .evaluate import measure_cmi
from .objectives import KDObjective, MCMIObjective, MLLObjective, Objective, mll_objective
from .runtime import autocast_dtype, check_model_input
from .stack import STACKABLE, ModelStack, stack_problem, teacher_parts
from .tracking import TensorBoardLogger
from .loop import (TrainConfig, _check_finite, _check_same_run, _load_objective, _progress, _remove_stale_temp_files,
                   _rng_state, data_fingerprint, format_record)
from ..utils import get_device

#: Objectives that read their model only through one call on the step's batch (feature KD hooks into layers).
STACK_OBJECTIVES = (MLLObjective, MCMIObjective, KDObjective)
#: TrainConfig fields every member of a stack shares (the others may differ from model to model).
SHARED = ("epochs", "batch_size", "device", "precision", "channels_last", "check_every", "progress", "log",
          "compile", "sync_bn")


class _Logits:
    """An objective's model during a stacked step: returns the member's logits of the step's batch (computed by the
    stack); `.module` is the member itself, for the objective's own passes (the dose controller's probe)."""

    def __init__(self, module: nn.Module, images: torch.Tensor, logits: torch.Tensor, what: str = "model"):
        self.module, self.images, self.logits, self.what, self.calls = module, images, logits, what, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images is not self.images or self.calls:
            raise RuntimeError(f"an objective called its {self.what} on other inputs than its batch, or twice: "
                               f"fit_stack accepts objectives that read it once per step ({_names()})")
        self.calls += 1
        return self.logits


def _names() -> str:
    return ", ".join(t.__name__ for t in STACK_OBJECTIVES)


def _per_model(name: str, value, n: int, kind: type) -> list:
    """One value for all models or one per model, as a list of n."""
    if isinstance(value, kind):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{len(value)} {name} for {n} models are not accepted: give one for all or one per model")
    for v in value:
        if not isinstance(v, kind):
            raise ValueError(f"{name} item of type {type(v).__name__} is not accepted: expected {kind.__name__}")
    return value


def _check_inputs(models: list, datas: list, objectives: list, configs: list) -> None:
    problem = stack_problem(models)
    if problem:
        raise ValueError(problem)
    for field in SHARED:
        values = {repr(getattr(c, field)) for c in configs}
        if len(values) > 1:
            raise ValueError(f"{field} differing between the models ({', '.join(sorted(values))}) is not accepted: a "
                             f"stack shares {', '.join(SHARED)}; the other settings may differ")
    shapes = {(len(d), tuple(d.images.shape[1:]), d.num_classes) for d in datas}
    if len(shapes) > 1:
        raise ValueError(f"data of different sizes, image shapes or classes ({sorted(shapes)}) is not accepted: the "
                         "members of a stack take their steps together; stack models with data of one size")
    for o in objectives:
        if type(o) not in STACK_OBJECTIVES:
            raise ValueError(f"objective {type(o).__name__} is not accepted by fit_stack: expected {_names()}; "
                             "train it with fit")
    if len({id(o) for o in objectives}) < len(objectives):
        raise ValueError("one objective object for several models is not accepted: each model needs its own "
                         "(it holds state: centroids, λ)")
    if any(c.nesterov and c.momentum <= 0 for c in configs):
        raise ValueError("nesterov=True with momentum 0 is not accepted: Nesterov needs a momentum > 0")
    if dist_utils.world_size() > 1:
        raise ValueError("fit_stack under torchrun is not accepted: run it in one process (a stack is one device)")


def fit_stack(models: Sequence[nn.Module], data: ImageData | Sequence[ImageData],
              objectives: Sequence[Objective] | None = None,
              config: TrainConfig | Sequence[TrainConfig] | None = None, *, seeds: Sequence[int] | None = None,
              eval_data: ImageData | Sequence[ImageData] | None = None,
              callbacks: Iterable[Callable[[dict, nn.Module], None]] = (),
              checkpoint: str | os.PathLike | None = None, resume: bool = False, **overrides) -> list[list[dict]]:
    """Train N models in place as N separate ``fit(model_i, data_i, objective_i, config_i)`` runs would, as one
    fused network; return their N histories (records as fit's; "time" is the stack's epoch).

    models: N models of one architecture (:func:`mcmi_lab.training.stack.stack_problem`); data, config, eval_data: one for all
    or one per model (data of one size, image shape and classes); objectives: None (MLL for all) or one object per
    model, of :data:`STACK_OBJECTIVES`; seeds: each model's TrainConfig.seed; overrides: fields set in every config.
    The members share the :data:`SHARED` config fields. checkpoint: one file for the stack, written atomically after
    every epoch; ``resume=True`` continues it exactly. callbacks: ``cb(record, model)`` per model and epoch;
    a config's ``tensorboard`` folder logs its model's records as fit does (one run per name).
    """
    # ---- set-up: per-model inputs, checks, device -------------------------------------------------------------
    models = list(models) if isinstance(models, (list, tuple)) else models
    problem = stack_problem(models)
    if problem:
        raise ValueError(problem)
    n = len(models)
    datas = _per_model("data sets", data, n, ImageData)
    objectives = [mll_objective() for _ in range(n)] if objectives is None else _per_model(
        "objectives", objectives, n, Objective)
    configs = _per_model("configs", config or TrainConfig(), n, TrainConfig)
    if seeds is not None:
        seeds = _per_model("seeds", seeds, n, int)
        configs = [dataclasses.replace(c, seed=s) for c, s in zip(configs, seeds)]
    configs = [dataclasses.replace(c, **overrides).validate() for c in configs]
    evals = [None] * n if eval_data is None else _per_model("eval data sets", eval_data, n, ImageData)
    callbacks = list(callbacks)  # called for every model and epoch: an iterator would run dry
    _check_inputs(models, datas, objectives, configs)
    cfg = configs[0]
    device = get_device(cfg.device)
    fmt = torch.channels_last if cfg.channels_last and device.type != "mps" else torch.contiguous_format
    for model, d, objective in zip(models, datas, objectives):
        check_model_input(model, d)
        model.to(device=device, memory_format=fmt)
        objective.to(device)
    datas = [d.to(device) for d in datas]
    evals = [e.to(device) if e is not None else None for e in evals]
    for model, d, objective in zip(models, datas, objectives):
        objective.prepare(model, d)
    optimizer = torch.optim.SGD([{"params": list(m.parameters()), "lr": c.lr, "momentum": c.momentum,
                                  "weight_decay": c.weight_decay, "nesterov": c.nesterov}
                                 for m, c in zip(models, configs)], lr=cfg.lr,
                                foreach=True)  # a few multi-tensor ops per member, not a few per parameter

    # ---- resume (into the plain models, before they are tied to the stack) -----------------------------------
    prints = [data_fingerprint(d) for d in datas] if checkpoint is not None else None
    histories, start = [[] for _ in range(n)], 0
    if resume and checkpoint is not None:
        histories, start = _resume(checkpoint, models, optimizer, objectives, configs, prints, device)

    # ---- the stack, the fused teachers, the steps --------------------------------------------------------------
    trackers = [TensorBoardLogger(c.tensorboard, c.name) if c.tensorboard else None for c in configs]
    stack = ModelStack(models)
    teachers = _teacher_stack(objectives)
    network = stack.fused if not cfg.compile else torch.compile(  # the training forward, as fit compiles it
        stack.fused, mode=None if cfg.compile is True else cfg.compile)
    amp = autocast_dtype(cfg.precision, device)
    autocast = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    size = len(datas[0])
    drop_last = size % cfg.batch_size == 1  # BatchNorm cannot train on a batch of one
    steps = size // cfg.batch_size + (0 if drop_last or size % cfg.batch_size == 0 else 1)
    for p in stack.fused.parameters():  # persistent gradients: the members' are views of them
        p.grad = torch.zeros_like(p)
    for i, model in enumerate(models):
        for name, p in model.named_parameters():
            p.grad = stack.fused.get_parameter(name).grad.unflatten(0, (n, -1))[i]
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            for group, c in zip(optimizer.param_groups, configs):
                group["lr"] = c.lr_at(epoch)
            with autocast():
                for model, d, objective in zip(models, datas, objectives):
                    objective.on_epoch_start(model, d, epoch)
            stack.pull_statistics()  # a hook may have run a member in train mode (the reference centroid pass)
            stack.train()
            for model, objective in zip(models, objectives):
                model.train()
                objective.train()
            iters = _epoch_batches(datas, configs, epoch, drop_last)
            bar = _progress(cfg, steps, f"stack of {n} epoch {epoch + 1}/{cfg.epochs}")
            means = _train_epoch(stack, network, teachers, objectives, optimizer, iters, autocast, cfg, epoch, bar)
            if bar is not None:
                bar.close()
            for model, d, objective in zip(models, datas, objectives):
                objective.on_epoch_end(model, d, epoch)

            # ---- records, callbacks, checkpoint ---------------------------------------------------------------
            elapsed = time.perf_counter() - t0
            for i, (model, c) in enumerate(zip(models, configs)):
                record = {"epoch": epoch + 1, "lr": c.lr_at(epoch)}
                record.update({("train_acc" if k == "acc" else k): v for k, v in means[i].items()})
                if evals[i] is not None and ((epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs):
                    metrics = measure_cmi(model, evals[i])
                    record.update(eval_acc=metrics["accuracy"], eval_cmi=float(metrics["cmi"]))
                record["time"] = elapsed
                histories[i].append(record)
                if c.log:
                    print(format_record(record, c.epochs, c.name), flush=True)
                for callback in [*callbacks, *([trackers[i]] if trackers[i] else [])]:
                    callback(record, model)
            if checkpoint is not None:
                save_checkpoint(checkpoint, models=[{k: v.clone() for k, v in m.state_dict().items()} for m in models],
                                optimizer=optimizer.state_dict(), objectives=[o.state_dict() for o in objectives],
                                epoch=epoch + 1, histories=histories, configs=[dataclasses.asdict(c) for c in configs],
                                data=prints, rng=_rng_state(device), stack=n)
    finally:
        stack.untie()
        for tracker in filter(None, trackers):
            tracker.close()
        for objective, teacher in zip(objectives, teachers[1] if teachers else ()):
            objective.__dict__["teacher"] = teacher  # the stand-ins of the steps go
    for model in models:
        model.eval()
    return histories


def _teacher_stack(objectives: list) -> tuple | None:
    """KD teachers fused into one frozen stack (of copies) when they are of one stackable architecture: (stack, the
    teachers, their temperatures); else None (each objective runs its own teacher)."""
    if not all(type(o) is KDObjective for o in objectives):
        return None
    parts = [teacher_parts(o.teacher) for o in objectives]
    if not all(isinstance(m, STACKABLE) for m, _ in parts):
        return None
    copies = [copy.deepcopy(m) for m, _ in parts]  # a teacher may serve several members
    if stack_problem(copies, trainable=False) is not None:
        return None
    stack = ModelStack(copies, trainable=False).eval().requires_grad_(False)
    return stack, [o.teacher for o in objectives], [t for _, t in parts]


class _StackedLosses:
    """The losses of N members whose objectives are all MLLObjective, or all KDObjective without logit
    standardisation, as batched ops over the (N, B, K) logits: the same values as each objective's own forward (the
    formulas of F.cross_entropy with label smoothing and losses.kd_loss, written per member; to float rounding,
    tests/test_stack.py), without a loss, its backward and its bookkeeping per member, which made a stack's step
    grow with N on a GPU. ``of(objectives)`` is None for any other mix (each objective then runs its own forward)."""

    def __init__(self, objectives: list, device: torch.device):
        self.kd = type(objectives[0]) is KDObjective
        col = lambda values: torch.tensor(values, device=device)[:, None]  # noqa: E731
        if self.kd:
            self.temperature = col([o.temperature for o in objectives])[:, :, None]
            self.kd_weight, self.ce_weight = col([o.kd_weight for o in objectives]), col(
                [o.ce_weight for o in objectives])
        else:
            self.smoothing = col([o.label_smoothing for o in objectives])
        self.terms = ["ce", "kd", "acc"] if self.kd else ["ce", "acc"]

    @classmethod
    def of(cls, objectives: list, device: torch.device) -> "_StackedLosses | None":
        kind = type(objectives[0])
        if kind not in (MLLObjective, KDObjective) or any(type(o) is not kind for o in objectives) or (
                kind is KDObjective and any(o.logit_standardization for o in objectives)):
            return None
        return cls(objectives, device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the members' losses (N,), their [loss, *terms] as an (N, 1 + terms) tensor)."""
        log_p = torch.log_softmax(logits.float(), 2)
        nll = -log_p.gather(2, labels[..., None]).squeeze(2)
        acc = (logits.argmax(2) == labels).float().mean(1)
        if not self.kd:
            ce = ((1 - self.smoothing) * nll - self.smoothing * log_p.mean(2)).mean(1)
            return ce, torch.stack([ce.detach(), ce.detach(), acc], 1)
        ce = nll.mean(1)
        t = self.temperature
        log_s = torch.log_softmax(logits.float() / t, 2)
        log_t = torch.log_softmax(teacher_logits.float() / t, 2)
        kd = (log_t.exp() * (log_t - log_s)).sum(2).mean(1) * t[:, 0, 0] ** 2
        loss = self.ce_weight[:, 0] * ce + self.kd_weight[:, 0] * kd
        return loss, torch.stack([loss.detach(), ce.detach(), kd.detach(), acc], 1)


def _epoch_batches(datas: list[ImageData], configs: list[TrainConfig], epoch: int, drop_last: bool):
    """Per step (images (N, B, C, H, W), labels (N, B), indices (N, B)): member i's slices are the batch its own fit
    run would draw. One gather, augmentation and normalisation for all members when their data sets agree
    (data.stacked_batches), else member by member."""
    size = configs[0].batch_size
    if stacked_batches_problem(datas) is None and len({c.augment for c in configs}) == 1:
        return stacked_batches(datas, size, seeds=[c.seed for c in configs], epoch=epoch,
                               augment=configs[0].augment, drop_last=drop_last)
    iters = [batches(d, size, shuffle=True, augment=c.augment, seed=c.seed, epoch=epoch, drop_last=drop_last,
                     index=True) for d, c in zip(datas, configs)]
    return (tuple(torch.stack(parts) for parts in zip(*step)) for step in zip(*iters))


def _train_epoch(stack: ModelStack, network: nn.Module, teachers, objectives, optimizer, iters, autocast,
                 cfg: TrainConfig, epoch: int, bar) -> list[dict[str, float]]:
    """The steps of one epoch for every member; returns each member's sample-weighted means of its loss and terms."""
    n, models = stack.n, stack.members
    grads = [p.grad for p in stack.fused.parameters()]
    names = sums = first_bad = None
    seen = 0
    batched = _StackedLosses.of(objectives, grads[0].device)
    scale = None  # the fused teachers' temperatures, for the batched losses of temperature-scaled teachers
    if batched is not None and teachers is not None and any(t is not None for t in teachers[2]):
        scale = torch.tensor([1.0 if t is None else float(t) for t in teachers[2]], device=grads[0].device)
    for step, (images, labels, indices) in enumerate(iters):
        per = images.unbind(0)  # one view per member: an objective's model is called on exactly these
        with autocast():
            logits = stack(images, network)
            if teachers is not None:
                with torch.no_grad():
                    taught = teachers[0](images)
                if batched is None:
                    for i, objective in enumerate(objectives):
                        t = taught[i] if teachers[2][i] is None else taught[i] / teachers[2][i]
                        objective.__dict__["teacher"] = _Logits(teachers[1][i], per[i], t, "teacher")
                elif scale is not None:
                    taught = taught / scale[:, None, None]
            if batched is not None:
                if teachers is None and batched.kd:  # teachers that do not stack: each its own forward
                    with torch.no_grad():
                        taught = torch.stack([o.teacher(x) for o, x in zip(objectives, per)])
                loss, flat = batched(logits, labels, taught if batched.kd else None)
                losses, flat = [loss.sum()], flat.flatten()
                if step == 0:
                    names = [["loss"] + batched.terms for _ in objectives]
            else:
                losses, values = [], []
                for i, objective in enumerate(objectives):
                    model = _Logits(models[i], per[i], logits[i])
                    loss, terms = objective(model, per[i], labels[i], indices[i])
                    if not model.calls:
                        raise RuntimeError(f"objective {type(objective).__name__} did not call its model: "
                                           f"fit_stack accepts {_names()}")
                    losses.append(loss)
                    values.append([loss.detach().float()] + [t.detach().float() for t in terms.values()])
                    if step == 0:
                        names = (names or []) + [["loss"] + list(terms)]
                flat = torch.stack([v for member in values for v in member])
        stack.push_statistics()  # after the objectives: a member evaluated in a step sees the statistics before it
        torch._foreach_zero_(grads)
        torch.stack(losses).sum().backward()
        optimizer.step()
        if sums is None:
            sums, first_bad = torch.zeros_like(flat), torch.full_like(flat, -1)
        sums += flat * labels.shape[1]
        seen += labels.shape[1]
        first_bad = torch.where(~torch.isfinite(flat) & (first_bad < 0), float(step), first_bad)
        if (step + 1) % cfg.check_every == 0:
            _check_all(names, first_bad, objectives, epoch)
        if bar is not None:
            bar.update()
    if names is None:
        raise ValueError(f"the data gives no batch of size {cfg.batch_size}: use more samples or a smaller batch_size")
    _check_all(names, first_bad, objectives, epoch)
    return _means(names, sums / seen)


def _check_all(names, first_bad, objectives, epoch) -> None:
    offset = 0
    for member, objective in zip(names, objectives):
        _check_finite(member, first_bad[offset:offset + len(member)], epoch)
        objective.check()
        offset += len(member)


def _means(names, means) -> list[dict[str, float]]:
    out, offset = [], 0
    values = means.tolist()
    for member in names:
        out.append(dict(zip(member, values[offset:offset + len(member)])))
        offset += len(member)
    return out


def _resume(checkpoint, models, optimizer, objectives, configs, prints, device) -> tuple[list[list[dict]], int]:
    """Load a stack checkpoint written by fit_stack (if there is one) into the plain models; (histories, start)."""
    _remove_stale_temp_files(checkpoint)
    if not Path(checkpoint).is_file():
        return [[] for _ in models], 0
    state = load_checkpoint(checkpoint)
    missing = [k for k in ("models", "optimizer", "objectives", "histories", "epoch", "rng") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {str(checkpoint)!r} cannot be resumed by fit_stack: it lacks {', '.join(missing)}"
                         " (resume needs a checkpoint written by fit_stack(checkpoint=...))")
    if len(state["models"]) != len(models):
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds a stack of {len(state['models'])} models, not "
                         f"{len(models)}: resume with the same models")
    for i, (model, c) in enumerate(zip(models, configs)):
        load_state(model, state["models"][i], f"checkpoint {str(checkpoint)!r} (model {i})")
        saved = {"config": state["configs"][i], "data": state["data"][i], "epoch": state["epoch"]}
        _check_same_run(f"{checkpoint} (model {i})", saved, c, prints[i])
    optimizer.load_state_dict(state["optimizer"])
    for objective, saved in zip(objectives, state["objectives"]):
        _load_objective(objective, saved)
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if configs[0].log:
        print(f"resumed from {checkpoint} at epoch {state['epoch']}/{configs[0].epochs}", flush=True)
    return [list(h) for h in state["histories"]], int(state["epoch"])

