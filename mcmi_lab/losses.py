"""Loss functions of the teacher side: the MCMI objective and Hinton's KD loss. Pure functions of tensors.

The feature-based KD losses (FitNet, AT, ... CRD, DKD) live in :mod:`mcmi_lab.kd`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch. Both (B, K)."""
    log_s = torch.log_softmax(_upcast(student_logits) / temperature, dim=1)
    log_t = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2
