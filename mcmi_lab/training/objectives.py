"""Objectives: what one training step minimises. Each maps a batch to ``(loss, {name: value})``.

:class:`Objective` is the protocol :func:`mcmi_lab.training.loop.fit` calls (``forward`` plus optional hooks); MLL (cross-
entropy, optionally label-smoothed), MCMI (CE − λ·KL(P_x ‖ Q_y), the loss of :func:`mcmi_lab.losses.teacher.mcmi_loss`) and
Hinton KD live here; the feature-based KD methods are in :mod:`mcmi_lab.kd`. Each objective calls the pure loss
function that the tests pin: there is one copy of each formula.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_utils
from ..metrics.cmi import CMIMeter
from ..data.core import ImageData, batches, subset
from .evaluate import measure_cmi
from ..losses.logit import standardize_logits
from ..losses.teacher import kd_loss, mcmi_loss
from .runtime import check_model_input, freeze_teacher, memory_format
from ..utils import check_choice, check_float, check_int


class StopTraining(Exception):
    """Raised to stop training with a message (non-finite loss, collapse)."""


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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch accuracy as a 0-dim tensor (no host sync), in the default dtype (float64 when a test trains in it)."""
    return (logits.argmax(1) == labels).to(torch.get_default_dtype()).mean()


class MLLObjective(Objective):
    """Maximum log-likelihood: cross-entropy (optionally label-smoothed, a control teacher)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)

    def forward(self, model, images, labels, index=None):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.detach(), "acc": accuracy(logits, labels)}


def mll_objective(label_smoothing: float = 0.0) -> MLLObjective:
    return MLLObjective(label_smoothing)


#: Centroid updates of the MCMI objective (see MCMIObjective); the first is the default.
UPDATES = ("running", "epoch", "frozen", "ema")
#: Steps between two refreshes of update="running" (it also refreshes at the end of every epoch).
REFRESH_STEPS = 100
#: How a full centroid pass runs the model (see MCMIObjective); the first is the default.
CENTROID_PASSES = ("eval", "reference")


def reference_centroids(model: nn.Module, data: ImageData, epoch: int = 0, batch_size: int = 64) -> torch.Tensor:
    """The class centroids as the authors' reference code computes them: the model in train mode (BatchNorm with
    batch statistics, and its running statistics updated by the pass) over the shuffled, augmented training
    batches of `batch_size` (its loader's 64), under no_grad. The model's mode is restored afterwards."""
    was_training = model.training
    model.train()
    meter = CMIMeter(data.num_classes, device=data.device)
    try:
        with torch.no_grad():
            for images, labels in batches(data, batch_size, shuffle=True, augment=True, seed=0, epoch=epoch,
                                          rank=dist_utils.rank(), world_size=dist_utils.world_size()):
                meter.update(model(images).float(), labels)
    finally:
        model.train(was_training)
    meter.all_reduce()
    return meter.compute()["centroids"]


#: The collapse floor: a fine-tune whose eval-mode train accuracy falls below this fraction of its starting teacher's
#: is collapsed (issue 34: measured on the demo teacher, README "A broken teacher is never a dose": healthy dose
#: fine-tunes kept 0.85-0.95 of it at every epoch, collapsed ones fell to chance, 0.1-0.2 of it).
COLLAPSE_FRACTION = 0.5


def collapse_floor(start_acc: float, num_classes: int) -> float | None:
    """The eval-mode train accuracy below which a fine-tune of a teacher at `start_acc` has collapsed:
    :data:`COLLAPSE_FRACTION` of it; None when that is not clearly above chance (1.5/K): such a teacher cannot
    collapse, and no epoch of it is refused."""
    floor = COLLAPSE_FRACTION * float(start_acc)
    return floor if floor > 1.5 / max(int(num_classes), 2) else None


def check_target_cmi(target_cmi: float, num_classes: int) -> float:
    """A CMI target must lie in (0, log K): one line naming the bound otherwise."""
    if isinstance(target_cmi, bool) or not isinstance(target_cmi, (int, float)) or not math.isfinite(target_cmi):
        raise ValueError(f"target_cmi={target_cmi!r} is not accepted: expected a number in (0, log K)")
    if not 0 < target_cmi < math.log(num_classes):
        raise ValueError(f"target_cmi={target_cmi!r} is not accepted: expected a number in (0, log K) = "
                         f"(0, {math.log(num_classes):.4f}) nats for {num_classes} classes")
    return float(target_cmi)


class MCMIObjective(Objective):
    """CE − λ·KL(P_x ‖ Q_y) with centroids Q treated as constants (DESIGN.md §2).

    update: how the centroids follow the model. All start from one full pass of the starting model.
    "running" (the default) — every `refresh_steps` steps (default :data:`REFRESH_STEPS`) and at the end of every
    epoch, the class means of the training outputs since the last refresh: no extra pass, the outputs are the
    training steps' own. "epoch" — a full pass at the start of every epoch (costs that pass). "frozen" — fixed
    after the first pass, as in the reference code (whose pass is ``centroid_pass="reference"``). "ema" — a moving
    average of batch class means with `ema_decay`.
    Why the default: frozen centroids collapsed converged teachers at λ ≥ 0.5; a refresh per epoch was stable on
    70-step epochs but collapsed on 844-step ones, where a running refresh every 100 steps was stable (README,
    "The science, and the defaults we chose").
    centroid_pass: how the full passes above run the model. "eval" (the default): eval mode on the un-augmented
    training data: deterministic, no side effect on BatchNorm's running statistics, and the centroids of the model
    as it is evaluated and distilled from. "reference": as the authors' code (:func:`reference_centroids`): train
    mode over augmented batches, so BatchNorm uses batch statistics and the pass shifts its running statistics;
    "frozen" with it is the reference code's centroid step.
    A collapse guard stops the run when the train accuracy falls below half the starting model's eval-mode train
    accuracy (:func:`collapse_floor`). With a CMI target it reads the controller's eval-mode probe (the signal the
    dose selection reads, smoothed over ~50 steps as the batches' accuracy is, so that a brief dip does not stop a
    run that recovers): the training batches' own accuracy, with BatchNorm's batch statistics, stayed high in a
    teacher that had collapsed in eval mode (issue 34). With a fixed λ, where no eval pass runs, it reads the running accuracy of the batches.

    target_cmi: instead of a fixed `lam`, hold the model's train CMI at this dose (nats). λ starts at 0 and is
    adapted by a proportional-integral controller, the integral part being projected dual ascent on the Lagrange
    multiplier of the constraint CMI ≥ c: every `control_steps` steps the train CMI ĉ is measured in eval mode on a
    fixed stratified probe of the training data (`probe_size` samples; eval mode because BatchNorm's batch
    statistics make the training batches' own KL overstate the measured CMI 1.3-3x), the error is
    e = clip((s − ĉ)/c, −2, 1) against a set-point s that ramps linearly from the starting CMI to c over the first
    `ramp_updates` updates, and λ_I ← clip(λ_I + `control_gain`·e, 0, `max_lam`), λ = clip(λ_I + `control_kp`·e,
    0, `max_lam`). Why this shape (measured on the demo teacher, README): with pure dual ascent and a step to c,
    λ kept growing while the CMI lagged, then overshot and ran away (CMI keeps rising for a while even at λ = 0);
    the ramp keeps the lag small and the proportional part cuts λ at once when the CMI overshoots. The relative
    error makes one set of gains serve every dose. λ is a device tensor between updates (no host sync per step),
    is logged as "lam", and never goes below 0.
    """

    label = "MCMI"  # names the objective in the collapse message (CMIM and NCMI subclass it)

    def __init__(self, lam: float | None = None, centroids: torch.Tensor | None = None, update: str = UPDATES[0],
                 ema_decay: float = 0.999, guard: bool = True, refresh_steps: int | None = None, *,
                 target_cmi: float | None = None, control_steps: int = 25, control_gain: float = 0.2,
                 control_kp: float = 0.5, ramp_updates: int = 5, max_lam: float = 3.0, probe_size: int = 1024,
                 centroid_pass: str = CENTROID_PASSES[0]):
        super().__init__()
        self.centroid_pass = check_choice("centroid_pass", centroid_pass, CENTROID_PASSES)
        if (lam is None) == (target_cmi is None):
            raise ValueError(f"lam={lam!r} with target_cmi={target_cmi!r} is not accepted: give exactly one, a fixed "
                             "λ ≥ 0 or a CMI target in nats")
        self.lam = check_float("lam", lam, 0.0) if lam is not None else None
        self.target_cmi = check_float("target_cmi", target_cmi, 0.0, low_open=True) if target_cmi is not None else None
        self.control_steps = check_int("control_steps", control_steps, minimum=1)
        self.control_gain = check_float("control_gain", control_gain, 0.0, low_open=True)
        self.control_kp = check_float("control_kp", control_kp, 0.0)
        self.ramp_updates = check_int("ramp_updates", ramp_updates, minimum=1)
        self.max_lam = check_float("max_lam", max_lam, 0.0, low_open=True)
        self.probe_size = check_int("probe_size", probe_size, minimum=1)
        self.register_buffer("lam_t", torch.zeros(()))  # the controller's λ (target_cmi only)
        # the controller's state, checkpointed with the objective: its integral part, the probe CMI at the start
        # (-1: not measured yet) and the number of updates made (the set-point ramp's clock)
        self.register_buffer("lam_i", torch.zeros(()))
        self.register_buffer("start_cmi", torch.tensor(-1.0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # training steps seen, over all epochs: the controller acts every `control_steps` of them, also when an epoch
        # is shorter than that (a per-epoch count never reached 25 on data of < 1,600 images at batch 64, so λ
        # stayed 0); kept in a buffer at each epoch end, so a resume continues the count exactly
        self.register_buffer("control_count", torch.zeros((), dtype=torch.long))
        self._probe = None
        self._control_count = 0
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

    def prepare(self, model, data):
        empty = (data.class_counts() == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"data with empty classes {empty} is not accepted for MCMI training: every class needs "
                             "samples to define its centroid")
        if self.target_cmi is not None:
            check_target_cmi(self.target_cmi, data.num_classes)
            self._probe = data if len(data) <= self.probe_size else subset(data, self.probe_size, seed=0)

    def _control(self, model) -> None:
        """One PI step of λ from the probe's eval-mode CMI (a host sync, once per `control_steps`)."""
        probe = measure_cmi(getattr(model, "module", model), self._probe)
        probe_cmi = float(probe["cmi"])
        # the guard's eval-mode signal, smoothed over ~50 steps as the batches' running accuracy is (a brief dip of
        # a recovering run does not stop it): the weight of one probe is that of its `control_steps` steps
        self.recent_acc.lerp_(torch.tensor(float(probe["accuracy"])).to(self.recent_acc),
                              1 - 0.98 ** self.control_steps)
        if self.start_cmi < 0:
            self.start_cmi.fill_(probe_cmi)
        start = float(self.start_cmi)
        ramp = min(1.0, (int(self.updates) + 1) / self.ramp_updates)
        setpoint = start + (self.target_cmi - start) * ramp if start < self.target_cmi else self.target_cmi
        error = min(1.0, max(-2.0, (setpoint - probe_cmi) / self.target_cmi))
        self.lam_i.fill_(min(self.max_lam, max(0.0, float(self.lam_i) + self.control_gain * error)))
        self.lam_t.fill_(min(self.max_lam, max(0.0, float(self.lam_i) + self.control_kp * error)))
        self.updates += 1

    def on_epoch_start(self, model, data, epoch):
        self._control_count = int(self.control_count)  # one host read per epoch; a resume restores the buffer
        if self.centroids.numel() and self.update != "epoch":
            return
        first = self.start_acc < 0
        # the eval pass gives the eval-mode centroids and, before any training, the guard's starting accuracy; the
        # reference pass (which shifts BatchNorm's running statistics) comes after it and needs no second eval pass
        stats = measure_cmi(model, data) if first or self.centroid_pass == "eval" else None
        self.centroids = self._full_pass(model, data, epoch, stats).to(self.centroids.device)
        if first:
            self.start_acc.fill_(stats["accuracy"])
            self.recent_acc.fill_(stats["accuracy"])

    def _full_pass(self, model, data, epoch: int, stats: dict | None) -> torch.Tensor:
        """The centroids of one full pass (`stats`: the eval pass's measure_cmi, when it ran)."""
        return reference_centroids(model, data, epoch) if self.centroid_pass == "reference" else stats["centroids"]

    def _loss(self, logits, labels, lam):
        """(loss, terms) of the batch: CE − λ·KL (subclasses: CMIM, NCMI)."""
        return mcmi_loss(logits, labels, self.centroids, lam, return_terms=True)

    def forward(self, model, images, labels, index=None):
        if self.target_cmi is not None:
            self._control_count += 1
            if self._control_count % self.control_steps == 0:
                self._control(model)
        logits = model(images)
        lam = self.lam if self.target_cmi is None else self.lam_t
        loss, terms = self._loss(logits, labels, lam)
        if self.target_cmi is not None:
            terms["lam"] = self.lam_t.detach().clone()
        acc = accuracy(logits, labels)
        with torch.no_grad():
            if self.target_cmi is None:  # with a target, the probe's eval-mode accuracy is the guard's signal
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
        return loss, {**terms, "acc": acc}

    def on_epoch_end(self, model, data, epoch):
        self.control_count.fill_(self._control_count)
        if self.update == "running" and self._steps:
            self._refresh()

    def _refresh(self):
        self._set_means(self._sums, self._counts, 0.0)
        self._sums.zero_()
        self._counts.zero_()
        self._steps = 0

    def _class_sums(self, logits, labels):
        """Per-class sums of the batch's probabilities (K×K, float64) and the class counts (K×1)."""
        probs = self._centroid_probs(logits.detach().float()).double()
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, probs)
        return sums, torch.bincount(labels, minlength=sums.shape[0]).to(sums).unsqueeze(1)

    def _centroid_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows the centroids average: P_x (B, K); CMIM's concatenates its temperatures."""
        return logits.softmax(1)

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
        floor = collapse_floor(float(self.start_acc), self.centroids.shape[0])
        recent = float(self.recent_acc)
        if floor is not None and recent < floor:  # only a teacher well above chance can collapse
            signal = "eval-mode probe accuracy" if self.target_cmi is not None else "running train accuracy"
            raise StopTraining(
                f"{self.label} training collapsed with {self._knob()} (update={self.update!r}): {signal} fell "
                f"to {recent:.1%} from {float(self.start_acc):.1%}. KL(P_x ‖ Q_y) is unbounded, so a large λ pushes mass "
                f"onto classes the centroids barely cover; use a smaller lam, fresher centroids "
                f"(update='running' with fewer refresh_steps than {self.refresh_steps or REFRESH_STEPS}), or guard=False "
                f"to let it run")


    def _knob(self) -> str:
        return f"lam={self.lam:g}" if self.target_cmi is None else \
            f"target_cmi={self.target_cmi:g} (λ reached {float(self.lam_t):.3g})"


def mcmi_objective(lam: float | None = None, centroids: torch.Tensor | None = None, update: str = UPDATES[0],
                   ema_decay: float = 0.999, guard: bool = True, refresh_steps: int | None = None,
                   **target) -> MCMIObjective:
    """:class:`MCMIObjective` with a fixed `lam`, or with ``target_cmi=c`` (and the controller's options, and
    ``centroid_pass``)."""
    return MCMIObjective(lam, centroids, update, ema_decay, guard, refresh_steps, **target)


class KDObjective(Objective):
    """Hinton KD: ce_weight · CE + kd_weight · T²·KL(teacher_T ‖ student_T). The teacher stays frozen in eval mode.

    logit_standardization: Z-score both logits first (Sun et al., CVPR 2024, https://arxiv.org/abs/2403.01427;
    :func:`mcmi_lab.losses.logit.standardize_logits`); the paper's CIFAR runs pair it with temperature 2 and
    kd_weight 9."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 0.9, ce_weight: float = 0.1,
                 logit_standardization: bool = False):
        super().__init__()
        self.__dict__["teacher"] = teacher  # not a submodule: not trained, not in state_dict, never set to train()
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.kd_weight = check_float("kd_weight", kd_weight, 0.0)
        self.ce_weight = check_float("ce_weight", ce_weight, 0.0)
        if not isinstance(logit_standardization, bool):
            raise ValueError(f"logit_standardization={logit_standardization!r} is not accepted: expected True or False")
        self.logit_standardization = logit_standardization

    def prepare(self, model, data):
        check_model_input(self.teacher, data, "the teacher")
        freeze_teacher(self.teacher, data.device, memory_format(model))

    def forward(self, model, images, labels, index=None):
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        s, t = (standardize_logits(logits.float()), standardize_logits(teacher_logits.float())) \
            if self.logit_standardization else (logits, teacher_logits)
        kd = kd_loss(s, t, self.temperature)
        return self.ce_weight * ce + self.kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach(),
                                                           "acc": accuracy(logits, labels)}


def kd_objective(teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 0.9,
                 ce_weight: float = 0.1, logit_standardization: bool = False) -> KDObjective:
    return KDObjective(teacher, temperature, kd_weight, ce_weight, logit_standardization)
