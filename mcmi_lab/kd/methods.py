"""The feature KD methods of the CRD benchmark but CRD (:mod:`mcmi_lab.kd.contrastive`): FitNet, AT, SP, CC, VID,
RKD, PKT, AB, FT, FSP and NST, and mdistiller's KDSVD, as :class:`~mcmi_lab.kd.base.DistillObjective` subclasses
(ReviewKD is in :mod:`mcmi_lab.kd.review`, the logit methods in :mod:`mcmi_lab.kd.logit`). Each picks its features,
builds its connectors and calls the pure loss of :mod:`mcmi_lab.losses.feature`; the defaults are RepDistiller's
(mdistiller's for KDSVD).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.feature import (ab_loss, at_loss, correlation_loss, factor_loss, fsp_loss, hint_loss, kdsvd_loss, match_spatial,
                              nst_loss, pkt_loss, rkd_loss, similarity_loss, vid_loss)
from ..utils import check_float, check_int
from .base import ConvRegressor, DistillObjective, Embed, _check_same, _conv_stack, _flat_dim, _maps



# ---- the methods ------------------------------------------------------------------------------------------------

class FitNetObjective(DistillObjective):
    """FitNet hints (Romero et al., 2015): MSE between a conv regressor of the student's `hint_layer` feature and
    the teacher's. hint_layer indexes RepDistiller's feat list (2: the ResNets' second stage). beta 100."""

    name, takes = "fitnet", "hint"

    def __init__(self, teacher: nn.Module, beta: float = 100.0, hint_layer: int = 2, **common):
        super().__init__(teacher, beta, **common)
        self.hint_layer = check_int("hint_layer", hint_layer, minimum=0)

    def build(self, s, t):
        _maps("FitNet", s, t)
        try:
            self.regressor = ConvRegressor(s[0][1], t[0][1], relu=True)
        except ValueError as e:
            raise ValueError(f"FitNet cannot connect student {s[0][0]!r} {s[0][1]} to teacher {t[0][0]!r} "
                             f"{t[0][1]}: {e}") from None

    def distill_loss(self, s, t, labels, index):
        return hint_loss(self.regressor(s[0]), t[0])


class ATObjective(DistillObjective):
    """Attention transfer (Zagoruyko & Komodakis, 2017) summed over the stage pairs, p = 2. beta 1000."""

    name, takes = "at", "stages"

    def __init__(self, teacher: nn.Module, beta: float = 1000.0, p: float = 2.0, **common):
        super().__init__(teacher, beta, **common)
        self.p = check_float("p", p, 0.0, low_open=True)

    def build(self, s, t):
        _maps("AT", s, t)

    def distill_loss(self, s, t, labels, index):
        return sum(at_loss(a, b, self.p) for a, b in zip(s, t))


class SPObjective(DistillObjective):
    """Similarity preserving (Tung & Mori, 2019) on the last stage. beta 3000."""

    name, takes = "sp", "last"

    def __init__(self, teacher: nn.Module, beta: float = 3000.0, **common):
        super().__init__(teacher, beta, **common)

    def distill_loss(self, s, t, labels, index):
        return sum(similarity_loss(a, b) for a, b in zip(s, t))


class CCObjective(DistillObjective):
    """Correlation congruence (Peng et al., 2019) on linear embeddings (dim `feat_dim`, both trained) of the pooled
    features, in the authors' code form. beta 0.02."""

    name, takes = "cc", "pooled"

    def __init__(self, teacher: nn.Module, beta: float = 0.02, feat_dim: int = 128, **common):
        super().__init__(teacher, beta, **common)
        self.feat_dim = check_int("feat_dim", feat_dim, minimum=1)

    def build(self, s, t):
        self.embed_s = Embed(_flat_dim(s[0][1]), self.feat_dim, normalize=False)
        self.embed_t = Embed(_flat_dim(t[0][1]), self.feat_dim, normalize=False)

    def distill_loss(self, s, t, labels, index):
        return correlation_loss(self.embed_s(s[0]), self.embed_t(t[0]))


class VIDObjective(DistillObjective):
    """Variational information distillation (Ahn et al., 2019) per stage pair: a 1x1-conv regressor
    (C_s → C_t → C_t → C_t) predicts the teacher map's mean, a learned per-channel variance (init 5). beta 1."""

    name, takes = "vid", "stages"

    def __init__(self, teacher: nn.Module, beta: float = 1.0, init_var: float = 5.0, eps: float = 1e-5, **common):
        super().__init__(teacher, beta, **common)
        self.init_var = check_float("init_var", init_var, 0.0, low_open=True)
        self.eps = check_float("eps", eps, 0.0, low_open=True)

    def build(self, s, t):
        _maps("VID", s, t)

        def conv(a, b):
            return nn.Conv2d(a, b, kernel_size=1, bias=False)

        self.regressors = nn.ModuleList(
            nn.Sequential(conv(ss[1], ts[1]), nn.ReLU(), conv(ts[1], ts[1]), nn.ReLU(), conv(ts[1], ts[1]))
            for (_, ss), (_, ts) in zip(s, t))
        init = math.log(math.expm1(self.init_var - self.eps))  # softplus⁻¹, so σ² starts at init_var
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((ts[1],), init)) for _, ts in t)

    def distill_loss(self, s, t, labels, index):
        total = 0.0
        for a, b, reg, log_scale in zip(s, t, self.regressors, self.log_scales):
            a, b = match_spatial(a, b)
            total = total + vid_loss(reg(a), b, log_scale, self.eps)
        return total


class RKDObjective(DistillObjective):
    """Relational KD (Park et al., 2019) on the pooled features, distance weight 25, angle weight 50. beta 1."""

    name, takes = "rkd", "pooled"

    def __init__(self, teacher: nn.Module, beta: float = 1.0, distance_weight: float = 25.0,
                 angle_weight: float = 50.0, **common):
        super().__init__(teacher, beta, **common)
        self.distance_weight = check_float("distance_weight", distance_weight, 0.0)
        self.angle_weight = check_float("angle_weight", angle_weight, 0.0)

    def distill_loss(self, s, t, labels, index):
        return rkd_loss(s[0], t[0], self.distance_weight, self.angle_weight)


class PKTObjective(DistillObjective):
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018) on the pooled features. beta 30000."""

    name, takes = "pkt", "pooled"

    def __init__(self, teacher: nn.Module, beta: float = 30000.0, **common):
        super().__init__(teacher, beta, **common)

    def distill_loss(self, s, t, labels, index):
        return pkt_loss(s[0], t[0])


class ABObjective(DistillObjective):
    """Activation boundaries (Heo et al., 2019) on the stages' pre-ReLU maps, the student's through a connector
    (identity when shapes agree, else conv + BN), margin 1.

    RepDistiller trains only this loss for 30 init epochs (`init_epochs`), then plain CE (its beta is unused).
    Simplification, the default (init_epochs=0): one stage, CE + beta · L_AB throughout, beta 1. For the reference,
    pass init_epochs=30, beta=0 and 30 more epochs."""

    name, takes = "ab", "preact"

    def __init__(self, teacher: nn.Module, beta: float = 1.0, margin: float = 1.0, init_epochs: int = 0, **common):
        super().__init__(teacher, beta, **common)
        self.margin = check_float("margin", margin, 0.0)
        self.init_epochs = check_int("init_epochs", init_epochs, minimum=0)

    def build(self, s, t):
        _maps("AB", s, t)
        connectors = []
        for (sn, ss), (tn, ts) in zip(s, t):
            if ss[1:] == ts[1:]:
                connectors.append(nn.Identity())
                continue
            try:
                connectors.append(ConvRegressor(ss, ts, relu=False))
            except ValueError as e:
                raise ValueError(f"AB cannot connect student {sn!r} {ss} to teacher {tn!r} {ts}: {e}") from None
        self.connectors = nn.ModuleList(connectors)

    def distill_loss(self, s, t, labels, index):
        return ab_loss([c(a) for c, a in zip(self.connectors, s)], t, self.margin)


class FTObjective(DistillObjective):
    """Factor transfer (Kim et al., 2018) on the last stage: a translator (student) and a paraphraser (teacher,
    rate 0.5) give factors compared by :func:`factor_loss`. beta 200.

    RepDistiller first trains the paraphraser alone as an auto-encoder of the teacher map (30 init epochs at lr
    0.01; here `init_epochs` at the run's lr), then freezes it. Simplification, the default (init_epochs=0): the
    paraphraser trains jointly, its reconstruction MSE (term "ft_rec", weight 1) added to the loss, and the factor
    target is detached. In both modes the paraphraser reads the teacher map over its batch RMS (`_scaled`); the
    factors are compared as normalised attention maps, so that changes them only through the conv biases."""

    name, takes, init_name = "ft", "last", "ft_rec"

    def __init__(self, teacher: nn.Module, beta: float = 200.0, rate: float = 0.5, init_epochs: int = 0, **common):
        super().__init__(teacher, beta, **common)
        self.rate = check_float("rate", rate, 0.0, low_open=True)
        self.init_epochs = check_int("init_epochs", init_epochs, minimum=0)

    def build(self, s, t):
        _maps("FT", s, t)
        c_s, c_t = s[0][1][1], t[0][1][1]
        c_f = max(1, int(c_t * self.rate))
        self.translator = _conv_stack([c_s, c_s, c_f, c_f], bn=True)
        self.paraphraser = nn.ModuleDict({"encoder": _conv_stack([c_t, c_t, c_f, c_f]),
                                          "decoder": _conv_stack([c_f, c_f, c_t, c_t], transposed=True)})

    @staticmethod
    def _scaled(t):
        # A constant per batch: the reconstruction loss becomes scale-free, and joint training at the student's lr
        # stays finite where the raw maps of deep random teachers diverged.
        return t / t.float().pow(2).mean().sqrt().clamp_min(1e-6).to(t.dtype)

    def _reconstruction(self, t):
        t = self._scaled(t)
        return F.mse_loss(self.paraphraser["decoder"](self.paraphraser["encoder"](t)).float(), t.float())

    def init_loss(self, s, t):
        return self._reconstruction(t[0])

    def distill_loss(self, s, t, labels, index):
        with torch.no_grad():
            target = self.paraphraser["encoder"](self._scaled(t[0]))
        return factor_loss(self.translator(s[0]), target)

    def auxiliary_losses(self, s, t):
        if self.init_epochs > 0:  # the reference: the paraphraser stays as the init stage left it
            return {}
        return {"ft_rec": self._reconstruction(t[0])}


class FSPObjective(DistillObjective):
    """Flow of solution procedure (Yim et al., 2017) between consecutive feature layers (all of feat[:-1]);
    student and teacher need equal channels per layer.

    RepDistiller trains only this loss for 30 init epochs (`init_epochs`), then plain CE (its beta 50 is unused).
    Simplification, the default (init_epochs=0): one stage, CE + beta · L_FSP throughout, beta 50."""

    name, takes = "fsp", "all"

    def __init__(self, teacher: nn.Module, beta: float = 50.0, init_epochs: int = 0, **common):
        super().__init__(teacher, beta, **common)
        self.init_epochs = check_int("init_epochs", init_epochs, minimum=0)

    def build(self, s, t):
        _maps("FSP", s, t)
        if len(s) < 2:
            raise ValueError(f"FSP needs at least two feature layers: student {[n for n, _ in s]}")
        _check_same("FSP", "equal channels", s, t, key=lambda shape: shape[1])

    def distill_loss(self, s, t, labels, index):
        return fsp_loss(s, t)


class NSTObjective(DistillObjective):
    """Neuron selectivity transfer (Huang & Wang, 2017), polynomial-kernel MMD per stage pair. beta 50."""

    name, takes = "nst", "stages"

    def __init__(self, teacher: nn.Module, beta: float = 50.0, **common):
        super().__init__(teacher, beta, **common)

    def build(self, s, t):
        _maps("NST", s, t)

    def distill_loss(self, s, t, labels, index):
        return sum(nst_loss(a, b) for a, b in zip(s, t))


class KDSVDObjective(DistillObjective):
    """KD-SVD (Lee et al., ECCV 2018) on the stage maps, mdistiller's form (:func:`mcmi_lab.losses.feature.kdsvd_loss`,
    mdistiller's ``KDSVD.py``; the RepDistiller suite has no KDSVD): the RBF relations between the leading
    singular vectors of consecutive stages. k 1, beta 1, CE weight 1. Student and teacher need equal map widths
    per stage (the singular vectors live on the width axis, as in mdistiller)."""

    name, takes = "kdsvd", "stages"

    def __init__(self, teacher: nn.Module, beta: float = 1.0, k: int = 1, **common):
        super().__init__(teacher, beta, **common)
        self.k = check_int("k", k, minimum=1)

    def build(self, s, t):
        _maps("KDSVD", s, t)
        if len(s) < 2:
            raise ValueError(f"KDSVD relates consecutive layers, so it needs at least two: student {[n for n, _ in s]}")
        _check_same("KDSVD", "equal map widths", s, t, key=lambda shape: shape[3])

    def distill_loss(self, s, t, labels, index):
        return kdsvd_loss(s, t, self.k)
