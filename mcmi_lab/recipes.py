"""The paper's steps as one call each: an MLL teacher, its MCMI fine-tune, and the fair controls.

Every recipe is `fit` with a particular objective and config; nothing here trains in its own loop.
Model selection never looks at the test set: the teacher is the last epoch's weights.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .data import ImageData
from .evaluate import predict
from .objectives import mcmi_objective, mll_objective
from .train import TrainConfig, fit
from .utils import check_float, set_seed


def _model(model: str | nn.Module, data: ImageData, seed: int, **model_kwargs) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from .models import build_model

    set_seed(seed)  # the initial weights are a function of the seed
    return build_model(model, data.num_classes, data.in_channels, **model_kwargs)


def train_teacher(data: ImageData, model: str | nn.Module = "cnn_small", epochs: int = 240, *, seed: int = 0,
                  label_smoothing: float = 0.0, eval_data: ImageData | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False, model_kwargs: dict | None = None,
                  **fit_kwargs) -> tuple[nn.Module, list[dict]]:
    """An MLL teacher (cross-entropy; label smoothing > 0 gives the label-smoothing control).

    Defaults: the reference schedule (SGD 0.05, ×0.1 at 5/8, 3/4, 7/8 of the epochs, wd 5e-4, batch 64).
    Returns (model, history).
    """
    net = _model(model, data, seed, **(model_kwargs or {}))
    hist = fit(net, data, mll_objective(label_smoothing), TrainConfig(epochs=epochs, seed=seed),
               eval_data=eval_data, checkpoint=checkpoint, resume=resume, **fit_kwargs)
    return net, hist


def finetune_mcmi(teacher: nn.Module, data: ImageData, lam: float, epochs: int = 20, *, update: str = "running",
                  seed: int = 0, lr: float = 0.05, schedule: str = "cosine", ema_decay: float = 0.999,
                  guard: bool = True, refresh_steps: int | None = None, eval_data: ImageData | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False,
                  **fit_kwargs) -> tuple[nn.Module, list[dict]]:
    """The paper's step: fine-tune a copy of a trained MLL teacher with CE − λ·KL(P_x ‖ Q_y) (SGD 0.05 cosine,
    wd 5e-4, batch 64). `lam=0` is the fair control: the same extra epochs without the CMI term.

    update, refresh_steps: the centroid update (:class:`mcmi_lab.train.MCMIObjective`): "running" (default: class
    means of the training outputs, refreshed every `refresh_steps` steps and per epoch, no extra pass), "epoch"
    (a full pass per epoch), "frozen" (the reference code exactly) or "ema". Returns (fine-tuned copy, history);
    `teacher` is not modified.
    """
    check_float("lam", lam, 0.0)
    model = copy.deepcopy(teacher)
    objective = mcmi_objective(lam, update=update, ema_decay=ema_decay, guard=guard, refresh_steps=refresh_steps)
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr, schedule=schedule)
    hist = fit(model, data, objective, cfg, eval_data=eval_data, checkpoint=checkpoint, resume=resume, **fit_kwargs)
    return model, hist


def finetune_control(teacher: nn.Module, data: ImageData, epochs: int = 20, **kwargs) -> tuple[nn.Module, list[dict]]:
    """The λ = 0 control: the MCMI fine-tune recipe with the CMI term switched off (same epochs, lr, schedule)."""
    return finetune_mcmi(teacher, data, 0.0, epochs, **kwargs)


class TemperatureScaled(nn.Module):
    """A model whose logits are divided by a fixed temperature (Guo et al. 2017, temperature scaling)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.spec = getattr(model, "spec", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def temperature_scale(model: nn.Module, val_data: ImageData, steps: int = 100) -> TemperatureScaled:
    """The temperature-scaled control teacher: T fitted by minimising NLL on held-out (validation, not test) data."""
    logits, labels = predict(model, val_data)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    return TemperatureScaled(copy.deepcopy(model), float(log_t.exp()))
