"""Eigen-CAM maps of a classifier and per-image statistics to compare teachers by (MLL vs MCMI).

Eigen-CAM (Muhammad & Yeasin, arXiv:2008.00299) projects the activations of a convolutional stage onto their first
principal component: no gradients, no target class. Built on pytorch-grad-cam's ``EigenCAM``, with what makes maps
of different models comparable (DESIGN.md §2):

* the sign of a principal component is arbitrary, so each map is flipped when |min| > |max|
  (grad-cam's ``get_2d_projection_with_sign_correction``; Chung & Ying, Seg-Eigen-CAM, Appl. Sci. 2025, Eq. 13);
* grad-cam then clips at 0 and min-max scales every map to [0, 1] at the input resolution, so intensities carry no
  scale: compare models through :func:`cam_statistics` (share of pixels above half the maximum, entropy of the
  normalised map, CAM mass inside the object), never through raw values.

grad-cam puts the model in eval mode and never restores it, and its context manager prints and swallows IndexError;
:func:`eigen_cams` restores every module's mode and lets every error through, with the hooks released.
grad-cam (and with it OpenCV and scikit-learn) is imported on first use, not with the package.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import torch
from torch import nn

import matplotlib.cm
import matplotlib.colors
from matplotlib.figure import Figure

from ..models.features import restoring_modes
from ..models import cam_layer
from .plots import TEACHER_LABELS, save_figure
from ..utils import check_float, check_int

__all__ = [
    "CAM_STATISTICS",
    "MASK_THRESHOLD",
    "SignCorrectedEigenCAM",
    "default_target_layer",
    "resolve_target_layer",
    "eigen_cams",
    "cam_statistics",
    "object_masks",
    "summarize_cams",
    "format_cam_table",
    "compare_cams",
    "plot_cam_grid",
]

#: Object-mask threshold for dark-background images (Fashion-MNIST), as a fraction of full intensity.
MASK_THRESHOLD = 0.05


# ---- grad-cam, with the sign fixed ------------------------------------------------------------------------------

@functools.cache
def _signed_eigen_cam_class() -> type:
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    class SignCorrectedEigenCAM(EigenCAM):
        """grad-cam's EigenCAM with the principal component's sign corrected (flip when |min| > |max|)."""

        def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
            if activations.ndim != 4:
                raise ValueError(f"a target layer output of shape {tuple(activations.shape)} is not accepted: "
                                 "expected (B, C, h, w) from a convolutional stage")
            return get_2d_projection_with_sign_correction(activations)

        def __exit__(self, exc_type, exc_value, exc_tb):
            self.activations_and_grads.release()
            return False  # grad-cam's own __exit__ swallows IndexError; a caller must see every error

    return SignCorrectedEigenCAM


def __getattr__(name: str):
    if name == "SignCorrectedEigenCAM":  # built lazily so that importing mcmi_lab does not import grad-cam
        return _signed_eigen_cam_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- target layer -----------------------------------------------------------------------------------------------

def default_target_layer(model: nn.Module) -> str:
    """Name of the default Eigen-CAM layer: ``mcmi_lab.models.cam_layer(model)`` where it knows the model, else the
    last top-level child that contains a Conv2d (the last convolutional stage of a plain CNN)."""
    try:
        return cam_layer(model)
    except (ValueError, KeyError, LookupError, TypeError, AttributeError):
        pass  # not a zoo model: use the plain rule below
    conv_children = [name for name, child in model.named_children()
                     if any(isinstance(m, nn.Conv2d) for m in child.modules())]
    if not conv_children:
        raise ValueError(f"model {type(model).__name__} is not accepted without target_layer: "
                         "expected a top-level child that contains a Conv2d")
    return conv_children[-1]


def resolve_target_layer(model: nn.Module, target_layer: str | nn.Module | None = None) -> nn.Module:
    """The module of `model` to take activations from: given as a name, as the module itself, or None (default)."""
    if target_layer is None:
        target_layer = default_target_layer(model)
    if isinstance(target_layer, str):
        try:
            return model.get_submodule(target_layer)
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            raise ValueError(f"target_layer={target_layer!r} is not accepted: expected a submodule name of the "
                             f"model, e.g. one of {names}") from None
    if isinstance(target_layer, nn.Module):
        if not any(m is target_layer for m in model.modules()):
            raise ValueError(f"target_layer={type(target_layer).__name__} is not accepted: expected a submodule "
                             "of the model")
        return target_layer
    raise ValueError(f"target_layer={target_layer!r} is not accepted: expected a module name, a module or None")


# ---- maps -------------------------------------------------------------------------------------------------------

def _run_eigen_cam(model: nn.Module, images: torch.Tensor, target_layer=None,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(maps (B, H, W) float32 CPU, model outputs (B, K) float32 CPU or None), one forward pass per chunk."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} are not accepted: expected normalised inputs (B, C, H, W), B >= 1")
    check_int("batch_size", batch_size, minimum=1)
    layer = resolve_target_layer(model, target_layer)
    maps, outputs = [], []
    with restoring_modes(model), torch.no_grad(), _signed_eigen_cam_class()(model, [layer]) as cam:
        for chunk in images.split(batch_size):
            maps.append(torch.from_numpy(cam(input_tensor=chunk, targets=None)))
            out = cam.outputs  # grad-cam keeps the model's output of the last call
            outputs.append(out.detach().float().cpu() if isinstance(out, torch.Tensor) and out.dim() == 2 else None)
    logits = torch.cat(outputs) if all(o is not None for o in outputs) else None
    return torch.cat(maps).float().clamp_(0, 1), logits


def eigen_cams(model: nn.Module, images: torch.Tensor, target_layer: str | nn.Module | None = None,
               batch_size: int = 256) -> torch.Tensor:
    """Sign-corrected Eigen-CAM maps. images: normalised model inputs (B, C, H, W) on any device (they go to the
    model's device) -> (B, H, W) float32 on the CPU, each map min-max scaled to [0, 1].

    target_layer: a submodule name, the module, or None for :func:`default_target_layer`. The model's (and every
    submodule's) train/eval mode is restored and grad-cam's hooks are released, also when an error occurs.
    """
    return _run_eigen_cam(model, images, target_layer, batch_size)[0]


# ---- statistics -------------------------------------------------------------------------------------------------

def cam_statistics(maps: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image statistics of non-negative maps (B, H, W) -> dict of (B,) float64 tensors.

    * "area_above_half": share of pixels >= half the map's maximum (1/(H·W) for one bright pixel, 1 when uniform);
    * "entropy": entropy in nats of the map normalised to sum 1 (0 for one pixel, log(H·W) when uniform);
      "entropy_norm" = entropy / log(H·W). A map without mass counts as uniform.
    * with `masks` (B, H, W), True on the object: "mass_inside" / "mass_outside" (shares of the normalised map) and
      "mask_area" (share of pixels in the mask: what mass_inside would be by chance).
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        raise ValueError(f"maps of shape {tuple(getattr(maps, 'shape', ()))} are not accepted: expected (B, H, W)")
    m = maps.detach().double().flatten(1)
    if not bool((m >= 0).all()):
        raise ValueError("maps with negative or NaN values are not accepted: expected non-negative maps")
    hw = m.shape[1]
    area = (m >= 0.5 * m.amax(dim=1, keepdim=True)).double().mean(dim=1)
    total = m.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, m / total.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(m, 1.0 / hw))
    ent = -torch.xlogy(p, p).sum(dim=1)
    stats = {"area_above_half": area, "entropy": ent,
             "entropy_norm": ent / math.log(hw) if hw > 1 else torch.zeros_like(ent)}
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or masks.shape != maps.shape:
            raise ValueError(f"masks of shape {tuple(getattr(masks, 'shape', ()))} are not accepted: expected the "
                             f"maps' shape {tuple(maps.shape)}")
        inside = masks.detach().to(m.device).flatten(1) > 0
        stats["mass_inside"] = (p * inside).sum(dim=1)
        stats["mass_outside"] = (p * ~inside).sum(dim=1)
        stats["mask_area"] = inside.double().mean(dim=1)
    return stats


def object_masks(images: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Object pixels of dark-background images such as Fashion-MNIST: raw intensity > threshold in any channel.

    images: raw (not normalised) (B, C, H, W) or (B, H, W), uint8 (0..255) or float in [0, 1]; threshold is a
    fraction of full intensity. -> (B, H, W) bool.
    """
    check_float("threshold", threshold, 0.0, 1.0)
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(f"images of shape {tuple(getattr(images, 'shape', ()))} are not accepted: "
                         "expected raw images (B, C, H, W) or (B, H, W)")
    x = images.unsqueeze(1) if images.dim() == 3 else images
    x = x.float() / 255.0 if images.dtype == torch.uint8 else x.float()
    return (x > threshold).any(dim=1)


def summarize_cams(stats: Mapping[str, torch.Tensor], labels: torch.Tensor,
                   classes: Sequence[str] | None = None) -> list[dict]:
    """Means of per-image statistics per class (classes present only) and over all images ("class": "all").

    -> rows ``{"class", "n", <stat>: float, ...}``: print with :func:`format_cam_table` or ``pandas.DataFrame``.
    """
    labels = torch.as_tensor(labels).detach().long().cpu().flatten()
    for key, value in stats.items():
        if value.shape != labels.shape:
            raise ValueError(f"stats[{key!r}] of shape {tuple(value.shape)} is not accepted: expected one value "
                             f"per label {tuple(labels.shape)}")
    values = {k: v.detach().double().cpu() for k, v in stats.items()}

    def row(name: str, sel: torch.Tensor) -> dict:
        return {"class": name, "n": int(sel.sum()), **{k: float(v[sel].mean()) for k, v in values.items()}}

    rows = [row(classes[c] if classes is not None else str(c), labels == c) for c in labels.unique().tolist()]
    return rows + [row("all", torch.ones_like(labels, dtype=torch.bool))]


def format_cam_table(rows: Sequence[Mapping], digits: int = 3) -> str:
    """Rows of equal keys as an aligned plain-text table (floats with `digits` decimals)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r.get(k, ''):.{digits}f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def _layer_for(target_layers, name: str):
    if isinstance(target_layers, Mapping):
        return target_layers.get(name)
    return target_layers  # None or one name shared by all models


def compare_cams(models: Mapping[str, nn.Module], data, indices, target_layers=None,
                 mask_threshold: float | str | None = "auto",
                 batch_size: int = 256) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Eigen-CAM maps of several models on the same images and their statistics table.

    data: an :class:`~mcmi_lab.data.core.ImageData`; indices: which of its images. target_layers: None, one layer name
    for all models, or a dict name -> layer. mask_threshold: "auto" (object masks at MASK_THRESHOLD for
    single-channel, dark-background data such as Fashion-MNIST, none otherwise), a float, or None (no masks).
    -> (maps: name -> (B, H, W), rows: ``summarize_cams`` rows with a leading "model" key and an "accuracy" column).
    """
    index = torch.as_tensor(indices, dtype=torch.long).flatten()
    raw = data.images[index.to(data.images.device)]
    labels = data.labels[index.to(data.labels.device)].cpu()
    if mask_threshold == "auto":
        mask_threshold = MASK_THRESHOLD if data.in_channels == 1 else None
    masks = object_masks(raw, mask_threshold).cpu() if mask_threshold is not None else None
    images = data.normalize(raw)
    maps, rows = {}, []
    for name, model in models.items():
        maps[name], logits = _run_eigen_cam(model, images, _layer_for(target_layers, name), batch_size)
        stats = cam_statistics(maps[name], masks)
        if logits is not None:
            stats["accuracy"] = (logits.argmax(dim=1) == labels).double()
        rows += [{"model": name, **r} for r in summarize_cams(stats, labels, data.classes)]
    return maps, rows


# ---- figure -----------------------------------------------------------------------------------------------------

def _display_images(images: torch.Tensor, data) -> torch.Tensor:
    """Normalised inputs (B, C, H, W) -> displayable (B, H, W, C) in [0, 1], using data's (or (mean, std)'s) stats."""
    x = images.detach().float().cpu()
    if data is not None:
        mean, std = (data.mean, data.std) if hasattr(data, "mean") else data
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:  # unknown statistics: stretch each image
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def _short(v: float) -> str:
    return f"{v:.2f}".lstrip("0") if 0 <= v < 1 else f"{v:.2f}"


#: cam_statistics' keys in words (the report's and 04's Eigen-CAM tables)
CAM_STATISTICS = {"area_above_half": "area above half max (share of pixels)",
                  "entropy_norm": "entropy (share of its maximum)", "mass_inside": "CAM mass inside the object"}


def plot_cam_grid(images: torch.Tensor, models: Mapping[str, nn.Module], data=None, labels=None,
                  classes: Sequence[str] | None = None, target_layers=None, masks: torch.Tensor | None = None,
                  cmap: str = "jet", alpha: float = 0.5, path=None):
    """One row per image: the input, then each model's Eigen-CAM overlay titled with its prediction and statistics
    ("MCMI → shirt / area .41  H .87", H = entropy_norm; "in" = mass_inside when `masks` are given).

    images: normalised inputs (B, C, H, W), or uint8 raw images when `data` is an ImageData (normalised with it);
    data: an ImageData or a (mean, std) pair, used to show the inputs de-normalised. -> matplotlib Figure
    (saved atomically when `path` is given).
    """
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        if not hasattr(data, "normalize"):
            raise ValueError("uint8 images are not accepted without data=ImageData: expected normalised inputs")
        images = data.normalize(images)
    classes = classes if classes is not None else getattr(data, "classes", None)
    results = {name: _run_eigen_cam(model, images, _layer_for(target_layers, name)) for name, model in models.items()}
    shown = _display_images(images, data)
    gray = shown.shape[-1] == 1
    n, cols = len(shown), 1 + len(models)
    fig = Figure(figsize=(2.3 * cols, 2.5 * n), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    name_of = (lambda k: classes[k] if classes is not None else str(k))
    for i in range(n):
        picture = (shown[i, :, :, 0] if gray else shown[i]).numpy()
        kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if gray else {}
        axes[i, 0].imshow(picture, **kw)
        axes[i, 0].set_title(name_of(int(labels[i])) if labels is not None else f"image {i}", fontsize=9)
        for j, (name, (maps, logits)) in enumerate(results.items(), start=1):
            stats = cam_statistics(maps[i:i + 1], masks[i:i + 1] if masks is not None else None)
            axes[i, j].imshow(picture, **kw)
            axes[i, j].imshow(maps[i].numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            label = TEACHER_LABELS.get(name, name)
            head = f"{label} → {name_of(int(logits[i].argmax()))}" if logits is not None else label
            text = f"area {_short(float(stats['area_above_half']))}  H {_short(float(stats['entropy_norm']))}"
            if masks is not None:
                text += f"  in {_short(float(stats['mass_inside']))}"
            axes[i, j].set_title(f"{head}\n{text}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    if results:  # one scale for every map (each is min-max scaled to [0, 1]), and what the titles' numbers are
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap)
        bar = fig.colorbar(mappable, ax=axes[:, 1:], orientation="horizontal", shrink=0.6, aspect=40)
        bar.set_label("Eigen-CAM, min-max scaled per map · area: share of pixels above half the maximum · "
                      "H: normalised entropy of the map" + (" · in: CAM mass inside the object" if masks is not None
                                                             else ""), fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig
