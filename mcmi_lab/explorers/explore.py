"""What a teacher knows, as figures: the plain functions behind :func:`mcmi_lab.explorers.widgets.teacher_explorer` and
:func:`mcmi_lab.explorers.widgets.concentration_explorer`, which the headless path and the tests call too.

:func:`prepare_explore` runs :func:`~mcmi_lab.training.evaluate.predict` once per teacher and keeps what every figure reads:
the softmax at T = 1 and at the KD temperature, the class centroids Q_y and KL(P_x ‖ Q_y) of every sample (all from
:mod:`mcmi_lab.metrics.cmi`). The figures only index into it; an image's Eigen-CAM (one forward pass of that image per
teacher) is computed when the image is first drawn and kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import matplotlib.cm
import matplotlib.colors
import torch
from matplotlib.figure import Figure
from torch import nn

from ..figures.cam import cam_statistics, eigen_cams, resolve_target_layer
from ..metrics.cmi import class_centroids, kl_to_centroids, probabilities
from ..data.core import ImageData
from ..training.evaluate import predict
from ..models.wrappers import TemperatureScaled
from ..figures.plots import TEACHER_LABELS, log_probabilities, method_color, project_2d, save_figure
from ..utils import check_choice, check_float, check_int, mpl_text

__all__ = [
    "ALL_CLASSES",
    "AMONG",
    "ExploreData",
    "prepare_explore",
    "select_images",
    "teacher_cams",
    "teacher_figure",
    "class_order",
    "concentration_figure",
]

#: `label` for "every class".
ALL_CLASSES = -1
#: Which images :func:`select_images` keeps, in words.
AMONG = {"all": "all images", "disagree": "the teachers disagree", "misclassified": "a teacher is wrong"}
#: Smallest probability drawn on a log axis.
LOG_FLOOR = 1e-8


@dataclass(frozen=True, eq=False)
class ExploreData:
    """The teachers' outputs on one data set, computed once (:func:`prepare_explore`).

    logits: name -> (N, K) from ``predict``; probs / probs_kd: softmax at T = 1 / at ``temperature`` (float64);
    centroids: name -> (K, K) class centroids Q_y of probs; kl: name -> (N,) KL(P_x ‖ Q_y) in nats.
    """

    data: ImageData
    teachers: Mapping[str, nn.Module]
    labels: torch.Tensor
    logits: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    probs_kd: dict[str, torch.Tensor]
    centroids: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]
    temperature: float
    cams: dict = field(default_factory=dict, repr=False)  # (name, index) -> (H, W) Eigen-CAM, filled on first view

    @property
    def names(self) -> list[str]:
        return list(self.teachers)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.classes

    def predicted(self, name: str) -> torch.Tensor:
        return self.logits[name].argmax(dim=1)

    def check_names(self, names: Sequence[str] | None) -> list[str]:
        """`names` (None: every teacher) after checking each is one of the teachers."""
        if names is None:
            return self.names
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError(f"teachers=[] is not accepted: expected some of {', '.join(self.names)}")
        for n in names:
            if n not in self.teachers:
                raise ValueError(f"teacher {n!r} is not accepted: expected one of {', '.join(self.names)}")
        return names

    def check_index(self, index: int) -> int:
        return check_int("index", index, minimum=0, maximum=len(self.labels) - 1)

    def check_label(self, label: int) -> int:
        return check_int("label", label, minimum=ALL_CLASSES, maximum=len(self.classes) - 1)


def prepare_explore(teachers: Mapping[str, nn.Module], data: ImageData, temperature: float = 4.0,
                    outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    batch_size: int | None = None) -> ExploreData:
    """One ``predict`` pass per teacher over `data`, and every number the explorers show (see :class:`ExploreData`).

    temperature: the KD temperature T of the second set of probability bars. outputs: name -> ``predict(model,
    data)`` already computed (a notebook's own pass), used instead of a new pass for the teachers it names."""
    if not isinstance(teachers, Mapping) or not teachers:
        raise ValueError(f"teachers={teachers!r} is not accepted: expected a non-empty dict name -> model")
    for name, model in teachers.items():
        if not isinstance(model, nn.Module):
            raise ValueError(f"teacher {name!r} of type {type(model).__name__} is not accepted: expected a torch model")
    if not isinstance(data, ImageData) or len(data) == 0:
        raise ValueError(f"data of type {type(data).__name__} is not accepted: expected a non-empty ImageData")
    check_float("temperature", temperature, 0.0, low_open=True)
    k = data.num_classes
    logits, probs, probs_kd, centroids, kl = {}, {}, {}, {}, {}
    labels = None
    outputs = outputs or {}
    for name, model in teachers.items():
        pair = outputs[name] if name in outputs else predict(model, data, batch_size)
        logits[name], labels = pair[0].cpu(), pair[1].cpu()
        if logits[name].shape != (len(data), k) or not torch.equal(labels.cpu(), data.labels.cpu()):
            raise ValueError(f"outputs[{name!r}] of shape {tuple(logits[name].shape)} is not accepted: expected "
                             f"predict(model, data) of this data, logits ({len(data)}, {k}) and its labels")
        probs[name] = probabilities(logits[name])
        probs_kd[name] = probabilities(logits[name], temperature)
        centroids[name] = class_centroids(probs[name], labels, k)
        kl[name] = kl_to_centroids(probs[name], labels, centroids[name])
    return ExploreData(data.to("cpu"), dict(teachers), labels, logits, probs, probs_kd, centroids, kl,
                       float(temperature))


def select_images(explore: ExploreData, label: int = ALL_CLASSES, among: str = "all") -> torch.Tensor:
    """Data indices (ascending) of the images of class `label` (ALL_CLASSES: any) among `among` (:data:`AMONG`):
    all, those on which the teachers' predictions differ, or those some teacher misclassifies."""
    check_choice("among", among, tuple(AMONG))
    explore.check_label(label)
    keep = torch.ones(len(explore.labels), dtype=torch.bool) if label == ALL_CLASSES else explore.labels == label
    preds = torch.stack([explore.predicted(n) for n in explore.names])
    if among == "disagree":
        keep &= (preds != preds[0]).any(dim=0)
    elif among == "misclassified":
        keep &= (preds != explore.labels).any(dim=0)
    return torch.nonzero(keep).flatten()


# ---- Eigen-CAM ----------------------------------------------------------------------------------------------------

def _cam_target(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """A temperature-scaled teacher has its base model's layers: take Eigen-CAM from the base model's CAM layer."""
    if isinstance(model, TemperatureScaled):
        return model.model, resolve_target_layer(model.model)
    return model, None


def teacher_cams(explore: ExploreData, index: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """name -> Eigen-CAM (H, W) of image `index` (:func:`mcmi_lab.figures.cam.eigen_cams`), computed once and kept."""
    index, names = explore.check_index(index), explore.check_names(names)
    image = explore.data.normalize(explore.data.images[index:index + 1])
    for name in names:
        if (name, index) not in explore.cams:
            model, layer = _cam_target(explore.teachers[name])
            device = next(model.parameters()).device
            explore.cams[name, index] = eigen_cams(model, image.to(device), layer)[0]
    return {name: explore.cams[name, index] for name in names}


# ---- drawing helpers ------------------------------------------------------------------------------------------------

def _label(name: str) -> str:
    return TEACHER_LABELS.get(name, name)


def teacher_colors(names: Sequence[str]) -> dict[str, str]:
    """Each teacher's colour from METHOD_STYLES (the same in every figure, report and explorer)."""
    return {n: method_color(n) for n in names}


def _picture(explore: ExploreData, index: int):
    """(H, W) or (H, W, C) array in [0, 1] and imshow keywords: the raw image as stored."""
    x = explore.data.images[index].float()
    x = (x / 255.0 if explore.data.images.dtype == torch.uint8 else x).clamp(0, 1)
    if x.shape[0] == 1:
        return x[0].numpy(), {"cmap": "gray", "vmin": 0, "vmax": 1}
    return x.permute(1, 2, 0).numpy(), {}


def _log_floor(values: Sequence[torch.Tensor]) -> float:
    """A decade below the smallest probability shown, at most 1e-2 and at least LOG_FLOOR."""
    smallest = min(float(v.clamp_min(LOG_FLOOR).min()) for v in values)
    return max(LOG_FLOOR, min(1e-2, 10.0 ** math.floor(math.log10(smallest))))


def _header(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, transform=ax.transAxes, wrap=True)


# ---- teacher_figure -------------------------------------------------------------------------------------------------

def teacher_figure(explore: ExploreData, index: int, names: Sequence[str] | None = None, log: bool = False,
                   cam: bool = True, path=None) -> Figure:
    """One image through every teacher: the image, then per teacher (one column each, side by side) its Eigen-CAM
    (cam=True), its probability bars at T = 1 with the class centroid Q_y of the true class as red ticks, and its bars
    at the KD temperature. Titles give the prediction and KL(P_x ‖ Q_y) in nats. log: probabilities on a log axis."""
    index, names = explore.check_index(index), explore.check_names(names)
    classes, k = [mpl_text(c) for c in explore.classes], len(explore.classes)  # "$" literal in matplotlib
    true = int(explore.labels[index])
    colors = teacher_colors(explore.names)
    fig = Figure(figsize=(1.8 + 3.1 * len(names), 2.9 + 2 * (0.9 + 0.2 * k)), layout="constrained")
    axes = fig.subplots(3, 1 + len(names), squeeze=False, height_ratios=[1.2] + [0.4 + 0.1 * k] * 2,
                        width_ratios=[0.8] + [1] * len(names))
    bars = axes[1:, 1:].flatten()
    for ax in bars[1:]:  # every probability panel on one pair of axes
        ax.sharex(bars[0])
        ax.sharey(bars[0])
    picture, kw = _picture(explore, index)
    axes[0, 0].imshow(picture, **kw)
    axes[0, 0].set_title(f"image {index}\ntrue: {classes[true]}", fontsize=10)
    axes[0, 0].set_axis_off()
    _header(axes[1, 0], "softmax\nat T = 1")
    _header(axes[2, 0], f"softmax\nat T = {explore.temperature:g}\n(KD)")
    maps = teacher_cams(explore, index, names) if cam else {}
    shown = [explore.probs[n][index] for n in names] + [explore.probs_kd[n][index] for n in names]
    floor = _log_floor(shown + [explore.centroids[n][true] for n in names]) if log else 0.0
    for j, name in enumerate(names, start=1):
        pred = int(explore.predicted(name)[index])
        head = (f"{_label(name)} → {classes[pred]} ({100 * float(explore.probs[name][index, pred]):.0f}%)\n"
                f"KL(P_x ‖ Q_y) = {float(explore.kl[name][index]):.3g} nats")
        if cam:
            stats = cam_statistics(maps[name][None])
            axes[0, j].imshow(picture, **kw)
            axes[0, j].imshow(maps[name].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[0, j].set_axis_off()
            axes[0, j].set_title(f"{head}\nEigen-CAM: area {float(stats['area_above_half']):.2f}, "
                                 f"H {float(stats['entropy_norm']):.2f}", fontsize=9)
        else:
            _header(axes[0, j], head)
        for ax, probs in zip(axes[1:, j], (explore.probs[name][index], explore.probs_kd[name][index])):
            ax.barh(range(k), (probs - floor).numpy(), left=floor, height=0.7, alpha=0.85,
                    color=[colors[name] if c != true else "black" for c in range(k)])
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelleft=j == 1, labelsize=8)
        axes[1, j].plot(explore.centroids[name][true].clamp_min(floor).numpy(), range(k), "|", color="red", ms=11,
                        mew=2, label=f"class centroid Q_y ({classes[true]})")
        axes[2, j].set_xlabel("probability" + (" (log scale)" if log else ""))
    if log:
        bars[0].set_xscale("log")
    bars[0].set_xlim(floor if log else 0.0, 1.0)
    bars[0].set_yticks(range(k), classes, fontsize=8)
    bars[0].set_ylim(k - 0.5, -0.5)  # the first class at the top
    axes[1, 0].legend(*axes[1, 1].get_legend_handles_labels(), fontsize=8, loc="lower center")
    if cam:
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), "jet")
        bar = fig.colorbar(mappable, ax=axes[0, 1:], orientation="vertical", shrink=0.8, aspect=15)
        bar.set_label("Eigen-CAM (min-max scaled)\narea: share above half max\nH: normalised entropy", fontsize=8)
    fig.suptitle("Each teacher on one image (black bar: the true class)", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig


# ---- concentration_figure ---------------------------------------------------------------------------------------

def class_order(explore: ExploreData, label: int, by: str | None = None) -> torch.Tensor:
    """Data indices of class `label`: in data order (by=None) or by KL(P_x ‖ Q_y) of teacher `by`, largest first."""
    explore.check_label(label)
    if label == ALL_CLASSES:
        raise ValueError("label=-1 is not accepted here: expected one class index")
    index = select_images(explore, label)
    if by is None:
        return index
    kl = explore.kl[explore.check_names([by])[0]][index]
    return index[torch.argsort(kl, descending=True, stable=True)]


def concentration_figure(explore: ExploreData, label: int, names: Sequence[str] | None = None,
                         point: int | None = None, log: bool = False, method: str = "pca", max_points: int = 1500,
                         seed: int = 0, path=None) -> Figure:
    """One class through every teacher (one column each): the distribution of KL(P_x ‖ Q_y) over its images (shared
    bins), the class centroid Q_y as bars (shared axis), and a 2-D projection of the class's log-probabilities, fitted
    once on every teacher's outputs together so that all panels share one pair of axes. `point`: a data index of the
    class, drawn in red in every panel (its KL, its P_x over the bars, its position) and shown in the first column."""
    names = explore.check_names(names)
    index = class_order(explore, label)
    if point is not None:
        explore.check_index(point)
        if int(explore.labels[point]) != label:
            raise ValueError(f"point={point} is not accepted: image {point} is of class "
                             f"{explore.classes[int(explore.labels[point])]!r}, expected one of class "
                             f"{explore.classes[label]!r}")
    classes, k, colors = [mpl_text(c) for c in explore.classes], len(explore.classes), teacher_colors(explore.names)
    fig = Figure(figsize=(2.0 + 3.6 * len(names), 10.0), layout="constrained")
    axes = fig.subplots(3, 1 + len(names), squeeze=False, width_ratios=[0.55] + [1] * len(names))
    for r in range(3):  # one pair of axes per row for every teacher
        for ax in axes[r, 2:]:
            ax.sharex(axes[r, 1])
            ax.sharey(axes[r, 1])
    # ---- KL histograms, one set of bins
    kls = {n: explore.kl[n][index].clamp_min(0) for n in names}
    top = max(float(v.max()) for v in kls.values())
    if log:
        low = _log_floor(list(kls.values()))
        edges = torch.logspace(math.log10(low), math.log10(max(top, 10 * low)), 31, dtype=torch.float64)
        edges[0], edges[-1] = low, max(top, 10 * low)  # exactly: 10 ** log10(x) can fall short of x
    else:
        edges = torch.linspace(0, max(top, 1e-6), 31, dtype=torch.float64)
    shown = [explore.centroids[n][label] for n in names] + [explore.probs[n][point] for n in names if point is not None]
    floor = _log_floor(shown) if log else 0.0  # one bottom for every teacher's bars
    # ---- the projection, fitted on every teacher's outputs of this class together
    keep = index
    if len(index) > max_points:
        keep = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))[:max_points]]
    if point is not None and point not in set(keep.tolist()):
        keep = torch.cat([keep, torch.tensor([point])])
    joint = torch.cat([log_probabilities(explore.probs[n][keep], "probs") for n in names])
    coords, axis_labels = project_2d(joint, method, seed)
    coords = coords.split(len(keep))
    where = int((keep == point).nonzero()[0]) if point is not None else None
    for j, name in enumerate(names, start=1):
        color = colors[name]
        ax = axes[0, j]
        ax.hist(kls[name].clamp_min(float(edges[0])).numpy(), bins=edges.numpy(), color=color, alpha=0.85)
        mean = float(kls[name].mean())
        ax.axvline(mean, color="black", ls="--", lw=1.2, label=f"class CMI {mean:.3g} nats")
        if point is not None:
            ax.axvline(float(explore.kl[name][point]), color="red", lw=1.5, label=f"image {point}")
        if log:
            ax.set_xscale("log")
        ax.set_title(f"{_label(name)}", fontsize=10)
        ax.set_xlabel("KL(P_x ‖ Q_y) (nats" + (", log scale)" if log else ")"))
        ax.legend(fontsize=8)
        ax = axes[1, j]
        q = explore.centroids[name][label]
        ax.bar(range(k), (q - floor).numpy(), bottom=floor, color=[color if c != label else "black" for c in range(k)],
               alpha=0.85)
        if point is not None:
            ax.plot(range(k), explore.probs[name][point].clamp_min(floor).numpy(), "o", color="red", ms=5,
                    label=f"P_x of image {point}")
            ax.legend(fontsize=8)
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("probability" + (" (log scale)" if log else ""))
        ax.set_title(f"class centroid Q_y (black: {classes[label]})", fontsize=9)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(floor, 1.0)
        else:
            ax.set_ylim(0, 1)
        ax = axes[2, j]
        xy = coords[j - 1].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=6, color=color, alpha=0.5)
        if where is not None:
            ax.scatter(xy[where, 0], xy[where, 1], s=140, marker="*", color="red", edgecolor="black", zorder=5,
                       label=f"image {point}")
            ax.legend(fontsize=8)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.set_title(f"{_label(name)}: log-probabilities", fontsize=9)
    axes[0, 1].set_ylabel("images")
    _header(axes[0, 0], f"class\n{classes[label]}\n({len(index)} images)")
    if point is not None:
        picture, kw = _picture(explore, point)
        axes[1, 0].imshow(picture, **kw)
        axes[1, 0].set_title(f"image {point}", fontsize=9)
        axes[1, 0].set_axis_off()
    else:
        _header(axes[1, 0], "no image\npicked")
    _header(axes[2, 0], f"{method.upper()}\nof all teachers\ntogether:\nsame axes")
    fig.suptitle(f"How concentrated is each teacher on class '{classes[label]}'? (KL in nats, at T = 1)",
                 fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig
