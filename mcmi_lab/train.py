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
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_utils
from .checkpoint import load_checkpoint, load_state, save_checkpoint
from .data import ImageData, batches
from .utils import check_choice, check_float, check_int, get_device


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
    progress: str = "auto"            # "auto" (bar in a terminal or notebook), "bar", "off"
    log: bool = True                  # one plain line per epoch
    sync_bn: bool = False             # DDP: BatchNorm statistics over all ranks (CUDA only; no-op in one process)
    compile: bool | str = False       # torch.compile the training forward: True, or a mode ("reduce-overhead": CUDA
                                      # graphs). Off: 0.85-1.20x on this CPU (benchmarks.loop --compile)

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


class StopTraining(Exception):
    """Raised to stop training with a message (non-finite loss, collapse)."""


# ---- objectives -------------------------------------------------------------------------------------------------

class Objective(nn.Module):
    """Maps a batch to ``(loss, {name: value})``; `forward(model, images, labels, index)`.

    Hooks, all optional: `prepare(model, data)` once before training (build connectors, move a teacher),
    `on_epoch_start(model, data, epoch)`, `on_epoch_end(model, data, epoch)` (after the last step, before the
    checkpoint), and `check()` at each sync point (may raise :class:`StopTraining`).
    Terms are detached scalars; a term named "acc" is the batch accuracy (reported as train_acc).
    """

    #: False for objectives that hook into the model's layers (feature KD): torch.compile would retrace every step
    compilable = True

    def prepare(self, model: nn.Module, data: ImageData) -> None:
        pass

    def on_epoch_start(self, model: nn.Module, data: ImageData, epoch: int) -> None:
        pass

    def on_epoch_end(self, model: nn.Module, data: ImageData, epoch: int) -> None:
        pass

    def check(self) -> None:
        pass


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


class MLLObjective(Objective):
    """Maximum log-likelihood: cross-entropy (optionally label-smoothed, a control teacher)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)

    def forward(self, model, images, labels, index=None):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.detach(), "acc": _accuracy(logits, labels)}


def mll_objective(label_smoothing: float = 0.0) -> MLLObjective:
    return MLLObjective(label_smoothing)


#: Centroid updates of the MCMI objective (see MCMIObjective); the first is the default.
UPDATES = ("running", "epoch", "frozen", "ema")
#: Steps between two refreshes of update="running" (it also refreshes at the end of every epoch).
REFRESH_STEPS = 100


class MCMIObjective(Objective):
    """CE − λ·KL(P_x ‖ Q_y) with centroids Q treated as constants (DESIGN.md §2).

    update: how the centroids follow the model. All start from one full pass of the starting model.
    "running" (the default) — every `refresh_steps` steps (default :data:`REFRESH_STEPS`) and at the end of every
    epoch, the class means of the training outputs since the last refresh: no extra pass, the outputs are the
    training steps' own. "epoch" — a full pass at the start of every epoch (costs that pass). "frozen" — the
    reference code: fixed after the first pass. "ema" — a moving average of batch class means with `ema_decay`.
    Why the default: frozen centroids collapsed converged teachers at λ ≥ 0.5; a refresh per epoch was stable on
    70-step epochs but collapsed on 844-step ones, where a running refresh every 100 steps was stable (README,
    "The science, and the defaults we chose").
    A collapse guard stops the run when the running train accuracy falls below half the starting model's.
    """

    def __init__(self, lam: float, centroids: torch.Tensor | None = None, update: str = UPDATES[0],
                 ema_decay: float = 0.999, guard: bool = True, refresh_steps: int | None = None):
        super().__init__()
        self.lam = check_float("lam", lam, 0.0)
        self.update = check_choice("update", update, UPDATES)
        self.ema_decay = check_float("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        self.guard = guard
        if refresh_steps is not None and self.update != "running":
            raise ValueError(f"refresh_steps={refresh_steps!r} is not accepted with update={update!r}: it sets how "
                             "often update='running' refreshes; use update='running' or refresh_steps=None")
        self.refresh_steps = check_int("refresh_steps", REFRESH_STEPS if refresh_steps is None else refresh_steps,
                                       minimum=1) if self.update == "running" else None
        self.register_buffer("centroids", centroids.detach().double().clone() if centroids is not None
                             else torch.empty(0, dtype=torch.float64))
        self.register_buffer("start_acc", torch.tensor(-1.0))
        self.register_buffer("recent_acc", torch.tensor(-1.0))
        # "running": class sums and counts of the training outputs since the last refresh (zero at every epoch
        # boundary, so a checkpoint, written after on_epoch_end, needs none of them), and the steps they cover
        self.register_buffer("_sums", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_buffer("_counts", torch.empty(0, dtype=torch.float64), persistent=False)
        self._steps = 0

    def on_epoch_start(self, model, data, epoch):
        if self.centroids.numel() and self.update != "epoch":
            return
        from .evaluate import measure_cmi

        stats = measure_cmi(model, data)
        self.centroids = stats["centroids"].to(self.centroids.device)
        if self.start_acc < 0:
            self.start_acc.fill_(stats["accuracy"])
            self.recent_acc.fill_(stats["accuracy"])

    def forward(self, model, images, labels, index=None):
        from .losses import kl_to_centroids_loss

        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        kl = kl_to_centroids_loss(logits, labels, self.centroids)
        acc = _accuracy(logits, labels)
        with torch.no_grad():
            self.recent_acc.lerp_(acc, 0.02)
            if self.update == "ema":
                sums, counts = self._class_sums(logits, labels)
                self._set_means(sums, counts, self.ema_decay)
            elif self.update == "running":
                sums, counts = self._class_sums(logits, labels)
                if self._sums.shape != sums.shape:
                    self._sums, self._counts = torch.zeros_like(sums), torch.zeros_like(counts)
                self._sums += sums
                self._counts += counts
                self._steps += 1
                if self._steps == self.refresh_steps:
                    self._refresh()
        return ce - self.lam * kl, {"ce": ce.detach(), "kl": kl.detach(), "acc": acc}

    def on_epoch_end(self, model, data, epoch):
        if self.update == "running" and self._steps:
            self._refresh()

    def _refresh(self):
        self._set_means(self._sums, self._counts, 0.0)
        self._sums.zero_()
        self._counts.zero_()
        self._steps = 0

    def _class_sums(self, logits, labels):
        """Per-class sums of the batch's probabilities (K×K, float64) and the class counts (K×1)."""
        probs = logits.detach().float().softmax(1).double()
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, probs)
        return sums, torch.bincount(labels, minlength=sums.shape[0]).to(sums).unsqueeze(1)

    def _set_means(self, sums, counts, decay: float):
        """centroids ← decay·centroids + (1 − decay)·class means, for the classes seen; every rank the same."""
        if dist_utils.is_distributed():  # the global class means: every rank keeps the same centroids
            both = dist_utils.all_reduce_sum(torch.cat([sums, counts], 1))
            sums, counts = both[:, :-1], both[:, -1:]
        means = sums / counts.clamp_min(1)
        self.centroids.copy_(torch.where(counts > 0, decay * self.centroids + (1 - decay) * means, self.centroids))

    def check(self):
        if not self.guard or self.start_acc <= 0:
            return
        if dist_utils.is_distributed():  # one decision for all ranks: the mean of their running accuracies
            self.recent_acc.copy_(dist_utils.all_reduce_sum(self.recent_acc.clone()) / dist_utils.world_size())
        k = max(self.centroids.shape[0], 2)
        floor = 0.5 * float(self.start_acc)
        recent = float(self.recent_acc)
        if floor > 1.5 / k and recent < floor:  # only a teacher well above chance can collapse
            raise StopTraining(
                f"MCMI fine-tune collapsed with lam={self.lam:g} (update={self.update!r}): running train accuracy fell "
                f"to {recent:.1%} from {float(self.start_acc):.1%}. KL(P_x ‖ Q_y) is unbounded, so a large λ pushes mass "
                f"onto classes the centroids barely cover; use a smaller lam, fresher centroids "
                f"(update='running' with fewer refresh_steps than {self.refresh_steps or REFRESH_STEPS}), or guard=False "
                f"to let it run")


def mcmi_objective(lam: float, centroids: torch.Tensor | None = None, update: str = UPDATES[0],
                   ema_decay: float = 0.999, guard: bool = True, refresh_steps: int | None = None) -> MCMIObjective:
    return MCMIObjective(lam, centroids, update, ema_decay, guard, refresh_steps)


class KDObjective(Objective):
    """Hinton KD: ce_weight · CE + kd_weight · T²·KL(teacher_T ‖ student_T). The teacher stays frozen in eval mode."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 0.9, ce_weight: float = 0.1):
        super().__init__()
        self.__dict__["teacher"] = teacher  # not a submodule: not trained, not in state_dict, never set to train()
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.kd_weight = check_float("kd_weight", kd_weight, 0.0)
        self.ce_weight = check_float("ce_weight", ce_weight, 0.0)

    def prepare(self, model, data):
        check_model_input(self.teacher, data, "the teacher")
        freeze_teacher(self.teacher, data.device, _memory_format(model))

    def forward(self, model, images, labels, index=None):
        from .losses import kd_loss

        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        kd = kd_loss(logits, teacher_logits, self.temperature)
        return self.ce_weight * ce + self.kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach(),
                                                           "acc": _accuracy(logits, labels)}


def kd_objective(teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 0.9,
                 ce_weight: float = 0.1) -> KDObjective:
    return KDObjective(teacher, temperature, kd_weight, ce_weight)


def freeze_teacher(teacher: nn.Module, device, memory_format=torch.contiguous_format) -> nn.Module:
    """Move a teacher to `device`, put it in eval mode and stop its gradients."""
    teacher.to(device=device, memory_format=memory_format).eval().requires_grad_(False)
    return teacher


# ---- the loop ---------------------------------------------------------------------------------------------------

def _memory_format(model: nn.Module):
    w = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return torch.channels_last if w is not None and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format


def _native_bf16_cpu() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for fp32."""
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if precision == "bf16" or device.type == "cuda" or _native_bf16_cpu():
        return torch.bfloat16
    return None


def check_model_input(model: nn.Module, data: ImageData, what: str = "this model") -> None:
    """One clear line when the data's channels do not fit the model's first convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != data.in_channels:
        raise ValueError(f"images with {data.in_channels} channel(s) ({data.name}) are not accepted by {what}: "
                         f"its first convolution expects {conv.in_channels}; build it with in_channels={data.in_channels}")


def _progress(cfg: TrainConfig, total: int, desc: str):
    enabled = cfg.progress == "bar" or (cfg.progress == "auto" and (sys.stderr.isatty() or "ipykernel" in sys.modules))
    if not enabled or dist_utils.rank() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=0.5)


def fit(model: nn.Module, data: ImageData, objective: Objective | None = None, config: TrainConfig | None = None,
        *, eval_data: ImageData | None = None, callbacks: Iterable[Callable[[dict, nn.Module], None]] = (),
        checkpoint: str | os.PathLike | None = None, resume: bool = False, **overrides) -> list[dict]:
    """Train `model` in place on `data` with `objective` (default: MLL); return the per-epoch history.

    config: a :class:`TrainConfig`; keyword `overrides` replace its fields (``fit(m, d, epochs=5, lr=0.1)``).
    eval_data: evaluated every `eval_every` epochs (accuracy and CMI, reported, never used to select a model).
    checkpoint: a file written atomically after every epoch; with `resume=True` an existing one is continued,
    to the same weights and history as an uninterrupted run. callbacks: called as ``cb(record, model)`` per epoch.
    """
    from .evaluate import measure_cmi

    cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    objective = objective if objective is not None else mll_objective()
    device = get_device(cfg.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    memory_format = torch.channels_last if cfg.channels_last and device.type != "mps" else torch.contiguous_format
    check_model_input(model, data)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError(f"sync_bn=True is not accepted on device {device.type!r}: SyncBatchNorm needs CUDA (the nccl "
                         "backend); use sync_bn=False (each rank then normalises with its own batch statistics)")
    empty = (data.class_counts() == 0).nonzero().flatten().tolist()
    if isinstance(objective, MCMIObjective) and empty:
        raise ValueError(f"data with empty classes {empty} is not accepted for MCMI training: every class needs "
                         "samples to define its centroid")
    model.to(device=device, memory_format=memory_format)
    data = data.to(device)
    eval_data = eval_data.to(device) if eval_data is not None else None
    objective.to(device)
    objective.prepare(model, data)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov)
    history: list[dict] = []
    start = 0
    if resume and checkpoint is not None and rank == 0:
        _remove_stale_temp_files(checkpoint)
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        load_state(model, state["model"], f"checkpoint {str(checkpoint)!r}")
        optimizer.load_state_dict(state["optimizer"])
        _load_objective(objective, state["objective"])
        history, start = list(state["history"]), int(state["epoch"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if cfg.log and rank == 0:
            print(f"resumed from {checkpoint} at epoch {start}/{cfg.epochs}", flush=True)
    if resume and world > 1:
        _check_same_start(start, checkpoint, device)
    restore_bn = dist_utils.convert_sync_batchnorm(model) if cfg.sync_bn and world > 1 else None
    train_model = dist_utils.wrap(model, device) if world > 1 else model
    if cfg.compile:
        if not objective.compilable:
            raise ValueError(f"compile={cfg.compile!r} is not accepted with {type(objective).__name__}: it captures "
                             "the model's intermediate features with hooks, which torch.compile would retrace every "
                             "step; use compile=False")
        train_model = torch.compile(train_model, mode=None if cfg.compile is True else cfg.compile)
    objective_params = [p for p in objective.parameters() if p.requires_grad]
    amp = autocast_dtype(cfg.precision, device)
    n_rank = len(data) // world
    drop_last = n_rank % cfg.batch_size == 1  # BatchNorm cannot train on a batch of one
    steps = n_rank // cfg.batch_size + (0 if drop_last or n_rank % cfg.batch_size == 0 else 1)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            objective.on_epoch_start(model, data, epoch)  # e.g. the centroid pass, at the training precision
        model.train()
        objective.train()
        names: list[str] | None = None
        sums = first_bad = None
        seen = 0
        bar = _progress(cfg, steps, f"epoch {epoch + 1}/{cfg.epochs}")
        for step, (images, labels, index) in enumerate(batches(
                data, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, epoch=epoch,
                drop_last=drop_last, rank=rank, world_size=world, index=True)):
            images = images.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
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
        if bar is not None:
            bar.close()
        if names is None:
            raise ValueError(f"data of {len(data)} samples gives no batch of size {cfg.batch_size} per rank")
        if world > 1:  # BatchNorm statistics drift apart within an epoch: evaluate and save rank 0's everywhere
            dist_utils.broadcast_buffers(model)
        _check_finite(names, first_bad, epoch)
        objective.check()
        objective.on_epoch_end(model, data, epoch)
        sums = dist_utils.all_reduce_sum(torch.cat([sums, torch.tensor([float(seen)], device=sums.device)]))
        means = (sums[:-1] / sums[-1]).tolist()
        record = {"epoch": epoch + 1, "lr": lr}
        record.update({("train_acc" if k == "acc" else k): v for k, v in zip(names, means)})
        if eval_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            metrics = measure_cmi(model, eval_data)  # sharded over the ranks, exact
            record.update(eval_acc=metrics["accuracy"], eval_cmi=float(metrics["cmi"]))
        record["time"] = time.perf_counter() - t0
        history.append(record)
        if cfg.log and rank == 0:
            print(format_record(record, cfg.epochs), flush=True)
        for callback in callbacks:
            callback(record, model)
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, model=model, optimizer=optimizer.state_dict(),
                            objective=objective.state_dict(), epoch=epoch + 1, history=history,
                            config=dataclasses.asdict(cfg), rng=_rng_state(device))
        dist_utils.barrier()
    if restore_bn is not None:
        restore_bn()
    model.eval()
    return history


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


def format_record(record: dict, epochs: int) -> str:
    """One plain line per epoch: `epoch 3/20  loss 0.412  ce 0.40  ...  lr 0.0500  4.1s`."""
    skip = {"epoch", "lr", "time"}
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k not in skip and isinstance(v, float)]
    parts += [f"lr {record['lr']:.4g}", f"{record['time']:.1f}s"]
    return "  ".join(parts)
