"""Figures for teachers' output clusters (CMI, NCMI, KL to the class centroids), students and training runs.

Every function returns a ``matplotlib.figure.Figure`` built with the Figure API, not pyplot: nothing is shown or
kept open, it works without a display, and a notebook shows the returned figure once. Nothing is written unless
``path=`` is given, and then atomically (a temporary sibling renamed over the target). Inputs are plain Python
numbers, lists or tensors; a value given as a list (one per seed) is drawn as mean ± standard deviation.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Mapping, Sequence

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .stats import mean_std, paired_difference
from .utils import atomic_write, check_choice, mpl_text

__all__ = [
    "save_figure",
    "plot_cmi_bars",
    "plot_per_class_cmi",
    "plot_kl_distributions",
    "log_probabilities",
    "project_2d",
    "plot_output_projection",
    "plot_student_vs_teacher_cmi",
    "plot_confusion",
    "plot_history",
    "plot_training_curves",
    "plot_dose_response",
    "dose_points",
    "plot_fraction_curve",
]

MARKERS = "osD^vP*Xh<>"


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Write `fig` atomically; the format follows the suffix (png when there is none)."""
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _panels(n: int, size: tuple[float, float] = (4.2, 3.2), ncols: int | None = None):
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _floats(value) -> list[float]:
    """A number, a sequence or a tensor -> list of floats."""
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().flatten().tolist()
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _class_names(classes, k: int) -> list[str]:
    return [mpl_text(c) for c in classes] if classes is not None else [str(i) for i in range(k)]  # "$" literal


# ---- CMI of teachers --------------------------------------------------------------------------------------------

#: Panel titles and axis units of plot_cmi_bars, in words (a key not listed is shown with spaces for underscores).
BAR_LABELS = {"cmi": ("CMI", "nats"), "train_cmi": ("train CMI", "nats"), "test_cmi": ("test CMI", "nats"),
              "ncmi": ("NCMI (CMI / Γ)", "ratio, no unit"), "kl_to_bayes": ("KL(P* ‖ teacher) on test", "nats"),
              "ece": ("top-label ECE", "fraction of samples")}


def plot_cmi_bars(results: Mapping[str, Mapping], keys: Sequence[str] = ("cmi", "ncmi"), path=None) -> Figure:
    """One panel per key (CMI, NCMI), one bar per model. results: name -> {"cmi": v, "ncmi": v}, v a number or
    a list over seeds (bar = mean, error bar = std, dots = seeds)."""
    names = list(results)
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        for i, (name, color) in enumerate(zip(names, _colors(len(names)))):
            if key not in results[name]:
                continue
            values = _floats(results[name][key])
            mean, std = mean_std(values)
            ax.bar(i, mean, yerr=std if len(values) > 1 else None, color=color, capsize=4, alpha=0.85)
            if len(values) > 1:
                ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        title, unit = BAR_LABELS.get(key, (key.replace("_", " "), ""))
        ax.set_title(title)
        ax.set_ylabel(unit or title)
    return _finish(fig, path)


def plot_per_class_cmi(per_class: Mapping[str, torch.Tensor], classes: Sequence[str] | None = None,
                       path=None) -> Figure:
    """Grouped bars: mean KL(P_x ‖ Q_c) inside each class c, one bar per model. per_class: name -> (K,)."""
    values = {name: _floats(v) for name, v in per_class.items()}
    k = max(len(v) for v in values.values())
    names = _class_names(classes, k)
    fig, (ax,) = _panels(1, size=(max(6.0, 0.6 * k * max(1, len(values)) ** 0.5), 3.6))
    width = 0.8 / len(values)
    for j, ((name, v), color) in enumerate(zip(values.items(), _colors(len(values)))):
        ax.bar([c - 0.4 + width * (j + 0.5) for c in range(len(v))], v, width, label=name, color=color)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_ylabel("per-class CMI (nats)")
    ax.legend()
    return _finish(fig, path)


def plot_kl_distributions(kl_a: torch.Tensor, labels_a: torch.Tensor, kl_b: torch.Tensor, labels_b: torch.Tensor,
                          classes: Sequence[str] | None = None, names: tuple[str, str] = ("MLL", "MCMI"),
                          kind: str = "box", log: bool = False, path=None) -> Figure:
    """Distribution of KL(P_x ‖ Q_y) per class for two teachers side by side (box or violin per class)."""
    check_choice("kind", kind, ("box", "violin"))
    pairs = []
    for name, kl, labels in ((names[0], kl_a, labels_a), (names[1], kl_b, labels_b)):
        kl, labels = torch.as_tensor(kl).detach().double().cpu(), torch.as_tensor(labels).detach().long().cpu()
        if kl.shape != labels.shape or kl.dim() != 1:
            raise ValueError(f"KL values {tuple(kl.shape)} and labels {tuple(labels.shape)} of {name} are not "
                             "accepted: expected two (N,) tensors")
        pairs.append((kl, labels))
    k = max(int(labels.max()) + 1 for _, labels in pairs if len(labels)) if any(len(p[1]) for p in pairs) else 0
    k = len(classes) if classes is not None else k
    fig, (ax,) = _panels(1, size=(max(6.0, 0.8 * k), 3.6))
    for (kl, labels), shift, color in zip(pairs, (-0.2, 0.2), _colors(2)):
        groups = [(c + shift, kl[labels == c].numpy()) for c in range(k) if bool((labels == c).any())]
        if not groups:
            continue
        positions, data = zip(*groups)
        if kind == "box":
            parts = ax.boxplot(data, positions=positions, widths=0.35, patch_artist=True, flierprops={"ms": 2},
                               medianprops={"color": "black"})
            for box in parts["boxes"]:
                box.set_facecolor(color)
        else:
            parts = ax.violinplot(data, positions=positions, widths=0.35, showmedians=True)
            for body in parts["bodies"]:
                body.set_facecolor(color)
    ax.set_xticks(range(k), _class_names(classes, k), rotation=45, ha="right")
    ax.set_ylabel("KL(P_x ‖ Q_y) (nats)")
    if log:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)  # KL >= 0: no empty negative half
    ax.legend(handles=[Patch(color=c, label=n) for n, c in zip(names, _colors(2))])
    return _finish(fig, path)


# ---- output space -----------------------------------------------------------------------------------------------

def log_probabilities(outputs: torch.Tensor, inputs: str = "auto") -> torch.Tensor:
    """(N, K) probabilities or logits -> log-probabilities, float64. inputs: "auto" (probabilities when every row is
    non-negative and sums to 1), "probs" or "logits"."""
    check_choice("inputs", inputs, ("auto", "probs", "logits"))
    x = torch.as_tensor(outputs).detach().double().cpu()
    if inputs == "auto":
        is_probs = bool((x >= 0).all()) and torch.allclose(x.sum(dim=1), torch.ones(len(x), dtype=x.dtype), atol=1e-4)
        inputs = "probs" if is_probs else "logits"
    return torch.log(x.clamp_min(1e-12)) if inputs == "probs" else torch.log_softmax(x, dim=1)


def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(N, D) -> ((N, 2) coordinates, two axis labels). PCA by SVD of the centred features (sign fixed so that
    each component's largest loading is positive); t-SNE through scikit-learn."""
    check_choice("method", method, ("pca", "tsne"))
    x = torch.as_tensor(features).detach().double().cpu()
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ImportError("method='tsne' needs scikit-learn (pip install scikit-learn); method='pca' does not")
        perplexity = float(max(1, min(30, len(x) - 1)))
        coords = TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x.numpy())
        return torch.as_tensor(coords), ["t-SNE 1", "t-SNE 2"]
    xc = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    vh = vh[:2] * torch.sign(vh[:2].gather(1, vh[:2].abs().argmax(dim=1, keepdim=True)))
    coords = xc @ vh.T
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(len(x), 2 - coords.shape[1], dtype=x.dtype)], dim=1)
    share = (s ** 2 / (s ** 2).sum().clamp_min(1e-300)).tolist() + [0.0, 0.0]
    return coords, [f"PC1 ({100 * share[0]:.0f}%)", f"PC2 ({100 * share[1]:.0f}%)"]


def plot_output_projection(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                           classes: Sequence[str] | None = None, method: str = "pca", inputs: str = "auto",
                           max_points: int | None = 5000, seed: int = 0, path=None) -> Figure:
    """2-D projection of each teacher's log-probabilities (N, K), coloured by class, one panel per teacher.

    The same seeded subset of at most `max_points` samples is drawn for every teacher.
    """
    check_choice("method", method, ("pca", "tsne"))
    labels = torch.as_tensor(labels).detach().long().cpu()
    keep = torch.arange(len(labels))
    if max_points is not None and len(labels) > max_points:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_points]
    k = len(classes) if classes is not None else int(labels.max()) + 1
    colors, names = _colors(k), _class_names(classes, k)
    fig, axes = _panels(len(outputs), size=(4.4, 4.0))
    projected = {name: project_2d(log_probabilities(out, inputs)[keep], method, seed) for name, out in outputs.items()}
    # One scale for every panel (log-probabilities are in nats for every teacher), so the clusters' spread can be
    # compared by eye; each panel is centred on its own projection.
    unit = ", nats" if method == "pca" else ""  # t-SNE coordinates have no unit
    half = max((float((c.amax(0) - c.amin(0)).max()) for c, _ in projected.values()), default=1.0) / 2 * 1.05 or 1.0
    for ax, (name, (coords, axis_labels)) in zip(axes, projected.items()):
        mid = (coords.amax(0) + coords.amin(0)) / 2 if len(coords) else torch.zeros(2)
        ax.set_xlim(float(mid[0]) - half, float(mid[0]) + half)
        ax.set_ylim(float(mid[1]) - half, float(mid[1]) + half)
        for c in range(k):
            sel = labels[keep] == c
            if bool(sel.any()):
                ax.scatter(coords[sel, 0].numpy(), coords[sel, 1].numpy(), s=4, color=colors[c], label=names[c], alpha=0.7)
        ax.set_title(name)
        ax.set_xlabel(axis_labels[0] + unit)
        ax.set_ylabel(axis_labels[1] + unit)
    fig.suptitle(f"{method.upper()} of each teacher's log-probabilities, the same scale in every panel", fontsize=10)
    axes[-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _finish(fig, path)


# ---- students ---------------------------------------------------------------------------------------------------

def plot_student_vs_teacher_cmi(points: Sequence[Mapping], path=None) -> Figure:
    """Student accuracy against its teacher's CMI. points: dicts with "teacher", "teacher_cmi", "student_acc" and
    optionally "method" (the KD method: one marker each); one colour per teacher."""
    teachers = list(dict.fromkeys(str(p["teacher"]) for p in points))
    methods = list(dict.fromkeys(str(p.get("method", "")) for p in points))
    color = dict(zip(teachers, _colors(len(teachers))))
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    fig, (ax,) = _panels(1, size=(5.2, 4.0))
    seen = set()
    for p in points:
        t, m = str(p["teacher"]), str(p.get("method", ""))
        label = f"{t} · {m}" if m else t
        ax.scatter(float(p["teacher_cmi"]), 100 * float(p["student_acc"]), color=color[t], marker=marker[m],
                   s=40, label=None if label in seen else label)
        seen.add(label)
    ax.set_xlabel("teacher CMI (nats)")
    ax.set_ylabel("student test accuracy (%)")
    if points:
        ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str] | None = None, normalize: bool = True,
                   path=None) -> Figure:
    """Confusion matrix (K, K), rows = true class, columns = prediction; rows scaled to sum 1 when `normalize`."""
    cm = torch.as_tensor(confusion).detach().double().cpu()
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion of shape {tuple(cm.shape)} is not accepted: expected a square (K, K) matrix")
    if normalize:
        cm = cm / cm.sum(dim=1, keepdim=True).clamp_min(1e-12)
    k = len(cm)
    names = _class_names(classes, k)
    fig, (ax,) = _panels(1, size=(max(4.0, 0.5 * k + 2), max(3.5, 0.5 * k + 1.5)))
    image = ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if k <= 20:
        top = float(cm.max()) if k else 1.0
        for i in range(k):
            for j in range(k):
                v = float(cm[i, j])
                ax.text(j, i, f"{v:.2f}" if normalize else f"{v:g}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * top else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _finish(fig, path)


# ---- training runs and sweeps -----------------------------------------------------------------------------------

_LR_KEYS, _TIME_KEYS, _X_KEYS = ("lr", "learning_rate"), ("time", "seconds", "epoch_time"), ("epoch", "step")


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return None


HISTORY_UNITS = {"loss": "nats per sample", "accuracy": "%", "CMI": "nats", "learning rate": "learning rate",
                 "seconds": "seconds per epoch"}


def plot_history(history: Sequence[Mapping], path=None) -> Figure:
    """Training curves of a ``fit`` history (one dict per epoch): panels for the loss terms, accuracies, CMI-like
    metrics, learning rate and epoch time, each only where such keys exist. x = "epoch" (else the record number)."""
    keys = list(dict.fromkeys(k for r in history for k, v in r.items() if _number(v) is not None))
    x_key = next((k for k in _X_KEYS if k in keys), None)
    groups: dict[str, list[str]] = {"loss": [], "accuracy": [], "CMI": [], "learning rate": [], "seconds": []}
    for k in keys:
        if k in _X_KEYS:
            continue
        low = k.lower()
        group = ("learning rate" if k in _LR_KEYS else "seconds" if k in _TIME_KEYS else
                 "accuracy" if "acc" in low else "CMI" if "cmi" in low or "separation" in low else "loss")
        groups[group].append(k)
    groups = {g: ks for g, ks in groups.items() if ks}
    fig, axes = _panels(max(1, len(groups)))
    for ax, (group, ks) in zip(axes, groups.items()):
        for k in ks:
            scale = 100.0 if group == "accuracy" else 1.0  # accuracy in %, as in every table
            pts = [(_number(r.get(x_key)) if x_key else i + 1, scale * _number(r[k])) for i, r in enumerate(history)
                   if _number(r.get(k)) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=k.replace("_", " "))
        ax.set_title(group)
        ax.set_ylabel(HISTORY_UNITS[group])
        ax.set_xlabel(x_key or "record")
        values = [_number(r.get(k)) for r in history for k in ks]
        if group == "learning rate" and min((v for v in values if v is not None), default=0) > 0:
            ax.set_yscale("log")  # schedules decay by factors
        ax.legend(fontsize=8)
    return _finish(fig, path)


#: Panels of plot_training_curves: record key -> (title, y label, scale).
CURVE_PANELS = {"ce": ("cross-entropy on the training batches", "nats", 1.0),
                "train_acc": ("training-batch accuracy", "%", 100.0),
                "kl": ("mean KL(P_x ‖ Q_y) on the training batches", "nats", 1.0)}


def plot_training_curves(histories: Mapping[str, Sequence[Sequence[Mapping]]], starts: Mapping[str, int] | None = None,
                         keys: Sequence[str] = ("ce", "train_acc", "kl"), path=None) -> Figure:
    """Training curves of several runs over seeds: histories[name] is one ``fit`` history per seed; one panel per
    key of `keys` that some history has, one colour per name (mean over seeds, each seed faint). starts[name]: the
    epoch the run continues from (a fine-tune after the MLL teacher's epochs), so the curves join up."""
    starts = starts or {}
    keys = [k for k in keys if any(k in r for runs in histories.values() for h in runs for r in h)]
    fig, axes = _panels(max(1, len(keys)))
    for ax, key in zip(axes, keys):
        title, unit, scale = CURVE_PANELS.get(key, (key.replace("_", " "), "", 1.0))
        for (name, runs), color in zip(histories.items(), _colors(len(histories))):
            by_epoch: dict[float, list[float]] = defaultdict(list)
            for h in runs:
                pts = [(starts.get(name, 0) + _number(r["epoch"]), scale * _number(r[key])) for r in h
                       if _number(r.get(key)) is not None and _number(r.get("epoch")) is not None]
                for x, y in pts:
                    by_epoch[x].append(y)
                if len(runs) > 1:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, alpha=0.25, lw=0.8)
            xs = sorted(by_epoch)
            if xs:
                ax.plot(xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs], color=color, lw=1.8, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit or title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_seeds = max((len(runs) for runs in histories.values()), default=0)
    fig.suptitle("Training curves: " + ("one seed" if n_seeds < 2 else f"mean over {n_seeds} seeds (faint: each seed)"),
                 fontsize=11)
    return _finish(fig, path)


def _curves(ax, rows: Sequence[Mapping], x: str, y: str, group: str | None, scale: float = 1.0) -> list[float]:
    """Mean ± std of scale·y over rows sharing (group, x), raw rows as faint dots, one line per group; returns the
    x values drawn."""
    by_group: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if _number(r.get(x)) is not None and _number(r.get(y)) is not None:
            by_group[str(r.get(group, "")) if group else ""][_number(r[x])].append(scale * _number(r[y]))
    for (name, points), color in zip(by_group.items(), _colors(len(by_group))):
        xs = sorted(points)
        stats = [mean_std(points[v]) for v in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", ms=4, capsize=3,
                    color=color, label=name or None)
        for v in xs:
            ax.plot([v] * len(points[v]), points[v], ".", color=color, alpha=0.35)
    if group and by_group:
        ax.legend(fontsize=8)
    return sorted({v for points in by_group.values() for v in points})


#: Axis labels of the dose-response metrics: words and units, never variable names.
DOSE_LABELS = {
    "train_cmi": "teacher train CMI (nats)",
    "test_acc": "teacher test accuracy (%)",
    "test_cmi": "teacher test CMI (nats)",
    "test_ece": "teacher test ECE (%)",
    "kl_to_posterior": "KL(P* ‖ teacher) on test (nats)",
    "kl_to_bayes": "KL(P* ‖ teacher) on test (nats)",
    "student_acc": "KD student test accuracy (%)",
    "few_shot_acc": "few-shot student test accuracy (%)",
    "zero_shot_omitted_acc": "zero-shot student, omitted class (%)",
    "zero_shot_acc": "zero-shot student test accuracy (%)",
}
#: Metrics given in [0, 1] and shown in %.
PERCENT = {"test_acc", "test_ece", "student_acc", "few_shot_acc", "zero_shot_omitted_acc", "zero_shot_acc"}
#: the teachers' names in tables and figures
TEACHER_LABELS = {"none": "no teacher (labels only)", "mll": "MLL", "control": "control (λ = 0)",
                  "label_smoothing": "label smoothing", "temperature": "temperature-scaled MLL", "mcmi": "MCMI"}
METHOD_LABELS = {"control": "control (λ = 0)", "mcmi": "MCMI (CMI target)", "label_smoothing": "label smoothing",
                 "temperature": "temperature scaling"}


def dose_points(rows: Sequence[Mapping], y: str, x: str = "train_cmi") -> dict[str, list[dict]]:
    """Per method, per dose: x and y over the seeds with the mean and a 95% t interval of y, clipped to the metric's
    range (the control, one dose, joins every method's line as its first point). rows: dose-response rows with
    "method", "dose", "seed"."""
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: {"x": [], "y": []}))
    for r in rows:
        if _number(r.get(x)) is not None and _number(r.get(y)) is not None:
            cell = groups[str(r["method"])][r.get("dose")]
            cell["x"].append(_number(r[x]))
            cell["y"].append(_number(r[y]) * (100.0 if y in PERCENT else 1.0))
    out = {}
    for method, doses in groups.items():
        points = []
        for dose, cell in doses.items():
            d = paired_difference(cell["y"], [0.0] * len(cell["y"]))
            top = 100.0 if y in PERCENT else math.inf  # every dose metric is >= 0 (and a percentage <= 100): an
            points.append({"dose": dose, "x": mean_std(cell["x"])[0], "y": d["mean"],  # interval of 2 seeds is
                           "low": max(d["low"], 0.0), "high": min(d["high"], top),  # clipped to what can happen
                           "xs": cell["x"], "ys": cell["y"]})
        out[method] = sorted(points, key=lambda p: p["x"])
    return out


def plot_dose_response(rows: Sequence[Mapping], ys: Sequence[str] = ("test_acc", "student_acc", "few_shot_acc",
                                                                      "zero_shot_omitted_acc"),
                       x: str = "train_cmi", reference: Mapping[str, float] | None = None, path=None) -> Figure:
    """Each metric in `ys` against the teacher's train CMI, one line per method: the mean per dose with its 95%
    interval over seeds (bars; none with one seed) and the seeds as faint dots. Shared x axis across panels. Rows
    with ``matched`` false (a dose the method did not reach) are left out. `reference`: label -> x of a dashed
    vertical line in every panel (e.g. the Bayes posterior's own train CMI)."""
    rows = [r for r in rows if r.get("matched", True)]
    n_seeds = len({r.get("seed") for r in rows})
    present = [y for y in ys if any(_number(r.get(y)) is not None for r in rows)] or list(ys[:1])
    fig, axes = _panels(len(present), size=(4.6, 3.6), ncols=min(len(present), 2))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    colors = dict(zip(methods, _colors(len(methods))))
    for ax, y in zip(axes, present):
        points = dose_points(rows, y, x)
        control = points.pop("control", [])
        for i, (method, pts) in enumerate(points.items()):
            line = control + pts
            err = [[p["y"] - p["low"] for p in line], [p["high"] - p["y"] for p in line]]
            has_ci = all(math.isfinite(e) for side in err for e in side)
            ax.errorbar([p["x"] for p in line], [p["y"] for p in line], yerr=err if has_ci else None,
                        marker=MARKERS[i % len(MARKERS)], ms=5, capsize=3, color=colors[method],
                        label=METHOD_LABELS.get(method, method))
            for p in pts:
                ax.plot(p["xs"], p["ys"], ".", color=colors[method], alpha=0.3)
        for p in control:
            ax.plot(p["xs"], p["ys"], "k.", alpha=0.3)
            ax.plot([p["x"]], [p["y"]], "k*", ms=10, label=METHOD_LABELS["control"], zorder=5)
        for j, (label, at) in enumerate((reference or {}).items()):
            ax.axvline(at, color="0.4", ls="--" if j == 0 else ":", lw=1.2, label=label)
        ax.set_xlabel(DOSE_LABELS.get(x, x))
        ax.set_ylabel(DOSE_LABELS.get(y, y))
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=9)
    spread = ("one seed: no intervals" if n_seeds < 2 else f"mean and 95% interval over {n_seeds} seeds per dose")
    fig.suptitle(f"Dose-response: {spread}", fontsize=11)
    return _finish(fig, path)


def plot_fraction_curve(rows: Sequence[Mapping], x: str = "fraction", y: str = "student_acc",
                        group: str = "teacher", logx: bool = False, path=None) -> Figure:
    """Student accuracy (in %) against the training fraction it saw (few-shot), one line per teacher, mean ± std over
    seeds; the fractions are the ticks, written as percentages of the training data."""
    fig, (ax,) = _panels(1, size=(5.2, 3.8))
    xs = _curves(ax, rows, x, y, group, scale=100.0 if y in PERCENT else 1.0)
    if logx:
        ax.set_xscale("log")
    if x == "fraction" and xs:
        ax.set_xticks(xs, [f"{100 * v:g}%" for v in xs])
        ax.minorticks_off()
        ax.set_xlabel("share of the training data the student saw")
    else:
        ax.set_xlabel(DOSE_LABELS.get(x, x.replace("_", " ")))
    ax.set_ylabel(DOSE_LABELS.get(y, y.replace("_", " ")))
    ax.set_title("Few-shot students: accuracy by the data they saw" if x == "fraction" else "")
    ax.grid(alpha=0.3)
    return _finish(fig, path)
