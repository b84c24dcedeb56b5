"""The KD methods on logits: DKD, DIST, CTKD and MLKD as objectives for :func:`mcmi_lab.training.loop.fit` (Hinton KD is
:class:`mcmi_lab.training.objectives.KDObjective`). Each calls the pure loss of :mod:`mcmi_lab.losses.logit`; the defaults
are the authors' CIFAR-100 ones. ``logit_standardization=True`` (KD, DKD, MLKD, CTKD) Z-scores both logits first
(Sun et al., CVPR 2024, :func:`mcmi_lab.losses.logit.standardize_logits`; for MLKD only at the instance level, as
their ``MLKD.py``); the paper pairs it with a base
temperature 2 and a KD weight 9 (its README), which these objectives leave to the caller.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.logit import ctkd_temperature, dist_loss, dkd_loss, mlkd_loss, standardize_logits
from ..losses.teacher import kd_loss
from ..training.objectives import Objective, accuracy
from ..training.runtime import check_model_input, freeze_teacher, memory_format
from ..utils import check_float, check_int


class LogitObjective(Objective):
    """ce_weight · CE + the method's loss on (student, teacher) logits; the teacher frozen in eval mode.

    Subclasses implement `method_loss(student_logits, teacher_logits, labels) -> (weighted loss, terms)`; with
    `logit_standardization` both logits reach it Z-scored, unless the subclass sets `standardizes_itself` (then it
    gets the raw logits and applies the flag where its authors do). `self.epoch` is the 0-based epoch."""

    standardizes_itself = False

    def __init__(self, teacher: nn.Module, ce_weight: float, logit_standardization: bool = False):
        super().__init__()
        self.__dict__["teacher"] = teacher  # not a submodule: not trained, not in state_dict, never set to train()
        self.ce_weight = check_float("ce_weight", ce_weight, 0.0)
        if not isinstance(logit_standardization, bool):
            raise ValueError(f"logit_standardization={logit_standardization!r} is not accepted: expected True or False")
        self.logit_standardization = logit_standardization
        self.epoch = 0

    def prepare(self, model, data):
        check_model_input(self.teacher, data, "the teacher")
        freeze_teacher(self.teacher, data.device, memory_format(model))

    def on_epoch_start(self, model, data, epoch):
        self.epoch = epoch

    def method_loss(self, student_logits, teacher_logits, labels) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def forward(self, model, images, labels, index=None):
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        s, t = logits.float(), teacher_logits.float()
        if self.logit_standardization and not self.standardizes_itself:
            s, t = standardize_logits(s), standardize_logits(t)
        method, terms = self.method_loss(s, t, labels)
        return self.ce_weight * ce + method, {"ce": ce.detach(), **terms, "acc": accuracy(logits, labels)}


class DKDObjective(LogitObjective):
    """Decoupled KD (Zhao et al., 2022; mdistiller): ce_weight · CE + min(epoch/warmup, 1) · (α·TCKD + β·NCKD),
    CIFAR defaults α 1, β 8, T 4, warmup 20 epochs (epochs counted from 1, as mdistiller). Term "dkd" is unwarmed."""

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20, ce_weight: float = 1.0, logit_standardization: bool = False):
        super().__init__(teacher, ce_weight, logit_standardization)
        self.alpha = check_float("alpha", alpha, 0.0)
        self.beta = check_float("beta", beta, 0.0)
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.warmup = check_int("warmup", warmup, minimum=0)

    def method_loss(self, s, t, labels):
        dkd = dkd_loss(s, t, labels, self.alpha, self.beta, self.temperature)
        ramp = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        return ramp * dkd, {"dkd": dkd.detach()}


class DISTObjective(LogitObjective):
    """DIST (Huang et al., NeurIPS 2022, https://arxiv.org/abs/2205.10536): ce_weight · CE + kd_weight ·
    τ²(β·inter + γ·intra) (:func:`mcmi_lab.losses.logit.dist_loss`). Defaults: the authors' CIFAR-100 config
    (github.com/hunto/image_classification_sota, ``dist_cifar.yaml``: kd ``dist_t4``, CE weight 1, KD weight 2,
    β = γ = 1)."""

    def __init__(self, teacher: nn.Module, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0,
                 kd_weight: float = 2.0, ce_weight: float = 1.0):
        super().__init__(teacher, ce_weight)
        self.beta = check_float("beta", beta, 0.0)
        self.gamma = check_float("gamma", gamma, 0.0)
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.kd_weight = check_float("kd_weight", kd_weight, 0.0)

    def method_loss(self, s, t, labels):
        dist = dist_loss(s, t, self.beta, self.gamma, self.temperature)
        return self.kd_weight * dist, {"dist": dist.detach()}


def ctkd_lambda(epoch: int, decay_epochs: int = 10, max_lambda: float = 1.0) -> float:
    """CTKD's curriculum: the reversal strength λ = max_lambda · (1 − cos(π·i/n))/2 at epoch i (from 1), capped at
    n = `decay_epochs` (the authors' ``CosineDecay`` from 0 to −1 over 10 loops, sign folded into the reversal)."""
    i = min(max(epoch, 0), decay_epochs)
    return max_lambda * (1 - math.cos(math.pi * i / decay_epochs)) / 2 if decay_epochs else max_lambda


class CTKDObjective(LogitObjective):
    """Curriculum temperature KD (Li et al., AAAI 2023, https://arxiv.org/abs/2211.16231), its global variant:
    ce_weight · CE + kd_weight · T²·KL(teacher_T ‖ student_T) with one learnable temperature
    T = t_start + t_end · sigmoid(θ) (θ starts at 1, trained by fit with the student) reached through a gradient
    reversal of strength :func:`ctkd_lambda`, so T is pushed to raise the loss the student lowers, more with every
    epoch up to `decay_epochs`. Defaults from the CTKD code in github.com/sunshangquan/logit-standardization-KD
    (``CTKD/``; zju-SWJ/CTKD itself was not available here): t_start 1, t_end 20, λ 0 → 1 over 10 epochs, Hinton's
    weights 0.1 / 0.9. Term "temperature" is T."""

    def __init__(self, teacher: nn.Module, t_start: float = 1.0, t_end: float = 20.0, decay_epochs: int = 10,
                 max_lambda: float = 1.0, kd_weight: float = 0.9, ce_weight: float = 0.1,
                 logit_standardization: bool = False):
        super().__init__(teacher, ce_weight, logit_standardization)
        self.t_start = check_float("t_start", t_start, 0.0, low_open=True)
        self.t_end = check_float("t_end", t_end, 0.0)
        self.decay_epochs = check_int("decay_epochs", decay_epochs, minimum=0)
        self.max_lambda = check_float("max_lambda", max_lambda, 0.0)
        self.kd_weight = check_float("kd_weight", kd_weight, 0.0)
        self.global_t = nn.Parameter(torch.ones(()))  # CTKD's Global_T: θ = 1

    def method_loss(self, s, t, labels):
        temperature = ctkd_temperature(self.global_t, ctkd_lambda(self.epoch + 1, self.decay_epochs, self.max_lambda),
                                       self.t_start, self.t_end)
        kd = kd_loss(s, t, temperature)
        return self.kd_weight * kd, {"kd": kd.detach(), "temperature": temperature.detach()}


class MLKDObjective(LogitObjective):
    """Multi-level logit distillation (Jin et al., CVPR 2023): ce_weight · CE + kd_weight · the instance-, class- and
    batch-level alignment over the temperatures `temperature` and `extra_temperatures`
    (:func:`mcmi_lab.losses.logit.mlkd_loss`), defaults those of the authors' code
    (github.com/Jin-Ying/Multi-Level-Logit-Distillation: weights 0.1 / 0.9, T = 4 and the fixed 3, 5, 2, 6).

    ``logit_standardization=True`` Z-scores the logits of the instance level only; the class and batch levels take
    the raw logits, as Sun et al.'s ``MLKD.py`` (github.com/sunshangquan/logit-standardization-KD) does.

    Differences from that code, because fit's loop gives one view per batch: no strongly augmented second view
    (the authors add a second CE and the instance terms again on it; its class- and batch-level terms are computed
    but not added to the loss), and no confidence masks (the authors multiply the weak view's instance and batch
    terms by the share of samples below the median teacher confidence, and the class term by the share of classes
    below the median class confidence: scalars, as their per-sample reduction is commented out). Terms "mlkd"
    (unweighted) and its parts "mlkd_instance", "mlkd_class", "mlkd_batch"."""

    standardizes_itself = True

    def __init__(self, teacher: nn.Module, temperature: float = 4.0,
                 extra_temperatures: Sequence[float] = (3.0, 5.0, 2.0, 6.0), kd_weight: float = 0.9,
                 ce_weight: float = 0.1, logit_standardization: bool = False):
        super().__init__(teacher, ce_weight, logit_standardization)
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        try:
            extra = tuple(check_float("extra_temperatures", v, 0.0, low_open=True) for v in extra_temperatures)
        except (TypeError, ValueError):
            raise ValueError(f"extra_temperatures={extra_temperatures!r} is not accepted: expected a list of numbers "
                             "> 0") from None
        self.temperatures = (self.temperature, *extra)
        self.kd_weight = check_float("kd_weight", kd_weight, 0.0)

    def method_loss(self, s, t, labels):
        mlkd, parts = mlkd_loss(s, t, self.temperatures, return_terms=True,
                                standardize_instance=self.logit_standardization)
        return self.kd_weight * mlkd, {"mlkd": mlkd.detach(), **{f"mlkd_{k}": v for k, v in parts.items()}}
