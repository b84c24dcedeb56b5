"""One training loop for every kind of training, with pluggable objectives.

``fit(model, data, objective, config)`` trains `model` on resident tensors: whole-batch augmentation on the device,
SGD + momentum + weight decay with a cosine or step schedule, bf16 autocast where the hardware has it, no host sync in
the hot loop except one every `check_every` steps (to stop on non-finite losses or a collapse), a plain line per
epoch, atomic checkpoints and exact resume. Under ``torchrun`` it shards the data and wraps the model in DDP.

An objective is an ``nn.Module`` mapping a batch to ``(loss, {name: value})``. Its submodules (regressors,
embeddings) are trained with the model; its buffers (centroids, memory banks) are saved in checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import load_checkpoint, load_state, save_checkpoint
from ..data.core import ImageData, batches
from .evaluate import measure_cmi
from .objectives import Objective, StopTraining, mll_objective
from .runtime import autocast_dtype, check_model_input
from .tracking import TensorBoardLogger
from ..utils import check_choice, check_float, check_int, get_device


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. Defaults: the reference CIFAR recipe (DESIGN.md §2), scaled to `epochs`."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"            # "step" (×gamma at milestones), "cosine" or "constant"
    milestones: tuple = (0.625, 0.75, 0.875)  # fractions of `epochs` (150/180/210 of 240) or epoch numbers if > 1
    gamma: float = 0.1
    augment: bool = True              # random crop + flip as the data set declares (pad, flip)
    seed: int = 0                     # order and augmentation of every epoch derive from (seed, epoch)
    device: str | None = None         # None: cuda > mps > cpu
    precision: str = "auto"           # "fp32", "bf16" (autocast) or "auto": bf16 on CUDA and on CPUs with native bf16
    channels_last: bool = True        # memory format of conv models (faster on CUDA and on this CPU)
    check_every: int = 50             # steps between host syncs that check for non-finite losses / collapse
    eval_every: int = 1               # epochs between evaluations on `eval_data`
    progress: str = "auto"            # "auto": a bar in a terminal or a Jupyter kernel, none when stderr is a file
                                      # or a pipe; "bar": always; "off": never
    log: bool = True                  # one plain line per epoch
    sync_bn: bool = False             # DDP: BatchNorm statistics over all ranks (CUDA only; no-op in one process)
    name: str = ""                    # what is trained ("mcmi λ=0.5", "student kd ← mcmi"): prefixes log lines and bars
    compile: bool | str = False       # torch.compile the training forward: True, or a mode ("reduce-overhead": CUDA
                                      # graphs). Off: 0.85-1.20x on this CPU (benchmarks.loop --compile)
    tensorboard: str = ""             # a folder: each epoch's record as TensorBoard scalars, one run per `name`
                                      # (tracking.TensorBoardLogger; needs the tensorboard extra). "": off

    def validate(self) -> "TrainConfig":
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_choice("schedule", self.schedule, ("step", "cosine", "constant"))
        check_choice("precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("progress", self.progress, ("auto", "bar", "off"))
        check_int("check_every", self.check_every, minimum=1)
        check_int("eval_every", self.eval_every, minimum=1)
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r} is not accepted: expected True, False or a torch.compile mode "
                             f"({', '.join(COMPILE_MODES)})")
        check_int("seed", self.seed, minimum=0)
        return self

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch `epoch` (0-based)."""
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "step":
            marks = [m * self.epochs if m <= 1 else m for m in self.milestones]
            return self.lr * self.gamma ** sum(epoch >= round(m) for m in marks)
        return self.lr


#: torch.compile modes accepted by TrainConfig.compile (True is the default mode)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---- the loop ---------------------------------------------------------------------------------------------------

def _redraws_in_place(stream) -> bool:
    """True when `stream` shows tqdm's redrawn bar as one line: a terminal, or a Jupyter kernel's stream (JupyterLab
    renders the carriage returns in place). A file, a pipe, CI or pytest's capture would keep every redraw as a line
    and the bar's last state after a one-line error, so there `progress="auto"` shows no bar (the log line remains)."""
    kernel_io = sys.modules.get("ipykernel.iostream")  # imported is not enough (pytest imports it): the stream must be
    if kernel_io is not None and isinstance(stream, kernel_io.OutStream):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _progress(cfg: TrainConfig, total: int, desc: str):
    """tqdm's text bar on stderr, or None. progress="auto": only where stderr redraws in place; "bar": always (what
    the caller asked for; nothing in the package asks for it); "off": never."""
    enabled = cfg.progress == "bar" or (cfg.progress == "auto" and _redraws_in_place(sys.stderr))
    if not enabled or dist_utils.rank() != 0:
        return None
    # the text bar, also in JupyterLab: tqdm's widget bar leaves a saved view of a widget model that is gone, shown
    # as "Error displaying widget: model not found" when the notebook is reopened
    from tqdm.std import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=0.5, file=sys.stderr)


def fit(model: nn.Module, data: ImageData, objective: Objective | None = None, config: TrainConfig | None = None,
        *, eval_data: ImageData | None = None, callbacks: Iterable[Callable[[dict, nn.Module], None]] = (),
        checkpoint: str | os.PathLike | None = None, resume: bool = False, **overrides) -> list[dict]:
    """Train `model` in place on `data` with `objective` (default: MLL); return the per-epoch history.

    config: a :class:`TrainConfig`; keyword `overrides` replace its fields (``fit(m, d, epochs=5, lr=0.1)``).
    eval_data: evaluated every `eval_every` epochs (accuracy and CMI, reported, never used to select a model).
    checkpoint: a file written atomically after every epoch; with `resume=True` an existing one is continued,
    to the same weights and history as an uninterrupted run. callbacks: called as ``cb(record, model)`` per epoch.
    """
    # ---- set-up: config, device, model, data and objective on the device, optimizer -----------------------------
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    objective = objective if objective is not None else mll_objective()
    device = get_device(cfg.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    memory_format = torch.channels_last if cfg.channels_last and device.type != "mps" else torch.contiguous_format
    check_model_input(model, data)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError(f"sync_bn=True is not accepted on device {device.type!r}: SyncBatchNorm needs CUDA (the nccl "
                         "backend); use sync_bn=False (each rank then normalises with its own batch statistics)")
    model.to(device=device, memory_format=memory_format)
    data = data.to(device)
    eval_data = eval_data.to(device) if eval_data is not None else None
    objective.to(device)
    objective.prepare(model, data)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov)

    # ---- resume: weights, optimizer, objective buffers, history and random state of the last finished epoch -----
    history: list[dict] = []
    start = 0
    fingerprint = data_fingerprint(data) if checkpoint is not None else None  # once: the data do not change
    tracker = TensorBoardLogger(cfg.tensorboard, cfg.name) if cfg.tensorboard and rank == 0 else None
    callbacks = [*callbacks, tracker] if tracker is not None else list(callbacks)
    if resume and checkpoint is not None:
        history, start = _resume(checkpoint, model, optimizer, objective, device, cfg, rank, world, fingerprint)

    # ---- wrappers: SyncBatchNorm, DDP, torch.compile; precision; steps per epoch ---------------------------------
    restore_bn = dist_utils.convert_sync_batchnorm(model) if cfg.sync_bn and world > 1 else None
    train_model = dist_utils.wrap(model, device) if world > 1 else model
    if cfg.compile:
        if not objective.compilable:
            raise ValueError(f"compile={cfg.compile!r} is not accepted with {type(objective).__name__}: it captures "
                             "the model's intermediate features with hooks, which torch.compile would retrace every "
                             "step; use compile=False")
        train_model = torch.compile(train_model, mode=None if cfg.compile is True else cfg.compile)
    amp = autocast_dtype(cfg.precision, device)
    autocast = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    n_rank = len(data) // world
    drop_last = n_rank % cfg.batch_size == 1  # BatchNorm cannot train on a batch of one
    steps = n_rank // cfg.batch_size + (0 if drop_last or n_rank % cfg.batch_size == 0 else 1)

    for epoch in range(start, cfg.epochs):
        # ---- one epoch: the objective's epoch hooks around the steps ---------------------------------------------
        t0 = time.perf_counter()
        lr = cfg.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            objective.on_epoch_start(model, data, epoch)  # e.g. the centroid pass, at the training precision
        model.train()
        objective.train()
        batch_iter = batches(data, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, epoch=epoch,
                             drop_last=drop_last, rank=rank, world_size=world, index=True)
        bar = _progress(cfg, steps, f"{cfg.name + ' ' if cfg.name else ''}epoch {epoch + 1}/{cfg.epochs}")
        means = _train_epoch(train_model, objective, optimizer, batch_iter, memory_format, autocast, cfg, epoch, bar)
        if bar is not None:
            bar.close()
        if world > 1:  # BatchNorm statistics drift apart within an epoch: evaluate and save rank 0's everywhere
            dist_utils.broadcast_buffers(model)
        objective.on_epoch_end(model, data, epoch)

        # ---- record: epoch means, evaluation, log line, callbacks, checkpoint ------------------------------------
        record = {"epoch": epoch + 1, "lr": lr}
        record.update({("train_acc" if k == "acc" else k): v for k, v in means.items()})
        if eval_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            metrics = measure_cmi(model, eval_data)  # sharded over the ranks, exact
            record.update(eval_acc=metrics["accuracy"], eval_cmi=float(metrics["cmi"]))
        record["time"] = time.perf_counter() - t0
        history.append(record)
        if cfg.log and rank == 0:
            print(format_record(record, cfg.epochs, cfg.name), flush=True)
        for callback in callbacks:
            callback(record, model)
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, model=model, optimizer=optimizer.state_dict(),
                            objective=objective.state_dict(), epoch=epoch + 1, history=history,
                            config=dataclasses.asdict(cfg), data=fingerprint, rng=_rng_state(device))
        dist_utils.barrier()
    if restore_bn is not None:
        restore_bn()
    if tracker is not None:
        tracker.close()
    model.eval()
    return history


def _train_epoch(train_model: nn.Module, objective: Objective, optimizer, batch_iter, memory_format, autocast,
                 cfg: TrainConfig, epoch: int, bar) -> dict[str, float]:
    """The steps of one epoch; returns the sample-weighted means of the loss and the objective's terms (over all
    ranks). The host syncs only every `check_every` steps, to stop on a non-finite term or a collapse."""
    objective_params = [p for p in objective.parameters() if p.requires_grad]
    world = dist_utils.world_size()
    names: list[str] | None = None
    sums = first_bad = None
    seen = 0
    for step, (images, labels, index) in enumerate(batch_iter):
        images = images.contiguous(memory_format=memory_format)
        with autocast():
            loss, terms = objective(train_model, images, labels, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1 and objective_params:  # DDP averages the model's gradients, not the objective's
            dist_utils.average_gradients(objective_params)
        optimizer.step()
        values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()])
        if names is None:
            names = ["loss"] + list(terms)
            sums = torch.zeros_like(values)
            first_bad = torch.full_like(values, -1)
        sums += values * len(labels)
        first_bad = torch.where(~torch.isfinite(values) & (first_bad < 0), float(step), first_bad)
        seen += len(labels)
        if (step + 1) % cfg.check_every == 0:
            _check_finite(names, first_bad, epoch)
            objective.check()
        if bar is not None:
            bar.update()
    if names is None:
        raise ValueError(f"the data gives no batch of size {cfg.batch_size} per rank: use more samples or a smaller "
                         "batch_size")
    _check_finite(names, first_bad, epoch)
    objective.check()
    sums = dist_utils.all_reduce_sum(torch.cat([sums, torch.tensor([float(seen)], device=sums.device)]))
    return dict(zip(names, (sums[:-1] / sums[-1]).tolist()))


#: TrainConfig fields that do not change what a run computes: a resume may change them.
RESUME_FREE = ("device", "progress", "log", "name", "check_every", "eval_every", "compile", "tensorboard")


def data_fingerprint(data: ImageData) -> dict:
    """A cheap identity of a training set, saved in fit's checkpoints: its size, shape, classes and a checksum of its
    labels and of a strided sample of its pixels (a resume on other data is refused, not continued)."""
    images, labels = data.images, data.labels.cpu()
    step = max(1, len(images) // 256)
    sample = images[::step].detach().cpu().double()
    return {"n": len(data), "shape": list(images.shape[1:]), "num_classes": int(data.num_classes),
            "labels": int((labels.long() * torch.arange(1, len(labels) + 1) % 1_000_003).sum()),
            "pixels": round(float(sample.sum()), 3)}


def _check_same_run(checkpoint, state: dict, cfg: TrainConfig, fingerprint: dict) -> None:
    """A resume must continue the same run: the same config (but RESUME_FREE fields) and the same data."""
    saved = state.get("config") or {}
    now = dataclasses.asdict(cfg)
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in RESUME_FREE and k in saved and saved[k] != now[k]]
    if cfg.schedule == "constant" and saved.get("schedule") == "constant" and cfg.epochs > state.get("epoch", 0):
        # a constant learning rate does not depend on the epoch count: more epochs extend the same run
        changed = [c for c in changed if not c.startswith("epochs ")]
    if changed:
        raise ValueError(f"resume from {str(checkpoint)!r} is not accepted: the run it holds was trained with other "
                         f"settings ({'; '.join(changed)}); resume with the same settings, or start a new run "
                         "without resume (another checkpoint path)")
    if "data" in state and state["data"] != fingerprint:
        was = state["data"]
        diff = [f"{k} {was.get(k)!r} -> {fingerprint[k]!r}" for k in fingerprint if was.get(k) != fingerprint[k]]
        raise ValueError(f"resume from {str(checkpoint)!r} is not accepted: it was trained on other data "
                         f"({'; '.join(diff)}); resume on the same samples, or start a new run without resume")


def _resume(checkpoint, model, optimizer, objective, device, cfg: TrainConfig, rank: int, world: int,
            fingerprint: dict) -> tuple[list[dict], int]:
    """Load a checkpoint written by fit (if there is one); returns (history, first epoch to run)."""
    history, start = [], 0
    if rank == 0:
        _remove_stale_temp_files(checkpoint)
    if Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        missing = [k for k in ("model", "optimizer", "objective", "history", "epoch", "rng") if k not in state]
        if missing:
            raise ValueError(f"checkpoint {str(checkpoint)!r} cannot be resumed: it lacks {', '.join(missing)} (it "
                             f"holds {', '.join(map(str, state)) or 'nothing'}); resume needs a checkpoint written "
                             "by fit(checkpoint=...)")
        load_state(model, state["model"], f"checkpoint {str(checkpoint)!r}")  # another architecture: say that first
        _check_same_run(checkpoint, state, cfg, fingerprint)
        optimizer.load_state_dict(state["optimizer"])
        _load_objective(objective, state["objective"])
        history, start = list(state["history"]), int(state["epoch"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if cfg.log and rank == 0:
            print(f"resumed from {checkpoint} at epoch {start}/{cfg.epochs}", flush=True)
    if world > 1:
        _check_same_start(start, checkpoint, device)
    return history, start


def _load_objective(objective: Objective, state: dict) -> None:
    """load_state_dict that lets buffers created empty (centroids, memory banks) take the saved shape."""
    for name, value in state.items():
        owner, _, attr = name.rpartition(".")
        module = objective.get_submodule(owner) if owner else objective
        buf = module._buffers.get(attr)
        if buf is not None and buf.shape != value.shape:
            module._buffers[attr] = torch.empty(value.shape, dtype=value.dtype, device=buf.device)
    objective.load_state_dict(state)


def _check_finite(names: list[str], first_bad: torch.Tensor, epoch: int) -> None:
    if dist_utils.is_distributed():  # every rank must stop at the same sync point, or the others hang
        # the earliest bad step over the ranks (inf stands for "none" on a rank)
        earliest = dist_utils.all_reduce_min(torch.where(first_bad >= 0, first_bad, float("inf")))
        first_bad = torch.where(torch.isinf(earliest), -1.0, earliest)
    bad = (first_bad >= 0).nonzero().flatten().tolist()
    if bad:
        # the earliest step; at that step a named term (the cause) rather than the total "loss"
        i = min(bad, key=lambda j: (float(first_bad[j]), j == 0))
        raise StopTraining(f"non-finite {names[i]} at epoch {epoch + 1}, step {int(first_bad[i]) + 1}: training "
                           f"stopped (lower the learning rate or λ, or check the data for NaN/inf)")


def _remove_stale_temp_files(checkpoint: str | os.PathLike) -> None:
    """Temporary files of checkpoint writes that a kill interrupted (atomic_write's `.<name>.*.tmp`)."""
    path = Path(checkpoint)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _check_same_start(start: int, checkpoint, device: torch.device) -> None:
    """Every rank must resume from the same epoch (a checkpoint on a disk that only some nodes see would hang)."""
    t = torch.tensor([start, -start], dtype=torch.float64, device=device)
    lo, neg_hi = dist_utils.all_reduce_min(t).tolist()
    if lo != -neg_hi:
        raise ValueError(f"checkpoint {str(checkpoint)!r} gives epoch {start} on rank {dist_utils.rank()} but ranks "
                         f"disagree (epochs {int(lo)}..{int(-neg_hi)}): put it on a file system that every node shares")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def format_record(record: dict, epochs: int, name: str = "") -> str:
    """One plain line per epoch: `[name] epoch 3/20  loss 0.412  ce 0.40  ...  lr 0.0500  4.1s`."""
    skip = {"epoch", "lr", "time"}
    parts = ([name] if name else []) + [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k not in skip and isinstance(v, float)]
    parts += [f"lr {record['lr']:.4g}", f"{record['time']:.1f}s"]
    return "  ".join(parts)
