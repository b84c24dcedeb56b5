"""The KD methods of the CRD benchmark as objectives for :func:`mcmi_lab.train.fit`, and ``distill`` to run one.

Every method trains the student on ``ce_weight · CE + kd_weight · KD_T + beta · L_method`` (RepDistiller's
``gamma · cls + alpha · div + beta · kd``) with RepDistiller's defaults (``scripts/run_cifar_distill.sh``: CE weight 1,
KD weight 0 and the method weight beta below; Hinton KD: 0.1 CE + 0.9 KD at T = 4). The method losses are the pure
functions of :mod:`mcmi_lab.kd_losses`; the objectives here only pick the features, build the connectors
(regressors, embeddings, the CRD memory bank) and weigh the terms. Connectors are built in ``prepare`` from the
shapes of one dry forward, trained with the student and saved in checkpoints; the teacher is held outside the
module tree (never trained, never saved, always in eval mode).

Features follow RepDistiller's ``feat`` list: :func:`mcmi_lab.models.feature_layers` gives ``feat[:-1]`` (for the
CIFAR ResNets the stem, then each stage), the input of :func:`mcmi_lab.models.classifier_layer` is ``feat[-1]``
(the pooled vector). ``student_layers`` / ``teacher_layers`` replace the default layers with exactly the modules
whose outputs a method compares (any model, not only the zoo's).

Tian et al., Contrastive Representation Distillation, https://arxiv.org/abs/1910.10699, and its code
(github.com/HobbitLong/RepDistiller); Zhao et al., Decoupled KD, https://arxiv.org/abs/2203.08679 (mdistiller).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_utils
from .data import ImageData
from .features import capture, restoring_modes
from .kd_losses import (ab_loss, at_loss, contrast_scores, correlation_loss, crd_nce_loss, dkd_loss, factor_loss,
                        fsp_loss, hint_loss, match_spatial, nst_loss, pkt_loss, rkd_loss, similarity_loss, vid_loss)
from .losses import kd_loss
from .objectives import MLLObjective, Objective, accuracy, kd_objective
from .runtime import freeze_teacher, memory_format
from .train import TrainConfig, fit
from .utils import check_float, check_int

# ---- features: which layers, captured by hooks ------------------------------------------------------------------


@contextmanager
def _capture(model: nn.Module, points: Sequence[tuple[str, str]]):
    """Yield a function returning, after a forward, the features at `points`: (name, "out"|"in") pairs, the
    module's output or its first input."""
    with capture(model, [n for n, where in points if where == "out"]) as outs, \
            capture(model, [n for n, where in points if where == "in"], inputs=True) as ins:
        yield lambda: [(outs if where == "out" else ins)[name] for name, where in points]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _zoo_layers(model: nn.Module, preact: bool) -> tuple[list[str], str]:
    """(feature_layers, classifier_layer) of a zoo model, or of the zoo model a wrapper holds as `.model`."""
    from .models import classifier_layer, feature_layers

    try:
        return feature_layers(model, preact), classifier_layer(model)
    except ValueError:
        inner = getattr(model, "model", None)  # e.g. models.wrappers.TemperatureScaled: same features, scaled logits
        if not isinstance(inner, nn.Module):
            raise
        names, cls = _zoo_layers(inner, preact)
        return [f"model.{n}" for n in names], f"model.{cls}"


# ---- connectors: RepDistiller's models/util.py ------------------------------------------------------------------

class ConvRegressor(nn.Module):
    """conv → BN (→ ReLU) from a student map (C_s, H_s, W_s) to a teacher map (C_t, H_t, W_t) (FitNet's ConvReg).

    H_s = 2 H_t: 3x3 stride-2 conv; 2 H_s = H_t: 4x4 stride-2 transposed conv; H_s ≥ H_t: a (1+H_s−H_t)x(1+W_s−W_t)
    valid conv. Raises ValueError for any other pair."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape[-3:], teacher_shape[-3:]
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"no convolutional regressor maps a student map {tuple(student_shape[-3:])} to a "
                             f"teacher map {tuple(teacher_shape[-3:])}: expected the student's H, W twice, half, or "
                             f"at least the teacher's")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Embed(nn.Module):
    """Flatten → Linear (→ L2 normalise): CRD's Embed (normalize=True) and CC's LinearEmbed."""

    def __init__(self, dim_in: int, dim_out: int = 128, normalize: bool = True):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return F.normalize(x.float(), dim=1) if self.normalize else x


def _conv_stack(channels: Sequence[int], transposed: bool = False, bn: bool = False) -> nn.Sequential:
    """3x3 same-size convs through `channels`, each followed by (BN and) LeakyReLU(0.1): FT's paraphraser/translator."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1)] + ([nn.BatchNorm2d(c_out)] if bn else []) + [nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


def _flat_dim(shape: Sequence[int]) -> int:
    return math.prod(shape[1:])


# ---- the objective every feature method shares ------------------------------------------------------------------

class DistillObjective(Objective):
    """ce_weight · CE + kd_weight · KD_T + beta · L_method on captured features (RepDistiller's train_distill).

    Subclasses set `name` (the term reported in the history), `takes` (which features: "stages" = feat[1:-1],
    "preact" = the same before the last ReLU, "last" = feat[-2], "hint" = feat[hint_layer], "all" = feat[:-1],
    "pooled" = feat[-1]) and implement `build(student, teacher)` (lists of (layer, shape); make connectors, raise
    ValueError for a pair they cannot connect) and `distill_loss(s, t, labels, index)`. `init_epochs` > 0 (AB, FT,
    FSP) makes the first epochs RepDistiller's separate init stage: `init_loss` alone, no CE or KD.
    """

    name = "distill"
    takes = "stages"
    compilable = False  # features are captured with forward hooks
    init_name: str | None = None  # the term of the init stage, when it is not the method's own loss

    def __init__(self, teacher: nn.Module, beta: float, *, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0, student_layers: Sequence[str] | None = None,
                 teacher_layers: Sequence[str] | None = None):
        super().__init__()
        self.__dict__["teacher"] = teacher  # not a submodule: not trained, not in state_dict, never set to train()
        self.beta = check_float("beta", beta, 0.0)
        self.ce_weight = check_float("ce_weight", ce_weight, 0.0)
        self.kd_weight = check_float("kd_weight", kd_weight, 0.0)
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.student_layers = None if student_layers is None else list(student_layers)
        self.teacher_layers = None if teacher_layers is None else list(teacher_layers)
        self.init_epochs = 0
        self.epoch = 0
        self._points: tuple[list, list] | None = None
        self._built_for: tuple[list, list] | None = None  # the (student, teacher) shapes the connectors fit

    # -- setup --
    def _select(self, model: nn.Module, override: list[str] | None, who: str) -> list[tuple[str, str]]:
        if override is not None:
            return [(name, "out") for name in override]
        try:
            names, classifier = _zoo_layers(model, preact=self.takes == "preact")
        except ValueError as e:
            raise ValueError(f"{e}; or pass {who}_layers= naming the modules whose outputs {self.name.upper()} "
                             f"compares") from None
        if self.takes == "pooled":
            return [(classifier, "in")]
        if self.takes == "hint":
            if self.hint_layer >= len(names):
                raise ValueError(f"hint_layer={self.hint_layer!r} is not accepted: the {who} has {len(names)} "
                                 f"feature layers {names}")
            names = [names[self.hint_layer]]
        elif self.takes == "last":
            names = names[-1:]
        elif self.takes in ("stages", "preact"):
            names = names[1:]
        return [(name, "out") for name in names]

    def _shapes(self, model: nn.Module, points, data: ImageData, who: str) -> tuple[list, tuple]:
        modules = dict(model.named_modules())
        missing = [name for name, _ in points if name not in modules]
        if missing:
            raise ValueError(f"{who}_layers {missing} are not accepted: no such module in {type(model).__name__}")
        x = torch.zeros((2, data.in_channels, *data.image_size), device=data.device)
        with restoring_modes(model), torch.no_grad(), _capture(model, points) as feats:
            model.eval()  # a dry forward must not move BatchNorm statistics
            logits = model(x)
        return [(name, tuple(f.shape)) for (name, _), f in zip(points, feats())], tuple(logits.shape)

    def prepare(self, model: nn.Module, data: ImageData) -> None:
        freeze_teacher(self.teacher, data.device, memory_format(model))
        net = _unwrap(model)
        s_points = self._select(net, self.student_layers, "student")
        t_points = self._select(self.teacher, self.teacher_layers, "teacher")
        s, s_logits = self._shapes(net, s_points, data, "student")
        t, t_logits = self._shapes(self.teacher, t_points, data, "teacher")
        if len(s) != len(t):
            raise ValueError(f"{self.name.upper()} pairs student layers with teacher layers one to one: student "
                             f"{[n for n, _ in s]} and teacher {[n for n, _ in t]} differ in number; pass "
                             f"student_layers=/teacher_layers= of equal length")
        if self.kd_weight > 0 and s_logits[1:] != t_logits[1:]:
            raise ValueError(f"kd_weight={self.kd_weight:g} needs equal logits: student {s_logits[1:]} vs teacher "
                             f"{t_logits[1:]}")
        if self._built_for != (s, t):  # built once: a second fit continues with the connectors
            self.build(s, t)
            self.to(data.device)
            self._built_for = (s, t)
        self._points = (s_points, t_points)

    def build(self, student: list, teacher: list) -> None:
        pass

    def on_epoch_start(self, model, data, epoch):
        self.epoch = epoch

    # -- the loss --
    def distill_loss(self, s: list, t: list, labels: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def init_loss(self, s: list, t: list) -> torch.Tensor:
        return self.distill_loss(s, t, None, None)

    def forward(self, model, images, labels, index=None):
        if self._points is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(model, data) must run before the first batch "
                               f"(fit does this)")
        s_points, t_points = self._points
        with torch.no_grad(), _capture(self.teacher, t_points) as teacher_feats:
            teacher_logits = self.teacher(images)
        with _capture(_unwrap(model), s_points) as student_feats:
            logits = model(images)
        s, t = student_feats(), [f.detach() for f in teacher_feats()]
        ce = F.cross_entropy(logits.float(), labels)
        terms = {"ce": ce.detach()}
        if self.epoch < self.init_epochs:
            loss = self.init_loss(s, t)
            terms[self.init_name or self.name] = loss.detach()
        else:
            loss = self.ce_weight * ce
            if self.kd_weight > 0:
                kd = kd_loss(logits, teacher_logits, self.temperature)
                loss = loss + self.kd_weight * kd
                terms["kd"] = kd.detach()
            method = self.distill_loss(s, t, labels, index)
            loss = loss + self.beta * method
            terms[self.name] = method.detach()
            for key, extra in self.auxiliary_losses(s, t).items():
                loss = loss + extra
                terms[key] = extra.detach()
        terms["acc"] = accuracy(logits, labels)
        return loss, terms

    def auxiliary_losses(self, s: list, t: list) -> dict[str, torch.Tensor]:
        """Unweighted losses of the connectors themselves, added in the main stage (FT's joint paraphraser)."""
        return {}


def _check_same(name: str, what: str, s: list, t: list, key: Callable) -> None:
    for (sn, ss), (tn, ts) in zip(s, t):
        if key(ss) != key(ts):
            raise ValueError(f"{name} needs {what} per layer pair: student {sn!r} {ss} vs teacher {tn!r} {ts}")


def _maps(name: str, s: list, t: list) -> None:
    for layer, shape in s + t:
        if len(shape) != 4:
            raise ValueError(f"{name} needs (B, C, H, W) feature maps: layer {layer!r} gives {shape}")


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


class CRDObjective(DistillObjective):
    """Contrastive representation distillation (Tian et al., 2020) as RepDistiller runs it: L2-normalised linear
    embeddings (dim `feat_dim`) of both pooled features, a memory bank of every training sample's embeddings per
    side (momentum `nce_m`), `nce_k` negatives per sample drawn uniformly from the other classes ("exact" mode),
    NCE with temperature `nce_t` in both directions. beta 0.8.

    The bank is indexed by the sample index that `fit` passes; it is built in `prepare` for the data set given and
    saved in checkpoints. Under torch.distributed every rank updates its copy with the embeddings of all ranks'
    samples and fixes the normalisers Z from the mean over the ranks' first batches, so the banks stay identical
    (three all-gathers and one all-reduce per step). Memory per
    step: 2 · B · (nce_k + 1) · feat_dim floats (0.5 GB at batch 64); on a CPU a smaller nce_k is much faster."""

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
        if int((n - counts[labels]).min()) < 1:
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
        """(B, nce_k) sample indices drawn uniformly with replacement from the classes other than `labels`."""
        counts, starts = self.counts[labels].unsqueeze(1), self.starts[labels].unsqueeze(1)
        n_other = len(self.order) - counts
        u = (torch.rand(len(labels), self.nce_k, device=labels.device) * n_other).long().clamp_max(n_other - 1)
        return self.order[u + (u >= starts) * counts]  # skip the block of the anchor's own class

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


class DKDObjective(Objective):
    """Decoupled KD (Zhao et al., 2022; mdistiller): ce_weight · CE + min(epoch/warmup, 1) · (α·TCKD + β·NCKD),
    CIFAR defaults α 1, β 8, T 4, warmup 20 epochs (epochs counted from 1, as mdistiller). Term "dkd" is unwarmed."""

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20, ce_weight: float = 1.0):
        super().__init__()
        self.__dict__["teacher"] = teacher
        self.alpha = check_float("alpha", alpha, 0.0)
        self.beta = check_float("beta", beta, 0.0)
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.ce_weight = check_float("ce_weight", ce_weight, 0.0)
        self.epoch = 0

    def prepare(self, model, data):
        freeze_teacher(self.teacher, data.device, memory_format(model))

    def on_epoch_start(self, model, data, epoch):
        self.epoch = epoch

    def forward(self, model, images, labels, index=None):
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        dkd = dkd_loss(logits, teacher_logits, labels, self.alpha, self.beta, self.temperature)
        ramp = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        return self.ce_weight * ce + ramp * dkd, {"ce": ce.detach(), "dkd": dkd.detach(),
                                                  "acc": accuracy(logits, labels)}


def ce_objective(teacher: nn.Module | None = None, label_smoothing: float = 0.0) -> MLLObjective:
    """The no-KD baseline: cross-entropy only (the teacher is ignored)."""
    return MLLObjective(label_smoothing)


#: method name -> factory(teacher, **hparams) -> Objective, defaults from RepDistiller / mdistiller.
KD_METHODS: dict[str, Callable[..., Objective]] = {
    "ce": ce_objective,
    "kd": kd_objective,
    "fitnet": FitNetObjective,
    "at": ATObjective,
    "sp": SPObjective,
    "cc": CCObjective,
    "vid": VIDObjective,
    "rkd": RKDObjective,
    "pkt": PKTObjective,
    "ab": ABObjective,
    "ft": FTObjective,
    "fsp": FSPObjective,
    "nst": NSTObjective,
    "crd": CRDObjective,
    "dkd": DKDObjective,
}


def method_hparams(method: str) -> dict:
    """The hyper-parameters a method's factory accepts (besides the teacher), with their defaults."""
    factory = _factory(method)
    sigs = [inspect.signature(factory)]
    if isinstance(factory, type) and issubclass(factory, DistillObjective):
        sigs.append(inspect.signature(DistillObjective.__init__))
    out = {}
    for sig in sigs:
        for p in sig.parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in ("self", "teacher") \
                    and p.name not in out and p.default is not p.empty:
                out[p.name] = p.default
    return out


def _factory(method: str) -> Callable[..., Objective]:
    key = method.lower() if isinstance(method, str) else method
    if key not in KD_METHODS:
        raise ValueError(f"method={method!r} is not accepted: expected one of {', '.join(KD_METHODS)}")
    return KD_METHODS[key]


def build_objective(method: str, teacher: nn.Module, **hparams) -> Objective:
    """The objective of KD method `method` with the literature defaults, `hparams` overriding them."""
    factory = _factory(method)
    accepted = method_hparams(method)
    unknown = [k for k in hparams if k not in accepted]
    if unknown:
        raise ValueError(f"{unknown[0]}={hparams[unknown[0]]!r} is not accepted for method {method!r}: expected a "
                         f"TrainConfig field or one of {', '.join(accepted)}")
    return factory(teacher, **hparams)


def distill(student: nn.Module, teacher: nn.Module, data: ImageData, method: str = "kd",
            config: TrainConfig | None = None, *, eval_data: ImageData | None = None,
            checkpoint: str | os.PathLike | None = None, resume: bool = False,
            callbacks: Iterable[Callable[[dict, nn.Module], None]] = (), **hparams_and_overrides) -> list[dict]:
    """Distil `teacher` into `student` (trained in place) with KD method `method`; return fit's history.

    Keywords that name :class:`TrainConfig` fields go to :func:`fit` (``epochs=5, lr=0.1``); the others are the
    method's hyper-parameters (``beta=..., temperature=...``, see :func:`method_hparams`), literature defaults
    otherwise. The teacher stays frozen and in eval mode. ``distill(s, t, data, "crd", epochs=240)``.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in hparams_and_overrides.items() if k in fields}
    hparams = {k: v for k, v in hparams_and_overrides.items() if k not in fields}
    objective = build_objective(method, teacher, **hparams)
    return fit(student, data, objective, config, eval_data=eval_data, callbacks=callbacks, checkpoint=checkpoint,
               resume=resume, **overrides)
