"""Loss functions of the teacher side — MCMI, the MSE teacher, the CMI minimiser (CMIM), the NCMI-weighted
objective — and Hinton's KD loss. Pure functions of tensors; the objectives of :mod:`mcmi_lab.training.teacher_objectives`
call them.

The feature-based KD losses (FitNet, AT, ... CRD, DKD) live in :mod:`mcmi_lab.losses.feature`.
"""
from __future__ import annotations

import math

from typing import Sequence

import torch
import torch.nn.functional as F

from ..metrics.cmi import _separation_from_sums

_TINY = 1e-30


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) to float32; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl_to_centroids_loss(logits: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """mean_x KL(P_x ‖ Q_y), differentiable in the logits; the centroids are constants (detached).

    logits: (B, K), labels: (B,), centroids: (K, K). Computed in float32 at least.
    """
    logp = torch.log_softmax(_upcast(logits), dim=1)
    logq = torch.log(centroids.detach().to(logp.dtype).clamp_min(_TINY))[labels]
    return (logp.exp() * (logp - logq)).sum(dim=1).mean()


def mcmi_loss(logits: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, lam: float | torch.Tensor,
              return_terms: bool = False):
    """The MCMI objective (minimised): CE(f(x), y) − λ · KL(P_x ‖ Q_y), λ ≥ 0, centroids constant.

    Minimising it maximises the log-likelihood AND the conditional mutual information I(X; Ŷ | Y) = E[KL(P_X ‖ Q_Y)].
    (The reference code writes `CE + w·KL` with w = −λ; a positive w minimises CMI instead — the sign is pinned by
    tests/test_losses.py.) Ye et al., arXiv:2401.08732.

    lam: a number ≥ 0, or a 0-dim tensor (the CMI-target controller's λ, kept on the device: not checked, no sync).
    return_terms: also return ``{"ce": ..., "kl": ...}`` (detached) — what the MCMI objective logs.
    """
    if not isinstance(lam, torch.Tensor):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam={lam!r} is not accepted: expected a finite number >= 0 (a negative λ minimises "
                             "CMI instead of maximising it)")
    ce = F.cross_entropy(_upcast(logits), labels)
    kl = kl_to_centroids_loss(logits, labels, centroids)
    loss = ce - lam * kl
    return (loss, {"ce": ce.detach(), "kl": kl.detach()}) if return_terms else loss


def _check_weight(name: str, lam) -> None:
    if isinstance(lam, torch.Tensor):
        return
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{name}={lam!r} is not accepted: expected a finite number >= 0")


def mse_teacher_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The MSE teacher (Hamidi et al., ECCV 2024, https://arxiv.org/abs/2407.12676): the batch mean of
    Σ_k (softmax(z)_k − 1[k = y])², the squared error between the output distribution and the one-hot label.

    logits: (B, K), labels: (B,). Computed in float32 at least."""
    probs = torch.softmax(_upcast(logits), dim=1)
    return (probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)).pow(2).sum(1).mean()


def cmim_loss(logits: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, lam: float | torch.Tensor,
              temperatures: Sequence[float], return_terms: bool = False):
    """The CMI minimiser (Ye, Hamidi & Yang, "Towards undistillable models by minimizing conditional mutual
    information", https://arxiv.org/abs/2507.00012): CE(f(x), y) + λ · mean_T KL(softmax(z/T) ‖ Q_y^T).

    The opposite sign of :func:`mcmi_loss`, over the temperature-scaled outputs: Q^T (the class centroids of
    softmax(z/T)) are constants. The paper averages the CMI of the temperature-scaled clusters over "the entire
    temperature spectrum"; here over the finite set `temperatures` (a mean, so λ does not scale with its size).
    logits: (B, K), labels: (B,), centroids: (len(temperatures), K, K). return_terms: also ``{"ce", "kl"}``.
    """
    _check_weight("lam", lam)
    if centroids.dim() != 3 or len(centroids) != len(temperatures):
        raise ValueError(f"centroids {tuple(centroids.shape)} are not accepted: expected ({len(temperatures)}, K, K), "
                         "one K x K block per temperature")
    ce = F.cross_entropy(_upcast(logits), labels)
    kl = torch.stack([kl_to_centroids_loss(_upcast(logits) / t, labels, q)
                      for t, q in zip(temperatures, centroids)]).mean()
    loss = ce + lam * kl
    return (loss, {"ce": ce.detach(), "kl": kl.detach()}) if return_terms else loss


def _batch_separation(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Γ of :func:`mcmi_lab.metrics.cmi.separation` (pairs="all", the same O(N·K) sums) without its label checks, which
    sync with the host: once per training step would stall the device."""
    p = probs.double()
    sum_p = torch.zeros(num_classes, p.shape[1], dtype=p.dtype, device=p.device).index_add(0, labels, p)
    sum_logp = torch.zeros_like(sum_p).index_add(0, labels, torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)))
    counts = torch.bincount(labels, minlength=num_classes).to(p.dtype)
    return _separation_from_sums(sum_p, sum_logp, counts, "all")


def ncmi_loss(logits: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, lam: float | torch.Tensor,
              return_terms: bool = False):
    """CE + λ · KL/Γ: the NCMI-weighted objective after Yang et al. (CMI-constrained deep learning, TNNLS 2025;
    the NCMI surrogate loss, https://arxiv.org/abs/2601.02543).

    KL = mean_x KL(P_x ‖ Q_y) with the centroids Q constant (the batch estimate of the CMI, as in :func:`mcmi_loss`);
    Γ = :func:`mcmi_lab.metrics.cmi.separation` of the batch's P_x (``pairs="all"``: the mean cross entropy over all ordered
    pairs, same-label pairs counting 0), differentiable, so minimising the ratio also pushes the clusters apart.
    Where this differs from the papers: CMIC-DL writes the constrained problem as CE + λ·CMI − β·Γ (two weights) and
    its reference code estimates Γ over the different-label pairs only; this is the single ratio NCMI = CMI/Γ that
    the surrogate-loss paper targets, estimated on the batch. logits: (B, K), labels: (B,), centroids: (K, K).
    """
    _check_weight("lam", lam)
    ce = F.cross_entropy(_upcast(logits), labels)
    kl = kl_to_centroids_loss(logits, labels, centroids)
    gamma = _batch_separation(torch.softmax(_upcast(logits), dim=1), labels, centroids.shape[0]).to(kl.dtype)
    ratio = kl / gamma.clamp_min(_TINY)
    loss = ce + lam * ratio
    return (loss, {"ce": ce.detach(), "kl": kl.detach(), "separation": gamma.detach(),
                   "ncmi": ratio.detach()}) if return_terms else loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch. Both (B, K)."""
    log_s = torch.log_softmax(_upcast(student_logits) / temperature, dim=1)
    log_t = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2
