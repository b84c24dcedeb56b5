"""The KD method losses as pure tensor functions, in the form RepDistiller / mdistiller compute them.

Features are stage outputs ``(B, C, H, W)`` or pooled vectors ``(B, D)``; logits ``(B, K)``. Every loss upcasts to
float32 and runs with autocast off (matrix products of bf16 features lose the small differences these losses
measure). Where a pair of feature maps differs in spatial size, the larger one is average-pooled to the smaller
(:func:`match_spatial`), as RepDistiller does. Hinton's KD loss is :func:`mcmi_lab.losses.teacher.kd_loss`; the losses on
logits (DKD, DIST, MLKD, logit standardisation, CTKD's temperature) are in :mod:`mcmi_lab.losses.logit`.
Tian et al., Contrastive Representation Distillation (the benchmark these forms come from),
https://arxiv.org/abs/1910.10699.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-7  # RepDistiller's eps for PKT and the NCE loss


def _float32(fn):
    """Run `fn` with its tensor arguments (and lists of tensors) in float32 and autocast disabled."""
    def up(x):
        if isinstance(x, torch.Tensor):
            return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
        if isinstance(x, (list, tuple)):
            return type(x)(up(v) for v in x)
        return x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next(t for t in (*args, *kwargs.values()) if isinstance(t, (torch.Tensor, list, tuple)))
        device = (first if isinstance(first, torch.Tensor) else first[0]).device.type
        with torch.autocast(device, enabled=False):
            return fn(*up(args), **{k: up(v) for k, v in kwargs.items()})
    return wrapper


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the spatially larger of two (B, C, H, W) maps to the other's (H, W); 2-D inputs pass."""
    if a.dim() < 4 or a.shape[2:] == b.shape[2:]:
        return a, b
    if a.shape[2] * a.shape[3] > b.shape[2] * b.shape[3]:
        return F.adaptive_avg_pool2d(a, b.shape[2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[2:])


# ---- feature maps ---------------------------------------------------------------------------------------------

@_float32
def hint_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """FitNet (Romero et al., 2015, https://arxiv.org/abs/1412.6550): mean (r(F_s) − F_t)², the student map already
    passed through its regressor r. Same shapes."""
    return F.mse_loss(student_feats, teacher_feats)


def attention_map(feats: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = normalize(mean_c |F_c|^p) flattened: (B, C, H, W) -> (B, H·W), unit L2 norm per sample.

    RepDistiller computes `f.pow(p)` (no absolute value); for the default even p the two agree."""
    return F.normalize(feats.pow(p).mean(1).flatten(1), dim=1)


@_float32
def at_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017, https://arxiv.org/abs/1612.03928), one pair of maps:
    mean_{b, hw} (Q_s − Q_t)² with Q = :func:`attention_map`. RepDistiller's form (squared, averaged)."""
    s, t = match_spatial(student_feats, teacher_feats)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


@_float32
def similarity_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """Similarity preserving (Tung & Mori, 2019, https://arxiv.org/abs/1907.09682):
    ‖G_t − G_s‖²_F / B² with G = row-L2-normalised F·Fᵀ over the flattened features (B, ·). Channels may differ."""
    b = student_feats.shape[0]
    s, t = student_feats.reshape(b, -1), teacher_feats.reshape(b, -1)
    g_s, g_t = F.normalize(s @ s.t(), dim=1), F.normalize(t @ t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


@_float32
def correlation_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
    """Correlation congruence (Peng et al., 2019, https://arxiv.org/abs/1904.01802) in the form of the authors' code
    that RepDistiller runs: with δ = |e_s − e_t| (B, D) over embedded features, mean_{i<B} Σ_d δ_i,d · δ_{i+1},d."""
    delta = (student_embed - teacher_embed).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@_float32
def vid_loss(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn et al., 2019, https://arxiv.org/abs/1904.05835): the Gaussian
    negative log-likelihood mean ½((μ − t)²/σ² + log σ²) with σ²_c = softplus(log_scale_c) + eps per channel.

    pred_mean, target: (B, C, H, W) or (B, C); log_scale: (C,). Minimal in μ at μ = t."""
    var = (F.softplus(log_scale) + eps).view(1, -1, *([1] * (target.dim() - 2)))
    return (0.5 * ((pred_mean - target).pow(2) / var + var.log())).mean()


def _pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))  # exact zeros on the diagonal


def _angles(x: torch.Tensor) -> torch.Tensor:
    e = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # e[i, j] = unit(x_j − x_i)
    return torch.bmm(e, e.transpose(1, 2)).flatten()     # cos of the angle at vertex i between j and k


@_float32
def rkd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., 2019, https://arxiv.org/abs/1904.05068), RepDistiller's weights 25 / 50:
    w_d · Huber(ψ_D(s), ψ_D(t)) + w_a · Huber(ψ_A(s), ψ_A(t)), ψ_D the pairwise distances over their mean
    (non-zero entries), ψ_A the cosines of all B³ triplet angles; Huber = smooth L1 (δ = 1), averaged."""
    b = student_feats.shape[0]
    s, t = student_feats.reshape(b, -1), teacher_feats.reshape(b, -1).detach()
    d_t = _pairwise_distances(t)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = _pairwise_distances(s)
    d_s = d_s / d_s[d_s > 0].mean()
    return distance_weight * F.smooth_l1_loss(d_s, d_t) + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))


@_float32
def pkt_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018, https://arxiv.org/abs/1803.10837):
    with cosine kernels K_ij = (1 + cos(f_i, f_j)) / 2 normalised per row into P (student) and Q (teacher),
    mean_{i,j} Q_ij log((Q_ij + ε) / (P_ij + ε)) — the authors' code as RepDistiller runs it."""
    def conditional(f):
        f = f.reshape(f.shape[0], -1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        k = (f @ f.t() + 1) / 2
        return k / k.sum(1, keepdim=True)

    p, q = conditional(student_feats), conditional(teacher_feats)
    return (q * torch.log((q + eps) / (p + eps))).mean()


@_float32
def ab_loss(student_preacts: Sequence[torch.Tensor], teacher_preacts: Sequence[torch.Tensor],
            margin: float = 1.0) -> torch.Tensor:
    """Activation boundaries (Heo et al., 2019, https://arxiv.org/abs/1811.03233) over n layers of pre-activation
    maps (student maps already through their connectors), RepDistiller's form:
    Σ_i 2^(i−n+1) · (3/1000) · (1/B) Σ [ (s+m)² 1(s > −m, t ≤ 0) + (s−m)² 1(s ≤ m, t > 0) ].

    Zero when every student value has the teacher's sign with at least margin m."""
    n, b = len(student_preacts), student_preacts[0].shape[0]
    total = student_preacts[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student_preacts, teacher_preacts)):
        per = ((s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0)))
        total = total + 2.0 ** (i - n + 1) * per.sum() / b * 3 / 1000
    return total


@_float32
def factor_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Factor transfer (Kim et al., 2018, https://arxiv.org/abs/1802.04977) in RepDistiller's form: the L1 distance
    mean |φ(F_s) − φ(F_t)| between :func:`attention_map` (p = 2) of the translator's and the paraphraser's factors."""
    s, t = match_spatial(student_factor, teacher_factor)
    return (attention_map(s, p) - attention_map(t, p)).abs().mean()


def fsp_matrix(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """G_ij = mean_hw lower_i · upper_j: (B, C1, H, W), (B, C2, H', W') -> (B, C1, C2), larger map pooled first."""
    lower, upper = match_spatial(lower, upper)
    return torch.einsum("bihw,bjhw->bij", lower, upper) / (lower.shape[2] * lower.shape[3])


@_float32
def fsp_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flow of solution procedure (Yim et al., 2017, CVPR, "A Gift from Knowledge Distillation"):
    Σ_i mean (G_s^i − G_t^i)² over the FSP matrices of consecutive layers i, i+1 (:func:`fsp_matrix`).
    Student and teacher need equal channel counts per layer."""
    total = student_feats[0].new_zeros(())
    for i in range(len(student_feats) - 1):
        g_s = fsp_matrix(student_feats[i], student_feats[i + 1])
        g_t = fsp_matrix(teacher_feats[i], teacher_feats[i + 1])
        total = total + (g_s - g_t).pow(2).mean()
    return total


@_float32
def nst_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang, 2017, https://arxiv.org/abs/1707.01219): the squared MMD with the
    polynomial kernel k(a, b) = (aᵀb)² between the channels' spatially L2-normalised maps,
    mean k(t, t) + mean k(s, s) − 2 mean k(s, t) over all channel pairs of each sample."""
    s, t = match_spatial(student_feats, teacher_feats)
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2).detach()

    def kernel(a, c):
        return (a @ c.transpose(1, 2)).pow(2).mean()

    return kernel(t, t) + kernel(s, s) - 2 * kernel(s, t)


# ---- CRD: contrastive scores against a memory bank, then NCE ------------------------------------------------

@_float32
def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, sample_idx: torch.Tensor,
                    temperature: float = 0.07) -> torch.Tensor:
    """exp(⟨m_j, v_i⟩ / τ) for the memory rows j = sample_idx[i] (positive first, then the negatives).

    anchor: (B, D) unit vectors; memory: (N, D), read as constants; sample_idx: (B, K+1) -> (B, K+1)."""
    # all B×N scores, then the chosen ones: far cheaper than gathering B×(K+1)×D memory rows (K ≈ 16384). The clone
    # keeps backward valid after the memory bank is updated in place later in the same step.
    return torch.exp((anchor @ memory.detach().clone().T).gather(1, sample_idx) / temperature)


@_float32
def crd_nce_loss(probs: torch.Tensor, n_data: int, eps: float = _EPS) -> torch.Tensor:
    """CRD's NCE loss (Tian et al., 2020, eq. 18, https://arxiv.org/abs/1910.10699) on (B, K+1) normalised scores
    (positive first): −(1/B) Σ_i [ log(P_i0 / (P_i0 + K/N + ε)) + Σ_k log((K/N) / (P_ik + K/N + ε)) ]."""
    b, m = probs.shape[0], probs.shape[1] - 1
    noise = m / float(n_data)
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
    log_neg = torch.log(noise / (probs[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / b


# ---- KDSVD and ReviewKD ----------------------------------------------------------------------------------------

def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _right_singular(feats: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` right singular vectors (unit columns, (B, W, n)) and L2-normalised singular values ((B, n)) of a
    (B, C, H, W) map read as (B, C·H, W) matrices, mdistiller's ``svd``."""
    b, c, h, w = feats.shape
    _, s, vh = torch.linalg.svd(feats.reshape(b, c * h, w), full_matrices=False)
    v = _finite(vh.transpose(1, 2))[:, :, :n]
    return F.normalize(v, dim=1), F.normalize(_finite(s)[:, :n], dim=1)


def _align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine|, sign-corrected: (B, W, m), (B, W, k) ->
    (B, W, k) (mdistiller's ``align_rsv``)."""
    cosine = v_s.transpose(1, 2) @ v_t
    best = cosine.abs() == cosine.abs().max(dim=1, keepdim=True).values
    return v_s @ torch.where(best, torch.sign(cosine), torch.zeros_like(cosine))


@_float32
def kdsvd_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
               k: int = 1) -> torch.Tensor:
    """KD-SVD (Lee et al., "Self-supervised knowledge distillation using singular value decomposition", ECCV 2018,
    https://arxiv.org/abs/1807.06819) in mdistiller's form (``KDSVD.py``): per layer, the teacher's first k right
    singular vectors V_t scaled by its normalised singular values σ_t, the student's of the k+3 best aligned to
    them (sign-corrected) scaled by the same σ_t; between consecutive layers i−1, i the RBF maps
    G[b, p, q, j] = exp(−(V_i[b, p, j] − V_{i−1}[b, q, j])² / 8), and the loss Σ_i Σ (G_s − G_t)² / B (non-finite
    entries dropped). Maps (B, C, H, W) are read as (B, C·H, W) as in mdistiller, so the singular vectors live on
    the width axis: student and teacher need equal widths per layer, not equal channels (the TensorFlow original
    reads NHWC maps as (B, H·W, C), the channel axis)."""
    total, prev = student_feats[0].new_zeros(()), None
    for f_s, f_t in zip(student_feats, teacher_feats):
        v_t, s_t = _right_singular(f_t, k)
        v_s, _ = _right_singular(f_s, k + 3)
        scale = s_t.unsqueeze(1)
        v_s, v_t = _align(v_s, v_t) * scale, v_t * scale
        if prev is not None:
            g_s = torch.exp(-(v_s.unsqueeze(2) - prev[0].unsqueeze(1)).pow(2) / 8)
            g_t = torch.exp(-(v_t.unsqueeze(2) - prev[1].unsqueeze(1)).pow(2) / 8)
            total = total + _finite((g_s - g_t.detach()).pow(2)).sum() / f_s.shape[0]
        prev = (v_s, v_t)
    return total


@_float32
def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al., "Distilling knowledge via knowledge review", CVPR 2021,
    https://arxiv.org/abs/2104.09044; mdistiller's ``hcl_loss``): per pair of equal-shape maps (B, C, H, W), the MSE
    and the MSEs of their average pools to 4x4, 2x2, 1x1 (the sizes below H), weighted 1, 1/2, 1/4, ... and
    divided by the weights' sum; summed over the pairs."""
    total = student_feats[0].new_zeros(())
    for fs, ft in zip(student_feats, teacher_feats):
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    return total
