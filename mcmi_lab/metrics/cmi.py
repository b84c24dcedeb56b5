"""Conditional mutual information I(X; Ŷ | Y) of a classifier's outputs, and the cluster separation Γ.

Notation (DESIGN.md §2): P_x = softmax(f(x)/T) ∈ Δ^K, label y, class centroid Q_y = E[P_X | Y = y].

* CMI = E[KL(P_X ‖ Q_Y)] = Σ_y π_y · mean_{x∈y} KL(P_x ‖ Q_y)                (nats, 0 ≤ CMI ≤ log K)
       = Σ_y π_y [H(Q_y) − mean_{x∈y} H(P_x)]                             (one-pass form used by CMIMeter)
* Γ   = the cross entropy CE(P_X, P_X') = −Σ_k P_X(k) log P_X'(k) averaged over ordered pairs of samples with
        different labels, the cluster separation of Yang et al., "CMI-constrained deep learning". NCMI = CMI / Γ.

Which average (``pairs=``), over the N samples given, with S = Σ_{i,j: y_i≠y_j} CE(P_i, P_j):

* ``"all"`` (the default): Γ = S / N² = E[1{Y≠Y'} · CE(P_X, P_X')] over all N² ordered pairs; the
  same-label pairs count as zeros.
* ``"different"``: Γ = S / D, D = N² − Σ_c n_c² the number of ordered pairs with different labels, i.e.
  E[CE | Y≠Y'], the reference's ``pair_wise_CE`` (github.com/iclr2024mcmi/ICLRMCMI, ``losses.py`` and
  ``utils.py`` of each experiment folder): the mean of the different-label entries of the N x N matrix
  −P·(log P)ᵀ. It is larger by N²/D (K/(K−1) for balanced classes), and nan when no two samples differ in label.
  Two details the reference does differently and this code does not copy: it averages the *nonzero* entries, so a
  different-label pair whose CE is exactly 0 (two saturated one-hot outputs on the same class) drops out of its
  count; and it clamps log at 1e-25 where this code clamps at float64's smallest normal.

Γ is bilinear in (P_X, log P_X'), so S is exact from per-class sums:
S = −(Σ_i P_i)·(Σ_j log P_j) + Σ_c (Σ_{i∈c} P_i)·(Σ_{j∈c} log P_j). That is O(N·K) instead of O(N²·K) — the cheap
estimator is exact, and it is what both :func:`separation` and :class:`CMIMeter` use (tests compare it with
brute-force pairs). All accumulation is float64.

Paper: Ye et al., "Bayes conditional distribution estimation for knowledge distillation" (MCMI), arXiv:2401.08732.
"""
from __future__ import annotations

from typing import Literal

import torch

_TINY = torch.finfo(torch.float64).tiny
#: Which pairs Γ averages over (module docstring): all N² ordered pairs, or only those with different labels.
Pairs = Literal["all", "different"]
_PAIRS = ("all", "different")


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float64. logits: (N, K)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not accepted: expected a number > 0")
    return torch.softmax(logits.double() / temperature, dim=1)


def _xlogy(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p · log q with 0 · log 0 = 0."""
    return torch.xlogy(p, q)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) per row, nats. probs: (N, K) -> (N,)."""
    return -_xlogy(probs, probs).sum(dim=-1)


def _check(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels):
        raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} are not accepted: "
                         "expected probs (N, K) and labels (N,)")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes - 1}] are not accepted for num_classes={num_classes}")


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes)


def class_centroids(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Q_y = mean of P_x over the samples of class y. probs: (N, K), labels: (N,) -> (num_classes, K) float64.

    A class without samples gets the uniform distribution (it carries no weight in the CMI).
    """
    _check(probs, labels, num_classes)
    sums = torch.zeros(num_classes, probs.shape[1], dtype=torch.float64, device=probs.device)
    sums.index_add_(0, labels, probs.double())
    counts = class_counts(labels, num_classes).to(sums)
    centroids = sums / counts.clamp_min(1).unsqueeze(1)
    centroids[counts == 0] = 1.0 / probs.shape[1]
    return centroids


def kl_to_centroids(probs: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """KL(P_x ‖ Q_{y_x}) per sample, nats. probs: (N, K), labels: (N,), centroids: (C, K) -> (N,) float64."""
    _check(probs, labels, len(centroids))
    p = probs.double()
    q = centroids.double()[labels]
    return (_xlogy(p, p) - _xlogy(p, q.clamp_min(_TINY))).sum(dim=1)


def per_class_cmi(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mean_{x∈c} KL(P_x ‖ Q_c) for every class c (0 for empty classes). -> (num_classes,) float64."""
    kl = kl_to_centroids(probs, labels, class_centroids(probs, labels, num_classes))
    sums = torch.zeros(num_classes, dtype=torch.float64, device=probs.device).index_add_(0, labels, kl)
    return sums / class_counts(labels, num_classes).clamp_min(1)


def conditional_mutual_information(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """I(X; Ŷ | Y) = E[KL(P_X ‖ Q_Y)] in nats (two-pass form), as a float64 scalar tensor."""
    _check(probs, labels, num_classes)
    if len(labels) == 0:
        raise ValueError("empty probs are not accepted: expected at least one sample")
    return kl_to_centroids(probs, labels, class_centroids(probs, labels, num_classes)).mean()


def omitted_mass(logits: torch.Tensor, labels: torch.Tensor, omitted, temperature: float = 1.0) -> float:
    """The zero-shot mechanism as a teacher metric: the mean, over the samples whose label is not in `omitted`, of
    softmax(logits / T) summed over the `omitted` classes. A student that never sees those classes learns them
    only from this mass, at the KD temperature T (issue 34: over 15 digit teachers it ordered the zero-shot
    accuracy with Spearman ρ 0.78, the train CMI 0.51). logits (N, K), labels (N,); float64 sums."""
    k = logits.shape[1] if logits.dim() == 2 else None
    if k is None or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits of shape {tuple(logits.shape)} with labels of shape {tuple(labels.shape)} are not "
                         "accepted: expected (N, K) and (N,)")
    classes = [omitted] if isinstance(omitted, int) and not isinstance(omitted, bool) else omitted
    if (not isinstance(classes, (list, tuple)) or not classes or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k for c in classes) or len(set(classes)) >= k):
        raise ValueError(f"omitted={omitted!r} is not accepted: expected a non-empty list of class indices in "
                         f"[0, {k - 1}] that leaves at least one class")
    index = torch.tensor(sorted(set(classes)), device=labels.device)
    kept = ~torch.isin(labels, index)
    if not kept.any():
        raise ValueError(f"omitted={omitted!r} is not accepted here: every sample's label is omitted, so no sample "
                         "shows the mass a student would learn from")
    probs = probabilities(logits[kept], temperature)
    return float(probs[:, index.to(probs.device)].sum(1).mean())


def _check_pairs(pairs: str) -> None:
    if pairs not in _PAIRS:
        raise ValueError(f"pairs={pairs!r} is not accepted: expected one of {', '.join(map(repr, _PAIRS))}")


def separation(probs: torch.Tensor, labels: torch.Tensor, num_classes: int, pairs: Pairs = "all") -> torch.Tensor:
    """Γ, the mean cross entropy CE(P_x, P_x') between samples of different labels, exact, in O(N·K).

    probs: (N, K), labels: (N,) -> float64 scalar. pairs="all" divides the different-label sum by N² (the default);
    pairs="different" by the number of different-label ordered pairs, as the reference ``pair_wise_CE`` does (module
    docstring).
    """
    _check(probs, labels, num_classes)
    _check_pairs(pairs)
    p = probs.double()
    logp = torch.log(p.clamp_min(_TINY))
    sum_p = torch.zeros(num_classes, p.shape[1], dtype=torch.float64, device=p.device).index_add_(0, labels, p)
    sum_logp = torch.zeros_like(sum_p).index_add_(0, labels, logp)
    return _separation_from_sums(sum_p, sum_logp, class_counts(labels, num_classes).double(), pairs)


def _separation_from_sums(sum_p: torch.Tensor, sum_logp: torch.Tensor, counts: torch.Tensor,
                          pairs: Pairs) -> torch.Tensor:
    cross_all = sum_p.sum(0) @ sum_logp.sum(0)
    cross_same = (sum_p * sum_logp).sum()
    n = counts.sum()
    num_pairs = n * n if pairs == "all" else n * n - (counts * counts).sum()
    return -(cross_all - cross_same) / num_pairs


def ncmi(probs: torch.Tensor, labels: torch.Tensor, num_classes: int, pairs: Pairs = "all") -> torch.Tensor:
    """Normalised CMI = CMI / Γ (Yang et al., CMI-constrained deep learning); ``pairs`` as in :func:`separation`."""
    return (conditional_mutual_information(probs, labels, num_classes)
            / separation(probs, labels, num_classes, pairs))


class CMIMeter:
    """Streaming CMI, per-class CMI, centroids, Γ and NCMI in one pass over batches of logits.

    Keeps per class the sum of P_x, of log P_x and of H(P_x), and the count (float64, O(K²) memory), so the result
    equals the two-pass formulas whatever the batch order. Under torch.distributed, :meth:`all_reduce` sums the
    statistics of all ranks (call it before :meth:`compute`). ``pairs`` chooses Γ's average as in :func:`separation`.
    """

    def __init__(self, num_classes: int, temperature: float = 1.0, device: str | torch.device | None = None,
                 pairs: Pairs = "all"):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not accepted: expected a number > 0")
        _check_pairs(pairs)
        self.num_classes, self.temperature, self.pairs = num_classes, temperature, pairs
        k = num_classes
        self.sum_p = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.sum_logp = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.sum_h = torch.zeros(k, dtype=torch.float64, device=device)
        self.count = torch.zeros(k, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> "CMIMeter":
        """Add a batch. logits: (B, K) (any float dtype), labels: (B,)."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits with {logits.shape[1]} classes are not accepted: the meter has {self.num_classes}")
        dev = self.sum_p.device
        logp = torch.log_softmax(logits.to(dev, torch.float64) / self.temperature, dim=1)
        p = logp.exp()
        labels = labels.to(dev)
        self.sum_p.index_add_(0, labels, p)
        self.sum_logp.index_add_(0, labels, logp)
        self.sum_h.index_add_(0, labels, -(p * logp).sum(1))
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        return self

    def all_reduce(self) -> "CMIMeter":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.sum_p, self.sum_logp, self.sum_h, self.count):
                dist.all_reduce(t)
        return self

    def centroids(self) -> torch.Tensor:
        """(K, K) class centroids; uniform for classes not seen."""
        q = self.sum_p / self.count.clamp_min(1).unsqueeze(1)
        q[self.count == 0] = 1.0 / self.num_classes
        return q

    def compute(self) -> dict[str, torch.Tensor]:
        """{"cmi", "per_class_cmi", "separation", "ncmi", "centroids", "count"} (float64 tensors)."""
        n = self.count.sum()
        if n == 0:
            raise ValueError("CMIMeter.compute() needs at least one update")
        q = self.centroids()
        per_class = (entropy(q) - self.sum_h / self.count.clamp_min(1)).clamp_min(0)
        per_class[self.count == 0] = 0
        cmi = (per_class * self.count).sum() / n
        gamma = _separation_from_sums(self.sum_p, self.sum_logp, self.count, self.pairs)
        return {"cmi": cmi, "per_class_cmi": per_class, "separation": gamma, "ncmi": cmi / gamma,
                "centroids": q, "count": self.count.clone()}
