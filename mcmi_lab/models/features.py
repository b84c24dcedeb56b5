"""Intermediate activations through forward hooks: models return logits, features come from here.

    with capture(model, feature_layers(model)) as feats:
        logits = model(images)          # feats: {name: tensor}, filled by this forward
    # hooks are gone here; feats keeps the last values

The captured tensors are the modules' own outputs (not copies, not detached), so losses on them backpropagate
into the model, as feature-based KD needs.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn


def _resolve(model: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """name -> module for each requested name; an unknown name is a ValueError naming some valid ones."""
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            valid = [n for n in modules if n]
            hints = difflib.get_close_matches(name, valid, n=5, cutoff=0.5) or valid[:5]
            raise ValueError(f"layer {name!r} is not accepted: expected a name from model.named_modules(), "
                             f"e.g. {', '.join(map(repr, hints))}")
    return {name: modules[name] for name in names}


@contextmanager
def capture(model: nn.Module, layers: str | Sequence[str],
            inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Hook the named modules; yield a dict name -> the module's output (or its first input when inputs=True).

    Each forward overwrites the entries (a module called twice in one forward keeps its last call). The hooks
    are removed when the block exits, also through an exception. Example: the pooled feature (B, D) is
    ``capture(model, classifier_layer(model), inputs=True)``.
    """
    modules = _resolve(model, layers)  # before any hook is registered: a bad name leaves the model untouched
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output):
            captured[name] = args[0] if inputs else output
        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(keep(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def restoring_modes(model: nn.Module) -> Iterator[None]:
    """Give every module its own train/eval flag back on exit (a frozen BatchNorm inside a training model stays
    frozen), for dry forwards in eval mode and for libraries that set eval and never restore it (grad-cam)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def feature_shapes(model: nn.Module, layers: str | Sequence[str],
                   input_shape: Sequence[int]) -> list[torch.Size]:
    """Per-sample shapes of the named modules' outputs, in the order of `layers`, for inputs of `input_shape`.

    input_shape: (C, H, W). Runs one forward of a zero batch (B = 1) in eval mode under no_grad, then puts every
    module back in its own train/eval mode; BN running statistics are not touched. KD methods size their
    connectors with it: ``feature_shapes(student, names, (1, 28, 28)) -> [torch.Size([16, 28, 28]), ...]``.
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape={input_shape!r} is not accepted: expected three positive integers (C, H, W)")
    names = [layers] if isinstance(layers, str) else list(layers)
    param = next(iter(model.parameters()), None)
    x = torch.zeros((1,) + shape, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    with restoring_modes(model), torch.no_grad(), capture(model, names) as feats:
        model.eval()
        model(x)
    missing = [n for n in names if n not in feats]
    if missing:
        raise ValueError(f"layers {missing!r} are not accepted: they produced no output in a forward pass "
                         f"of shape {(1,) + shape}")
    return [feats[n].shape[1:] for n in names]
