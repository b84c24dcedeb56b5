"""Many small models of one architecture trained as one network (issue 18).

Small models waste the hardware: their steps cost launches and per-op overhead, not arithmetic. A
:class:`ModelStack` fuses N models of one architecture into one network of the same class: every convolution becomes
one grouped convolution (groups × N), every BatchNorm one BatchNorm over N·C channels (its statistics are per channel,
so per model), every Linear one batched matmul. Activations are laid out channel-stacked, (B, N·C, H, W) and
(B, N·D): member i owns the i-th block of channels, and the model's own forward (pools, ReLU, flatten) keeps the
blocks apart. The members stay ordinary modules whose parameters are views of the fused ones, so an optimizer on
the members' parameters trains the stack and every member comes out as a plain model.

:func:`fit_stack` trains N models as ``fit`` would train each: own data order and augmentation (its seed), own
objective and hyper-parameters (lr, schedule, momentum, weight decay); see :mod:`mcmi_lab.training.stack_fit`.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..models.small import MLP, SmallCNN
from ..models.wrappers import TemperatureScaled

#: Architectures whose forward keeps channel blocks apart (only per-channel ops between the fused layers); an
#: nn.Sequential of the layers below is one too.
STACKABLE = (SmallCNN, MLP, nn.Sequential)
#: Layers without weights that act on each channel (or feature) alone, kept as they are in the fused network
#: (Flatten from dim 1 keeps each model's block of channels contiguous).
PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Sequential, nn.Flatten)
_FUSED = (nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear)


def stack_problem(models: Sequence[nn.Module], trainable: bool = True) -> str | None:
    """None when `models` can be fused into one :class:`ModelStack`, else one line saying why not (for a fallback
    to one model at a time). `trainable`: every parameter must require gradients (it is trained as one tensor)."""
    if not isinstance(models, (list, tuple)) or not models:
        return (f"models={type(models).__name__ if not isinstance(models, (list, tuple)) else '[]'} is not accepted: "
                "expected a non-empty list of models of one architecture")
    first = models[0]
    if type(first) not in STACKABLE:
        return (f"a {type(first).__name__} cannot be stacked: the architectures known to keep each model's channels "
                f"apart are {', '.join(t.__name__ for t in STACKABLE)}; train the others one at a time")
    signature = _signature(first)
    for i, model in enumerate(models[1:], 1):
        if type(model) is not type(first):
            return (f"model {i} is a {type(model).__name__} and model 0 a {type(first).__name__}: a stack is of one "
                    "architecture; stack each architecture apart")
        if _signature(model) != signature:
            other = next(f"{a[0]}: {a[1:]} vs {b[1:]}" for a, b in zip(_signature(model), signature) if a != b) \
                if len(_signature(model)) == len(signature) else "another number of layers"
            return f"model {i} has other layers than model 0 ({other}): a stack needs the same layers and shapes"
    if len({id(m) for m in models}) < len(models):
        return "the same model object is given twice: a stack needs N distinct models (copy.deepcopy one)"
    for name, layer in first.named_modules():
        if (not isinstance(layer, _FUSED + PER_CHANNEL) and layer is not first) or (
                isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1)):
            return f"layer {name!r} ({layer}) cannot be stacked: no fused form of it is known"
        if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)) and (layer.momentum is None or not layer.affine or
                                                                    not layer.track_running_stats):
            return f"BatchNorm {name!r} needs momentum, affine and running statistics to be stacked"
    if trainable and any(not p.requires_grad for m in models for p in m.parameters()):
        return "models with frozen parameters are not accepted for training as a stack: call requires_grad_(True)"
    return None


def _signature(model: nn.Module) -> list[tuple]:
    leaves = [(n, repr(m)) for n, m in model.named_modules() if not list(m.children())]
    return leaves + [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


class StackedLinear(nn.Module):
    """N Linear layers as one batched matmul. weight (N·K, D), bias (N·K,); input (B, N·D) -> output (B, N·K)."""

    def __init__(self, n: int, in_features: int, out_features: int, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, k = self.n, self.in_features, self.out_features
        x = x.reshape(len(x), n, d).transpose(0, 1)  # (N, B, D)
        out = torch.baddbmm(self.bias.view(n, 1, k), x, self.weight.view(n, k, d).transpose(1, 2))
        return out.transpose(0, 1).reshape(len(out[0]), n * k)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    like = tensors[0]
    fmt = torch.channels_last if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) \
        and not like.is_contiguous() else torch.contiguous_format
    return torch.cat([t.detach() for t in tensors]).contiguous(memory_format=fmt)


def _fuse(layers: list[nn.Module]) -> nn.Module:
    """One fused layer from the same layer of every member (their parameters concatenated along dim 0)."""
    n, first = len(layers), layers[0]
    if isinstance(first, nn.Conv2d):
        fused = nn.Conv2d(n * first.in_channels, n * first.out_channels, first.kernel_size, first.stride,
                          first.padding, first.dilation, n * first.groups, first.bias is not None, first.padding_mode,
                          device="meta")
    elif isinstance(first, nn.Linear):
        return StackedLinear(n, first.in_features, first.out_features, _cat([m.weight for m in layers]),
                             _cat([m.bias for m in layers]))
    else:
        fused = type(first)(n * first.num_features, first.eps, first.momentum, device="meta")
        for name in ("running_mean", "running_var"):
            fused.register_buffer(name, _cat([getattr(m, name) for m in layers]))
        fused.register_buffer("num_batches_tracked", first.num_batches_tracked.detach().clone())
    for name, _ in list(fused.named_parameters()):
        setattr(fused, name, nn.Parameter(_cat([getattr(m, name) for m in layers])))
    return fused


class ModelStack(nn.Module):
    """N models of one architecture (:func:`stack_problem`) as one fused network; ``forward(images)`` -> (N, B, K).

    images: (N, B, C, H, W), a list of N (B, C, H, W) batches (each member its own) or one (B, C, H, W) batch for all.
    The members (``stack.members``, the models given) stay usable: their parameters become views of the fused ones.
    Their BatchNorm running statistics are views of a copy that :meth:`push_statistics` updates from the fused
    network (fit_stack: after every step, so a member evaluated inside a step sees the statistics before it) and
    :meth:`pull_statistics` writes back. :meth:`untie` gives the members their own storage again; :meth:`unstack`
    returns independent copies.
    """

    def __init__(self, models: Sequence[nn.Module], trainable: bool = True):
        problem = stack_problem(models, trainable)
        if problem:
            raise ValueError(problem)
        super().__init__()
        self.n = len(models)
        self.__dict__["members"] = list(models)  # not submodules: their tensors are views of the stack's
        self.__dict__["_template"] = copy.deepcopy(models[0])
        self.fused = copy.deepcopy(models[0])
        for name, layer in list(self.fused.named_modules()):
            if isinstance(layer, _FUSED):
                parent, _, child = name.rpartition(".")
                setattr(self.fused.get_submodule(parent), child, _fuse([m.get_submodule(name) for m in models]))
        self._tie()

    def _tie(self) -> None:
        """Point the members' parameters at slices of the fused ones, their BN buffers at slices of the copies."""
        self._live, self._shadow, self._counts = [], [], []
        for name, fused in self.fused.named_parameters():
            for member, view in zip(self.members, fused.detach().unflatten(0, (self.n, -1))):
                member.get_parameter(name).data = view
        for name, layer in self.fused.named_modules():
            if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
                counts = torch.stack([m.get_submodule(name).num_batches_tracked for m in self.members])
                self._counts.append(counts)
                for buf in ("running_mean", "running_var"):
                    live = getattr(layer, buf)
                    self._live.append(live)
                    self._shadow.append(live.clone())
                for i, member in enumerate(self.members):
                    bn = member.get_submodule(name)
                    bn._buffers["running_mean"] = self._shadow[-2].unflatten(0, (self.n, -1))[i]
                    bn._buffers["running_var"] = self._shadow[-1].unflatten(0, (self.n, -1))[i]
                    bn._buffers["num_batches_tracked"] = counts[i]

    def push_statistics(self, steps: int = 1) -> None:
        """Members' BN running statistics <- the fused network's; their batch counts + `steps`."""
        if self._live:
            torch._foreach_copy_(self._shadow, self._live)
            torch._foreach_add_(self._counts, steps)

    def pull_statistics(self) -> None:
        """The fused network's BN running statistics <- the members' (after a member ran in train mode itself)."""
        if self._live:
            torch._foreach_copy_(self._live, self._shadow)

    def untie(self) -> list[nn.Module]:
        """Give every member its own storage (a copy of its current values); returns the members."""
        for member in self.members:
            for p in member.parameters():
                p.data = p.data.clone()
                p.grad = None
            for module in member.modules():
                for key, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[key] = buf.clone()
        return self.members

    def unstack(self) -> list[nn.Module]:
        """N independent plain models with the members' current weights and statistics (the stack is unchanged)."""
        self.push_statistics(0)
        return [self._copy(m) for m in self.members]

    def _copy(self, member: nn.Module) -> nn.Module:
        out = copy.deepcopy(self._template)
        out.load_state_dict(member.state_dict())
        return out

    def input(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images as the fused network reads them: (B, N·C, H, W), in its first convolution's memory format."""
        if isinstance(images, (list, tuple)):
            if len(images) != self.n:
                raise ValueError(f"{len(images)} batches are not accepted by a stack of {self.n}: give one per model")
            x = torch.cat(list(images), 1)
        elif images.dim() == 5:
            if len(images) != self.n:
                raise ValueError(f"images of shape {tuple(images.shape)} are not accepted by a stack of {self.n}: "
                                 "expected (N, B, C, H, W) with N the number of models")
            x = images.transpose(0, 1).flatten(1, 2)
        else:
            x = images.repeat(1, self.n, *([1] * (images.dim() - 2)))
        conv = next((m for m in self.fused.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None and conv.weight.is_contiguous(memory_format=torch.channels_last) \
                and not conv.weight.is_contiguous():
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], network: nn.Module | None = None) -> torch.Tensor:
        """(N, B, K) logits; `network`: what runs the fused network (default ``self.fused``; fit_stack passes its
        torch.compile'd form)."""
        out = (self.fused if network is None else network)(self.input(images))
        return out.view(len(out), self.n, -1).transpose(0, 1)


def stack_models(models: Sequence[nn.Module], trainable: bool = False) -> ModelStack:
    """:class:`ModelStack` of `models` (they become its members: views of its weights until ``untie()``)."""
    return ModelStack(models, trainable)


def unstack(stack: ModelStack) -> list[nn.Module]:
    """N plain models, each an ordinary module with its member's weights (saved and loaded like any other)."""
    return stack.unstack()


def teacher_parts(teacher: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """(the model a teacher's logits come from, its temperature or None): a temperature-scaled teacher's logits are
    its model's divided by the temperature, so teachers stack on their models."""
    if isinstance(teacher, TemperatureScaled):
        return teacher.model, teacher.temperature
    return teacher, None
