"""Checkpoints as plain dicts of tensors and primitives, written atomically, loaded without running code.

`torch.load(..., weights_only=True)` refuses any pickle that would construct arbitrary objects, so a checkpoint
crafted to run code when unpickled is rejected before anything runs.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import build_model
from ..utils import atomic_write

FORMAT = "mcmi_lab/1"


class UnsafeCheckpointError(ValueError):
    """The file is not a plain-data checkpoint (it would need arbitrary code to load)."""


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Atomically write `state` (tensors, numbers, strings, lists, dicts) to `path`; returns the path.

    An `nn.Module` value is stored as its state_dict plus its `spec` (name, classes, channels) when it has one.
    """
    payload: dict[str, Any] = {"format": FORMAT}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            payload[key] = value.state_dict()
            if getattr(value, "spec", None) is not None:
                payload.setdefault("spec", dict(value.spec))
        else:
            payload[key] = value
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any plain-data torch file), safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the offending global (or opcode) is the one fact to show
        text = str(err)
        operand = re.search(r"Unsupported operand (\d+)", text)
        if operand and chr(int(operand.group(1))) not in pickletools.code2op:
            # a byte that is no pickle opcode at all: a text or other file, not a pickle that would run code
            raise ValueError(f"checkpoint {str(path)!r} could not be read (it is empty, truncated or not written by "
                             f"torch.save): byte {int(operand.group(1))} is not a pickle opcode") from None
        found = (re.search(r"Unsupported (global: GLOBAL \S+?|operand \d+)(?= was|\s*$|\n)", text)
                 or re.search(r"unsupported GLOBAL \S+", text))
        # never torch's advice to retry with weights_only=False: that is how a hostile file gets to run
        reason = found.group(0) if found else "it needs objects beyond plain data"
        raise UnsafeCheckpointError(f"checkpoint {str(path)!r} was refused: it is not plain data (tensors, numbers, "
                                    f"strings, lists, dicts) and loading it would run code ({reason})") from None
    except Exception as err:  # truncated, empty or not a torch file at all
        detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or ['(no message)'])[0]}"
        raise ValueError(f"checkpoint {str(path)!r} could not be read (it is empty, truncated or not written by "
                         f"torch.save): {detail}") from None


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint",
               check_only: bool = False) -> nn.Module:
    """`model.load_state_dict(state_dict)` with one clear message listing missing/unexpected keys and shape clashes
    (`check_only`: the message, or nothing; no weights copied, e.g. into a model on the meta device)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise ValueError(f"{what} does not fit this model ({type(model).__name__}): " + "; ".join(parts))
    if not check_only:
        model.load_state_dict(state_dict)
    return model


def save_model(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Save a model built by `build_model` (weights + spec) with optional extra plain data (e.g. results)."""
    if getattr(model, "spec", None) is None:
        raise ValueError("save_model needs a model made by build_model (it has a .spec); use save_checkpoint instead")
    return save_checkpoint(path, model=model, **extra)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or a training checkpoint of a `build_model` model)."""
    state = load_checkpoint(path)
    what = f"checkpoint {str(path)!r}"
    if not isinstance(state, dict):
        raise ValueError(f"{what} holds a {type(state).__name__}, not a dict with a model spec and weights: it was "
                         "not saved from a build_model model")
    spec = state.get("spec")
    if not spec or not isinstance(spec, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{what} has no model spec and weights (it holds "
                         f"{', '.join(map(str, state)) or 'nothing'}): it was not saved from a build_model model")
    spec = dict(spec)
    args = (spec.pop("name", None), spec.pop("num_classes", None), spec.pop("in_channels", None))
    _check_spec(what, args, spec, state["model"])
    try:
        with torch.device("meta"):  # the spec is checked against the weights' shapes before any memory is allocated
            load_state(build_model(*args, **spec), state["model"], what, check_only=True)
    except (TypeError, KeyError) as err:  # a spec entry build_model does not take
        raise ValueError(f"{what} holds a model spec build_model does not take ({type(err).__name__}: {err})") from None
    return load_state(build_model(*args, **spec), state["model"], what).to(device)


def _check_spec(what: str, args: tuple, spec: dict, weights: dict) -> None:
    """One line unless the spec's name is a string, its class and channel counts integers >= 1, every other entry
    a keyword name, and every weight a tensor (lists of numbers are not weights)."""
    name, num_classes, in_channels = args
    counts = (num_classes, in_channels)
    if not isinstance(name, str) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts) \
            or not all(isinstance(k, str) for k in spec):
        raise ValueError(f"{what} holds a model spec that is not accepted (name {name!r}, num_classes "
                         f"{num_classes!r}, in_channels {in_channels!r}): expected a model name and integer counts, "
                         "as save_model writes them")
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what} holds weights that are not tensors ({bad[0]!r}: "
                         f"{type(weights[bad[0]]).__name__}{' ...' if len(bad) > 1 else ''}): expected a state_dict "
                         "of tensors, as save_model writes it")
