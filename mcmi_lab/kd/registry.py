"""The registry of the KD methods: :data:`KD_METHODS` (name -> factory, Hinton KD being
:func:`mcmi_lab.training.objectives.kd_objective` and the no-KD baseline :func:`ce_objective`), :func:`method_hparams`,
:func:`build_objective` and :func:`distill`, which runs one method through :func:`mcmi_lab.training.loop.fit`.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable, Iterable

from torch import nn

from ..data.core import ImageData
from ..training.objectives import MLLObjective, Objective, kd_objective
from ..training.loop import TrainConfig, fit
from .base import DistillObjective
from .contrastive import CRDObjective
from .logit import CTKDObjective, DISTObjective, DKDObjective, MLKDObjective
from .methods import (ABObjective, ATObjective, CCObjective, FitNetObjective, FSPObjective, FTObjective, KDSVDObjective,
                      NSTObjective, PKTObjective, RKDObjective, SPObjective, VIDObjective)
from .review import ReviewKDObjective


def ce_objective(teacher: nn.Module | None = None, label_smoothing: float = 0.0) -> MLLObjective:
    """The no-KD baseline: cross-entropy only (the teacher is ignored)."""
    return MLLObjective(label_smoothing)


#: method name -> factory(teacher, **hparams) -> Objective, defaults from RepDistiller / mdistiller / the authors' code.
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
    "kdsvd": KDSVDObjective,
    "dist": DISTObjective,
    "reviewkd": ReviewKDObjective,
    "ctkd": CTKDObjective,
    "mlkd": MLKDObjective,
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
