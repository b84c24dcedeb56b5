"""Figures for teachers' output clusters (CMI, NCMI, KL to the class centroids), students and training runs.

Every function returns a ``matplotlib.figure.Figure`` built with the Figure API, not pyplot: nothing is shown or
kept open, it works without a display, and a notebook shows the returned figure once. Nothing is written unless
``path=`` is given, and then atomically (a temporary sibling renamed over the target). Inputs are plain Python
numbers, lists or tensors; a value given as a list (one per seed) is drawn as mean ± standard deviation.

One colour and one marker per method and teacher in every figure: :data:`METHOD_STYLES` (defined in
:mod:`mcmi_lab.figures.common`, looked up through :func:`method_style`). The training-curve figures live in
:mod:`mcmi_lab.figures.training`, the dose-response figure in :mod:`mcmi_lab.figures.dose`; all are importable from here.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .common import (DOSE_LABELS, MARKERS, METHOD_LABELS, METHOD_STYLES, PERCENT, TEACHER_LABELS,
                     _class_names, _colors, _finish, _floats, _panels, method_color, method_key, method_style,
                     save_figure)
from .dose import dose_points, plot_dose_response
from .training import CURVE_PANELS, HISTORY_UNITS, plot_fraction_curve, plot_history, plot_training_curves
from ..metrics.stats import mean_std
from ..utils import check_choice

__all__ = [
    "METHOD_STYLES",
    "method_style",
    "method_color",
    "method_key",
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
    "DOSE_LABELS", "PERCENT", "TEACHER_LABELS", "METHOD_LABELS", "CURVE_PANELS", "HISTORY_UNITS", "MARKERS",
]


# ---- CMI of teachers --------------------------------------------------------------------------------------------

#: Panel titles and axis units of plot_cmi_bars, in words (a key not listed is shown with spaces for underscores).
BAR_LABELS = {"cmi": ("CMI", "nats"), "train_cmi": ("train CMI", "nats"), "test_cmi": ("test CMI", "nats"),
              "ncmi": ("NCMI (CMI / Γ)", "ratio, no unit"), "kl_to_bayes": ("KL(P* ‖ teacher) on test", "nats"),
              "ece": ("top-label ECE", "fraction of samples")}


def _train_test_note(results: Mapping[str, Mapping]) -> str:
    """How far train CMI sits below test CMI (the mean over models of the ratio of their means), or ""."""
    ratios = [mean_std(_floats(r["test_cmi"]))[0] / mean_std(_floats(r["train_cmi"]))[0] for r in results.values()
              if "train_cmi" in r and "test_cmi" in r and mean_std(_floats(r["train_cmi"]))[0] > 0]
    if not ratios or max(ratios) < 2:  # no remark where train and test CMI are alike
        return ""
    lo, hi = min(ratios), max(ratios)
    times = f"{lo:.0f}×" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}×"
    return (f"train CMI is {times} below test CMI (a teacher is tighter on the images it learnt from); "
            "doses are measured on train data")


def plot_cmi_bars(results: Mapping[str, Mapping], keys: Sequence[str] = ("cmi", "ncmi"), path=None) -> Figure:
    """One panel per key (CMI, NCMI), one bar per model in its METHOD_STYLES colour. results: name -> {"cmi": v,
    "ncmi": v}, v a number or a list over seeds (bar = mean, error bar = std, dots = seeds, said in the title).
    With both "train_cmi" and "test_cmi" among `keys`, the title also says how far train CMI sits below test CMI."""
    names = list(results)
    fig, axes = _panels(len(keys))
    several = False
    for ax, key in zip(axes, keys):
        for i, name in enumerate(names):
            if key not in results[name]:
                continue
            values = _floats(results[name][key])
            mean, std = mean_std(values)
            ax.bar(i, mean, yerr=std if len(values) > 1 else None, color=method_color(name), capsize=4, alpha=0.85)
            if len(values) > 1:
                several = True
                ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        title, unit = BAR_LABELS.get(key, (key.replace("_", " "), ""))
        ax.set_title(title)
        ax.set_ylabel(unit or title)
    notes = ["bars: mean over seeds; error bars: standard deviation; dots: seeds"] if several else []
    if "train_cmi" in keys and "test_cmi" in keys and _train_test_note(results):
        notes.append(_train_test_note(results))
    if notes:
        fig.suptitle("\n".join(notes), fontsize=9)
    return _finish(fig, path)


def plot_per_class_cmi(per_class: Mapping[str, torch.Tensor], classes: Sequence[str] | None = None,
                       path=None) -> Figure:
    """Grouped bars: mean KL(P_x ‖ Q_c) inside each class c, one bar per model. per_class: name -> (K,)."""
    values = {name: _floats(v) for name, v in per_class.items()}
    k = max(len(v) for v in values.values())
    names = _class_names(classes, k)
    fig, (ax,) = _panels(1, size=(max(6.0, 0.6 * k * max(1, len(values)) ** 0.5), 3.6))
    width = 0.8 / len(values)
    for j, (name, v) in enumerate(values.items()):
        color = method_color(name)
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
    for (kl, labels), shift, color in zip(pairs, (-0.2, 0.2), [method_color(n) for n in names]):
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
    ax.legend(handles=[Patch(color=method_color(n), label=n) for n in names])
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
    color = {t: method_color(t) for t in teachers}
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
