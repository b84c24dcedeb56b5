"""What every figure shares: one colour and one marker per method and teacher, the names shown for them, and the
small helpers that build panels and save a figure atomically.

:data:`METHOD_STYLES` is the single source of the colours: the report's figures, the notebooks' figures and the
explorers all look a name up through :func:`method_style`, so MCMI is the same red everywhere (it used to take the
colour of its position in each figure).
"""
from __future__ import annotations

import math
import os
import zlib

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..utils import atomic_write, mpl_text

#: One colour and one marker per method / teacher, in every figure and explorer (tab10 colours; the control is
#: dark grey with a star, as it is the origin every dose line starts from).
METHOD_STYLES: dict[str, dict[str, str]] = {
    "none": {"color": "#7f7f7f", "marker": "v"},
    "mll": {"color": "#1f77b4", "marker": "o"},
    "control": {"color": "#404040", "marker": "*"},
    "mcmi": {"color": "#d62728", "marker": "s"},
    "label_smoothing": {"color": "#2ca02c", "marker": "^"},
    "temperature": {"color": "#ff7f0e", "marker": "D"},
    "bayes": {"color": "#9467bd", "marker": "P"},
}
#: Names outside METHOD_STYLES (a user's own teacher) get one of these, chosen from the name itself, so that the
#: same name has the same colour in every figure whatever the order it comes in.
_OTHER_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#98df8a", "#c5b0d5", "#c49c94")
_OTHER_MARKERS = "hX<>pd"
MARKERS = "osD^vP*Xh<>"

#: the teachers' names in tables and figures
TEACHER_LABELS = {"none": "no teacher (labels only)", "mll": "MLL", "control": "control (λ = 0)",
                  "label_smoothing": "label smoothing", "temperature": "temperature-scaled MLL", "mcmi": "MCMI"}
METHOD_LABELS = {"control": "control (λ = 0)", "mcmi": "MCMI (CMI target)", "label_smoothing": "label smoothing",
                 "temperature": "temperature scaling"}
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


def method_key(name: str) -> str | None:
    """The METHOD_STYLES key a shown name stands for: the key itself, one of its labels ("MCMI", "control (λ = 0)"),
    or a key / label followed by a dose or seed ("mcmi_0.1", "MCMI 0.1"); None for a name of its own."""
    text = str(name).strip()
    low = text.lower()
    if low in METHOD_STYLES:
        return low
    for labels in (TEACHER_LABELS, METHOD_LABELS):
        for key, label in labels.items():
            if text == label:
                return key
    candidates = [(k, k) for k in METHOD_STYLES] + [(k, v.lower()) for labels in (TEACHER_LABELS, METHOD_LABELS)
                                                    for k, v in labels.items()]
    for key, prefix in sorted(candidates, key=lambda kv: -len(kv[1])):  # "label_smoothing" before "l..."
        if low.startswith(prefix) and not low[len(prefix):len(prefix) + 1].isalpha():
            return key
    return None


def method_style(name: str) -> dict[str, str]:
    """{"color": ..., "marker": ...} of a method or teacher (see :func:`method_key`); a name of its own gets a fixed
    colour derived from the name."""
    key = method_key(name)
    if key is not None:
        return METHOD_STYLES[key]
    h = zlib.crc32(str(name).encode())
    return {"color": _OTHER_COLORS[h % len(_OTHER_COLORS)], "marker": _OTHER_MARKERS[h % len(_OTHER_MARKERS)]}


def method_color(name: str) -> str:
    return method_style(name)["color"]


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


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return None


def _colors(n: int) -> list:
    """n colours for things that are not methods (classes, metric keys)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _class_names(classes, k: int) -> list[str]:
    return [mpl_text(c) for c in classes] if classes is not None else [str(i) for i in range(k)]  # "$" literal
