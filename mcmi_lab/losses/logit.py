"""The KD losses on logits as pure tensor functions: DKD, DIST, MLKD, logit standardisation and CTKD's adversarial
temperature. Logits are ``(B, K)``; every loss runs in float32 at least with autocast off (as
:mod:`mcmi_lab.losses.feature`). Hinton's KD loss is :func:`mcmi_lab.losses.teacher.kd_loss`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .feature import _float32

_EPS_STD = 1e-7   # the logit-standardisation code's eps (added to the standard deviation)
_EPS_COS = 1e-8   # DIST's eps in the cosine similarity


def standardize_logits(logits: torch.Tensor, eps: float = _EPS_STD) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024, https://arxiv.org/abs/2403.01427): the Z-score per sample,
    (z − mean_k z) / (eps + std_k z), std the unbiased one (torch's default, as the authors' ``normalize``).
    (B, K) -> (B, K). Invariant to z -> a·z + b (a > 0), so the student need not match the teacher's logit range."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (eps + logits.std(dim=-1, keepdim=True))


@_float32
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., 2022, https://arxiv.org/abs/2203.08679): α·TCKD + β·NCKD, both × T², batch mean.

    TCKD = KL(b_t ‖ b_s) over the binary (target, rest) probabilities of softmax(z/T); NCKD = KL(p̂_t ‖ p̂_s) over
    softmax(z/T) restricted to the non-target classes. Computed in log space (stable where p → 0)."""
    b, k = student_logits.shape
    gt = F.one_hot(labels, k).bool()

    def binary(z):
        logp = torch.log_softmax(z / temperature, dim=1)
        log_target = logp[gt]
        log_rest = torch.logsumexp(logp.masked_fill(gt, float("-inf")), dim=1)
        return torch.stack([log_target, log_rest], dim=1)

    def non_target(z):
        return torch.log_softmax((z / temperature)[~gt].view(b, k - 1), dim=1)

    tckd = F.kl_div(binary(student_logits), binary(teacher_logits), reduction="batchmean", log_target=True)
    nckd = F.kl_div(non_target(student_logits), non_target(teacher_logits), reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: (N, M), (N, M) -> (N,). DIST's eps 1e-8."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS_COS)


@_float32
def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., "Knowledge distillation from a stronger teacher", NeurIPS 2022,
    https://arxiv.org/abs/2205.10536), as the authors' ``DIST`` module: with Y = softmax(z/τ) (B, K),
    τ²·(β·(1 − mean_i ρ(Y_s[i], Y_t[i])) + γ·(1 − mean_k ρ(Y_s[:, k], Y_t[:, k]))), ρ the Pearson correlation:
    the inter-class relation per sample and the intra-class relation per class over the batch."""
    y_s = torch.softmax(student_logits / temperature, dim=1)
    y_t = torch.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@_float32
def mlkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0), return_terms: bool = False,
              standardize_instance: bool = False):
    """Multi-level logit distillation (Jin et al., CVPR 2023) on one batch: over the temperatures T, with
    P = softmax(z/T) (B, K), the instance level T²·KL(P_t ‖ P_s) (batch mean), the class level
    ‖P_tᵀP_t − P_sᵀP_s‖²_F / K and the batch level ‖P_tP_tᵀ − P_sP_sᵀ‖²_F / B, all summed.

    The authors' code (github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``KD_ours``) also computes them on a
    strongly augmented view and multiplies the weak view's terms by the share of samples (classes) below the median
    teacher confidence; those parts are not here (see :class:`mcmi_lab.kd.logit.MLKDObjective`).
    return_terms: also return ``{"instance", "class", "batch"}`` (detached). standardize_instance: the instance level
    on Z-scored logits (:func:`standardize_logits`), the class and batch levels on the raw ones, as Sun et al.'s
    ``MLKD.py`` (github.com/sunshangquan/logit-standardization-KD) applies logit standardisation to MLKD."""
    b, k = student_logits.shape
    z_s, z_t = ((standardize_logits(student_logits), standardize_logits(teacher_logits)) if standardize_instance
                else (student_logits, teacher_logits))
    instance = class_level = batch_level = student_logits.new_zeros(())
    for t in temperatures:
        log_s, log_t = torch.log_softmax(z_s / t, 1), torch.log_softmax(z_t / t, 1)
        instance = instance + F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * t**2
        p_s, p_t = torch.softmax(student_logits / t, 1), torch.softmax(teacher_logits / t, 1)
        class_level = class_level + (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / k
        batch_level = batch_level + (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / b
    loss = instance + class_level + batch_level
    terms = {"instance": instance.detach(), "class": class_level.detach(), "batch": batch_level.detach()}
    return (loss, terms) if return_terms else loss


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def gradient_reversal(x: torch.Tensor, lam: float) -> torch.Tensor:
    """The identity forward; the gradient times −lam backward (Ganin & Lempitsky, 2015), as CTKD's ``Global_T``."""
    return _GradientReversal.apply(x, float(lam))


def ctkd_temperature(param: torch.Tensor, lam: float, t_start: float = 1.0, t_end: float = 20.0) -> torch.Tensor:
    """CTKD's learnable temperature (Li et al., "Curriculum temperature for knowledge distillation", AAAI 2023,
    https://arxiv.org/abs/2211.16231): T = t_start + t_end · sigmoid(θ), θ reached through a gradient reversal of
    strength `lam`, so that the step that lowers the distillation loss for the student raises it in θ."""
    return t_start + t_end * torch.sigmoid(gradient_reversal(param, lam))
