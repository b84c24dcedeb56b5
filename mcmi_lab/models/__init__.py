"""The model zoo: RepDistiller / CRD CIFAR architectures, two small CNNs and an MLP, built by name.

Every model maps images (B, C, H, W) to logits (B, K) and nothing else; intermediate features come from
forward hooks (:func:`mcmi_lab.models.features.capture`) on the module names that :func:`feature_layers`,
:func:`classifier_layer` and :func:`cam_layer` return. Tian et al., Contrastive Representation Distillation,
https://arxiv.org/abs/1910.10699, and its code (github.com/HobbitLong/RepDistiller) define the zoo: the
models here match it layer for layer (same parameter counts, same module names, so its checkpoints load),
with adaptive average pooling so that 28x28 inputs work too.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..utils import check_int
from . import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, small, vgg, wrn

#: name -> builder(num_classes, in_channels=3, **overrides). Names are the ``model_dict`` keys of RepDistiller and
#: of the MCMI authors' fork (github.com/iclr2024mcmi/ICLRMCMI); where the two spell a model differently, both
#: keys point at the same builder (an alias), so either spelling loads that code's checkpoints.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet.resnet8,
    "resnet14": resnet.resnet14,
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet44": resnet.resnet44,
    "resnet56": resnet.resnet56,
    "resnet110": resnet.resnet110,
    "resnet152": resnet.resnet152,  # the MCMI fork's CIFAR basic-block depth 152 (2.42M parameters)
    "resnet8x4": resnet.resnet8x4,
    "resnet32x4": resnet.resnet32x4,
    "ResNet50": resnetv2.resnet50,
    "ResNet152": resnetv2.resnet152,  # RepDistiller's resnetv2.py bottleneck ResNet152 (58M parameters)
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "mobile_half": mobilenetv2.mobile_half,  # RepDistiller's model_dict key
    "MobileNetV2": mobilenetv2.mobile_half,  # alias: the MCMI fork's model_dict key
    "ShuffleV1": shufflenetv1.shuffle_v1,
    "ShuffleV2": shufflenetv2.shuffle_v2,
    "cnn_small": small.cnn_small,
    "cnn_tiny": small.cnn_tiny,
    "mlp": small.mlp,  # the known-posterior task's model (no feature map: no Eigen-CAM, logit-based KD only)
}


def build_model(name: str, num_classes: int, in_channels: int = 3, **overrides: Any) -> nn.Module:
    """A fresh model from :data:`MODELS`, with ``model.spec`` set so that ``build_model(**model.spec)`` rebuilds it.

    overrides: builder keywords, e.g. ``width=32`` for ``cnn_small`` / ``cnn_tiny``; other models take none.
    """
    if name not in MODELS:
        raise ValueError(f"name={name!r} is not accepted: expected one of {', '.join(MODELS)}")
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
    builder = MODELS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "in_channels")]
    for key in overrides:
        if key not in accepted:
            raise ValueError(f"{key}={overrides[key]!r} is not accepted for model {name!r}: expected "
                             + (f"only {', '.join(accepted)}" if accepted else "no keyword overrides"))
    model = builder(num_classes=num_classes, in_channels=in_channels, **overrides)
    model.spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **overrides}
    return model


# ---- where the features are: module names per family -------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    stages: Callable[[nn.Module, bool], list[str]]  # (model, preact) -> stage feature names
    classifier: str  # the final Linear; its input is the pooled feature
    cam: str | None  # the last convolutional feature map, the input of the global pool (None: the model has none)


def _last_blocks(model: nn.Module, stem: str, stages: tuple[str, ...], preact: bool) -> list[str]:
    """The stem's output, then each stage's output, or its last block's ``preact`` (the pre-ReLU value)."""
    return [stem] + [f"{s}.{len(getattr(model, s)) - 1}.preact" if preact else s for s in stages]


_LAYOUTS: dict[type, _Layout] = {
    resnet.ResNet: _Layout(lambda m, pre: _last_blocks(m, "relu", ("layer1", "layer2", "layer3"), pre),
                           "fc", "layer3"),
    resnetv2.ResNetV2: _Layout(lambda m, pre: _last_blocks(m, "relu", ("layer1", "layer2", "layer3", "layer4"), pre),
                               "linear", "layer4"),
    # Pre-activation blocks: RepDistiller's preact features are the next BN's outputs (before its ReLU).
    wrn.WideResNet: _Layout(lambda m, pre: (["conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"] if pre
                                            else ["conv1", "block1", "block2", "block3"]), "fc", "relu"),
    vgg.VGG: _Layout(lambda m, pre: ["relu0"] + [f"block{i}" if pre else f"relu{i}" for i in range(1, 5)],
                     "classifier", "relu4"),
    # RepDistiller gives MobileNetV2 no preact features: the blocks end in a linear (no-ReLU) projection.
    mobilenetv2.MobileNetV2: _Layout(lambda m, pre: ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
                                     "classifier.0", "conv2"),
    shufflenetv1.ShuffleNetV1: _Layout(lambda m, pre: _last_blocks(m, "relu", ("layer1", "layer2", "layer3"), pre),
                                       "linear", "layer3"),
    shufflenetv2.ShuffleNetV2: _Layout(lambda m, pre: _last_blocks(m, "relu1", ("layer1", "layer2", "layer3"), pre),
                                       "linear", "relu2"),
    small.SmallCNN: _Layout(lambda m, pre: [f"stage{i}.4" if pre else f"stage{i}" for i in (1, 2, 3)],
                            "fc", "stage3"),
    small.MLP: _Layout(lambda m, pre: ["fc1", "fc2"] if pre else ["relu1", "relu2"], "fc", None),
}


def _layout(model: nn.Module) -> _Layout:
    for cls in type(model).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    known = ", ".join(c.__name__ for c in _LAYOUTS)
    raise ValueError(f"model of type {type(model).__name__} is not accepted: expected a model from build_model "
                     f"({known})")


def feature_layers(model: nn.Module, preact: bool = False) -> list[str]:
    """Names (as in ``model.named_modules()``) of the modules whose outputs are the stage features.

    RepDistiller's ``feat`` list without the pooled one (that is the input of :func:`classifier_layer`):
    e.g. for the CIFAR ResNets the stem, layer1, layer2, layer3 outputs (B, C_i, H_i, W_i). preact=True gives
    the values before the stage's last ReLU where the reference defines them (its ``preact=True`` path).
    """
    return _layout(model).stages(model, preact)


def classifier_layer(model: nn.Module) -> str:
    """Name of the final Linear; capture its input for the pooled feature (B, D)."""
    return _layout(model).classifier


def cam_layer(model: nn.Module) -> str:
    """Name of the default Eigen-CAM target: the module whose output is the last conv feature map (B, C, h, w)."""
    cam = _layout(model).cam
    if cam is None:
        raise ValueError(f"model of type {type(model).__name__} is not accepted for Eigen-CAM: it has no "
                         "convolutional feature map; expected a CNN from build_model")
    return cam


__all__ = ["MODELS", "build_model", "feature_layers", "classifier_layer", "cam_layer"]
