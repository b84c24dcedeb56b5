"""The teacher objectives in one registry, :data:`TEACHER_OBJECTIVES` (name -> factory(**hparams) -> Objective, as
:data:`mcmi_lab.kd.KD_METHODS` for the students), and the objectives that are not in :mod:`mcmi_lab.training.objectives`.

* ``mll`` — cross-entropy (maximum log-likelihood), optionally label-smoothed;
* ``label_smoothing`` — the same with ε = 0.1 by default (the label-smoothing control teacher);
* ``mcmi`` — CE − λ·KL(P_x ‖ Q_y) (Ye et al., arXiv:2401.08732; :class:`mcmi_lab.training.objectives.MCMIObjective`);
* ``mse`` — Σ_k (softmax(z)_k − 1[k = y])² (Hamidi et al., ECCV 2024; :func:`mcmi_lab.losses.teacher.mse_teacher_loss`);
* ``cmim`` — CE + λ·mean_T KL(softmax(z/T) ‖ Q_y^T), the CMI minimiser (Ye, Hamidi & Yang, arXiv:2507.00012;
  :func:`mcmi_lab.losses.teacher.cmim_loss`): MCMI's opposite sign over temperature-scaled outputs;
* ``ncmi`` — CE + λ·KL/Γ (Yang et al., CMI-constrained deep learning; :func:`mcmi_lab.losses.teacher.ncmi_loss`).

CMIM and NCMI use MCMI's centroid machinery (``update``: "running", "epoch", "frozen", "ema"; a full eval pass at the
start) and its collapse guard. Each objective calls the pure loss that tests/test_teacher_objectives.py pins.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .evaluate import measure_cmi
from ..losses.teacher import cmim_loss, mse_teacher_loss, ncmi_loss
from .objectives import (UPDATES, MCMIObjective, MLLObjective, Objective, accuracy, mcmi_objective,
                         mll_objective)
from ..utils import check_float

#: CMIM's default temperature set: a log-spaced grid over the usual KD temperatures (our choice; the paper's
#: "entire temperature spectrum" is not given as a finite set).
CMIM_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


class MSEObjective(Objective):
    """The MSE teacher (Hamidi et al., "How to train the teacher model for effective knowledge distillation",
    ECCV 2024, https://arxiv.org/abs/2407.12676): the squared error between softmax(z) and the one-hot label.
    Terms: "mse" (the loss), "ce" (reported only), "acc"."""

    def forward(self, model, images, labels, index=None):
        logits = model(images)
        loss = mse_teacher_loss(logits, labels)
        with torch.no_grad():
            ce = F.cross_entropy(logits.float(), labels)
        return loss, {"mse": loss.detach(), "ce": ce, "acc": accuracy(logits, labels)}


class CMIMObjective(MCMIObjective):
    """CE + λ·mean_T KL(softmax(z/T) ‖ Q_y^T) (:func:`mcmi_lab.losses.teacher.cmim_loss`), Q^T the class centroids of the
    temperature-scaled outputs, treated as constants and updated as MCMI's (`update`, `refresh_steps`,
    `ema_decay`; the full passes in eval mode). Minimising it lowers the CMI of every temperature-scaled cluster:
    the "undistillable" teacher of Ye, Hamidi & Yang (https://arxiv.org/abs/2507.00012). λ = 0.5 by default (the
    pipelines' λ; the paper tunes it per data set).

    The centroids are kept as one (K, n_T·K) block (row y: Q_y^{T_1}, ..., Q_y^{T_n}) so that MCMI's running, EMA and
    distributed updates apply unchanged."""

    label = "CMIM"

    def __init__(self, lam: float = 0.5, temperatures: Sequence[float] = CMIM_TEMPERATURES,
                 update: str = UPDATES[0], ema_decay: float = 0.999, guard: bool = True,
                 refresh_steps: int | None = None):
        super().__init__(lam, None, update, ema_decay, guard, refresh_steps)
        try:
            self.temperatures = tuple(check_float("temperatures", t, 0.0, low_open=True) for t in temperatures)
        except (TypeError, ValueError):
            self.temperatures = ()
        if not self.temperatures:
            raise ValueError(f"temperatures={temperatures!r} is not accepted: expected a non-empty list of numbers > 0")

    def _full_pass(self, model, data, epoch, stats):
        return torch.cat([measure_cmi(model, data, temperature=t)["centroids"] for t in self.temperatures], dim=1)

    def _centroid_probs(self, logits):
        return torch.cat([(logits / t).softmax(1) for t in self.temperatures], dim=1)

    def _loss(self, logits, labels, lam):
        k = self.centroids.shape[0]
        blocks = self.centroids.view(k, len(self.temperatures), k).transpose(0, 1)
        return cmim_loss(logits, labels, blocks, lam, self.temperatures, return_terms=True)


class NCMIObjective(MCMIObjective):
    """CE + λ·KL(P_x ‖ Q_y)/Γ (:func:`mcmi_lab.losses.teacher.ncmi_loss`): the batch NCMI as a penalty, Q_y constants updated
    as MCMI's, Γ the batch's separation (differentiable). After Yang et al., CMI-constrained deep learning (TNNLS
    2025) and the NCMI surrogate loss (https://arxiv.org/abs/2601.02543); the differences are in ncmi_loss's
    docstring. λ = 0.5 by default (the pipelines' λ, not the papers'). Terms add "separation" and "ncmi"."""

    label = "NCMI"

    def __init__(self, lam: float = 0.5, update: str = UPDATES[0], ema_decay: float = 0.999, guard: bool = True,
                 refresh_steps: int | None = None):
        super().__init__(lam, None, update, ema_decay, guard, refresh_steps)

    def _loss(self, logits, labels, lam):
        return ncmi_loss(logits, labels, self.centroids, lam, return_terms=True)


def label_smoothing_objective(label_smoothing: float = 0.1) -> MLLObjective:
    """The label-smoothing control teacher: cross-entropy on labels smoothed by ε (0.1, the pipelines' default)."""
    return MLLObjective(label_smoothing)


#: objective name -> factory(**hparams) -> Objective.
TEACHER_OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "mll": mll_objective,
    "label_smoothing": label_smoothing_objective,
    "mcmi": mcmi_objective,
    "mse": MSEObjective,
    "cmim": CMIMObjective,
    "ncmi": NCMIObjective,
}


def _factory(objective: str) -> Callable[..., Objective]:
    if not isinstance(objective, str) or objective.lower() not in TEACHER_OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not accepted: expected one of {', '.join(TEACHER_OBJECTIVES)}")
    return TEACHER_OBJECTIVES[objective.lower()]


def teacher_objective_hparams(objective: str) -> dict:
    """The hyper-parameters of a teacher objective's factory, with their defaults (MCMI's include its controller's)."""
    factory = _factory(objective)
    sig = inspect.signature(MCMIObjective.__init__ if factory is mcmi_objective else factory)
    return {p.name: p.default for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def build_teacher_objective(objective: str, **hparams) -> Objective:
    """The objective `objective` of :data:`TEACHER_OBJECTIVES` with `hparams` over its defaults; an unknown name or
    a hyper-parameter of another objective is one line naming what is accepted."""
    factory = _factory(objective)
    accepted = teacher_objective_hparams(objective)
    unknown = [k for k in hparams if k not in accepted]
    if unknown:
        raise ValueError(f"{unknown[0]}={hparams[unknown[0]]!r} is not accepted for objective {objective!r}: expected "
                         f"a TrainConfig field or one of {', '.join(accepted) or '(none)'}")
    return factory(**hparams)
