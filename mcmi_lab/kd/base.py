"""The shared parts of the feature KD methods: which layers' features, captured by hooks; the connectors of
RepDistiller's ``models/util.py`` (:class:`ConvRegressor`, :class:`Embed`, FT's conv stacks); and
:class:`DistillObjective`, the objective every feature method subclasses, with the shape checks they share.

Features follow RepDistiller's ``feat`` list: :func:`mcmi_lab.models.feature_layers` gives ``feat[:-1]`` (for the
CIFAR ResNets the stem, then each stage), the input of :func:`mcmi_lab.models.classifier_layer` is ``feat[-1]``
(the pooled vector). ``student_layers`` / ``teacher_layers`` replace the default layers with exactly the modules
whose outputs a method compares (any model, not only the zoo's). Connectors are built in ``prepare`` from the
shapes of one dry forward, trained with the student and saved in checkpoints; the teacher is held outside the
module tree (never trained, never saved, always in eval mode).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import ImageData
from ..models.features import capture, restoring_modes
from ..losses.teacher import kd_loss
from ..models import classifier_layer, feature_layers
from ..training.objectives import Objective, accuracy
from ..training.runtime import freeze_teacher, memory_format
from ..utils import check_float

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
            loss = loss + self.method_weight() * method
            terms[self.name] = method.detach()
            for key, extra in self.auxiliary_losses(s, t).items():
                loss = loss + extra
                terms[key] = extra.detach()
        terms["acc"] = accuracy(logits, labels)
        return loss, terms

    def method_weight(self) -> float:
        """The weight of the method's term this epoch: beta (ReviewKD ramps it up over its warm-up)."""
        return self.beta

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
