"""Contrastive representation distillation (Tian et al., https://arxiv.org/abs/1910.10699) as RepDistiller runs
it (github.com/HobbitLong/RepDistiller): embeddings, the memory banks, negatives drawn from the other classes and
the NCE loss of :mod:`mcmi_lab.losses.feature` in both directions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..training import distributed as dist_utils
from ..losses.feature import contrast_scores, crd_nce_loss
from ..utils import check_float, check_int
from .base import DistillObjective, Embed, _flat_dim


class CRDObjective(DistillObjective):
    """Contrastive representation distillation (Tian et al., 2020) as RepDistiller runs it: L2-normalised linear
    embeddings (dim `feat_dim`) of both pooled features, a memory bank of every training sample's embeddings per
    side (momentum `nce_m`), `nce_k` negatives per sample drawn uniformly from the other classes ("exact" mode;
    distinct unless the other classes hold fewer than `nce_k` samples, see `sample_negatives`), NCE with temperature
    `nce_t` in both directions. beta 0.8.

    The bank is indexed by the sample index that `fit` passes; it is built in `prepare` for the data set given and
    saved in checkpoints. Under torch.distributed every rank updates its copy with the embeddings of all ranks'
    samples and fixes the normalisers Z from the mean over the ranks' first batches, so the banks stay identical
    (three all-gathers and one all-reduce per step). Memory per
    step: 2 · B · (nce_k + 1) · feat_dim floats (0.5 GB at batch 64), plus B · N random keys to draw the negatives
    (N samples); on a CPU a smaller nce_k is much faster."""

    name, takes = "crd", "pooled"

    def __init__(self, teacher: nn.Module, beta: float = 0.8, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, **common):
        super().__init__(teacher, beta, **common)
        self.feat_dim = check_int("feat_dim", feat_dim, minimum=1)
        self.nce_k = check_int("nce_k", nce_k, minimum=1)
        self.nce_t = check_float("nce_t", nce_t, 0.0, low_open=True)
        self.nce_m = check_float("nce_m", nce_m, 0.0, 1.0, high_open=True)

    def build(self, s, t):
        self.embed_s = Embed(_flat_dim(s[0][1]), self.feat_dim)
        self.embed_t = Embed(_flat_dim(t[0][1]), self.feat_dim)

    def prepare(self, model, data):
        super().prepare(model, data)
        n, d = len(data), self.feat_dim
        labels = data.labels
        counts = torch.bincount(labels, minlength=data.num_classes)
        others = n - counts[labels]  # per sample, how many negatives its class leaves
        self._negatives_range = (int(others.min()), int(others.max()))  # for sample_negatives, without host syncs
        if self._negatives_range[0] < 1:
            raise ValueError(f"data with labels {sorted(set(labels.tolist()))} is not accepted for CRD: its negatives "
                             f"come from other classes, so it needs samples of at least two classes")
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        if getattr(self, "memory_s", None) is None or self.memory_s.shape != (n, d):
            g = torch.Generator().manual_seed(0)  # RepDistiller's uniform init in ±1/sqrt(d/3), seeded
            stdv = 1.0 / math.sqrt(d / 3)
            self.register_buffer("memory_s", (torch.rand(n, d, generator=g) * 2 * stdv - stdv).to(data.device))
            self.register_buffer("memory_t", (torch.rand(n, d, generator=g) * 2 * stdv - stdv).to(data.device))
            self.register_buffer("normalizers", torch.full((2,), -1.0, device=data.device))

    def sample_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, nce_k) sample indices drawn uniformly from the classes other than `labels`, as RepDistiller's
        CIFAR100InstanceSample: a row whose other classes hold at least nce_k samples draws them without replacement
        (nce_k distinct negatives), a row whose other classes hold fewer draws with replacement. No host sync."""
        counts, starts = self.counts[labels].unsqueeze(1), self.starts[labels].unsqueeze(1)
        n_other = len(self.order) - counts
        fewest, most = self._negatives_range
        if self.nce_k > most:  # every row draws with replacement
            u = self._with_replacement(n_other)
        else:  # the nce_k smallest of uniform keys over [0, n_other): a uniform nce_k-subset of the row's negatives
            keys = torch.rand(len(labels), most, device=labels.device)
            keys.masked_fill_(torch.arange(most, device=labels.device) >= n_other, 2.0)  # past the row's negatives
            u = keys.topk(self.nce_k, dim=1, largest=False, sorted=False).indices
            if self.nce_k > fewest:  # the rows of the largest classes have fewer than nce_k negatives
                u = torch.where(n_other < self.nce_k, self._with_replacement(n_other), u)
        return self.order[u + (u >= starts) * counts]  # skip the block of the anchor's own class

    def _with_replacement(self, n_other: torch.Tensor) -> torch.Tensor:
        """(B, nce_k) positions in [0, n_other) of each row, uniform and independent."""
        u = torch.rand(len(n_other), self.nce_k, device=n_other.device) * n_other
        return u.long().clamp_max(n_other - 1)

    def distill_loss(self, s, t, labels, index):
        if index is None:
            raise ValueError("CRD needs the sample index of every batch (fit passes it)")
        v_s, v_t = self.embed_s(s[0]), self.embed_t(t[0])
        idx = torch.cat([index.unsqueeze(1), self.sample_negatives(labels)], dim=1)
        out_s = contrast_scores(v_s, self.memory_t, idx, self.nce_t)  # student anchor, teacher memory
        out_t = contrast_scores(v_t, self.memory_s, idx, self.nce_t)  # teacher anchor, student memory
        n = len(self.memory_s)
        with torch.no_grad():  # Z: fixed on the first batch, as RepDistiller (no host sync)
            first = torch.stack([out_s.mean(), out_t.mean()]) * n
            if dist_utils.is_distributed():
                first = dist_utils.all_reduce_sum(first) / dist_utils.world_size()
            self.normalizers.copy_(torch.where(self.normalizers < 0, first, self.normalizers))
        loss = crd_nce_loss(out_s / self.normalizers[0], n) + crd_nce_loss(out_t / self.normalizers[1], n)
        with torch.no_grad():  # under DDP the ranks' batches are equal in size and disjoint within an epoch
            index = dist_utils.all_gather_cat(index)
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                v = dist_utils.all_gather_cat(v.detach().float())
                mixed = memory[index] * self.nce_m + v * (1 - self.nce_m)
                memory.index_copy_(0, index, F.normalize(mixed, dim=1))
        return loss
