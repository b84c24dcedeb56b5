"""Figures of training runs and sweeps: a ``fit`` history, the teachers' training curves over seeds (the fine-tunes
on an axis of their own) and the few-shot fraction curve. Colours and markers of methods come from
:data:`mcmi_lab.figures.common.METHOD_STYLES`."""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

from matplotlib.figure import Figure

from .common import DOSE_LABELS, PERCENT, _finish, _number, _panels, method_style
from ..metrics.stats import mean_std

_LR_KEYS, _TIME_KEYS, _X_KEYS = ("lr", "learning_rate"), ("time", "seconds", "epoch_time"), ("epoch", "step")

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


def _mean_curve(runs: Sequence[Sequence[Mapping]], key: str, scale: float, start: float = 0.0):
    """(per-seed [(x, y)] lists, {x: mean y}) of one run name: x = start + epoch."""
    by_epoch: dict[float, list[float]] = defaultdict(list)
    seeds = []
    for h in runs:
        pts = [(start + _number(r["epoch"]), scale * _number(r[key])) for r in h
               if _number(r.get(key)) is not None and _number(r.get("epoch")) is not None]
        for x, y in pts:
            by_epoch[x].append(y)
        seeds.append(pts)
    return seeds, {x: sum(v) / len(v) for x, v in sorted(by_epoch.items())}


def _draw_curves(ax, histories, key: str, scale: float, starts: Mapping[str, float]) -> None:
    for name, runs in histories.items():
        color = method_style(name)["color"]
        seeds, mean = _mean_curve(runs, key, scale, starts.get(name, 0))
        if len(runs) > 1:
            for pts in seeds:
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, alpha=0.25, lw=0.8)
        if mean:
            ax.plot(list(mean), list(mean.values()), color=color, lw=1.8, label=name,
                    marker=method_style(name)["marker"], ms=3 if len(mean) > 12 else 5)


def plot_training_curves(histories: Mapping[str, Sequence[Sequence[Mapping]]], starts: Mapping[str, int] | None = None,
                         keys: Sequence[str] = ("ce", "train_acc", "kl"), path=None) -> Figure:
    """Training curves of several runs over seeds: histories[name] is one ``fit`` history per seed; one panel per
    key of `keys` that some history has, one colour per name (mean over seeds, each seed faint). starts[name]: the
    epoch the run continues from (a fine-tune after the MLL teacher's epochs), so the curves join up in the top row;
    when there are such fine-tunes, a second row shows them alone on their own epochs (0: the teacher they start
    from, the mean of the run without a start at that epoch), so that a 5-epoch fine-tune is not a sliver at the
    right edge of a 40-epoch axis."""
    starts = {n: s for n, s in (starts or {}).items() if n in histories}
    keys = [k for k in keys if any(k in r for runs in histories.values() for h in runs for r in h)]
    tuned = {n: histories[n] for n in starts}
    base = {n: runs for n, runs in histories.items() if n not in starts}
    rows = 2 if tuned else 1
    ncols = max(1, len(keys))
    fig = Figure(figsize=(4.2 * ncols, 3.2 * rows), layout="constrained")
    grid = fig.subplots(rows, ncols, squeeze=False)
    for j, key in enumerate(keys):
        title, unit, scale = CURVE_PANELS.get(key, (key.replace("_", " "), "", 1.0))
        ax = grid[0, j]
        _draw_curves(ax, histories, key, scale, starts)
        ax.set_title(title + (" — whole run" if tuned else ""), fontsize=10)
        ax.set_xlabel("epoch")
        if not tuned:
            continue
        ax = grid[1, j]
        origin = {}  # the base run's mean at the epoch each fine-tune starts from
        for name in tuned:
            for runs in base.values():
                mean = _mean_curve(runs, key, scale)[1]
                if starts[name] in mean:
                    origin[name] = mean[starts[name]]
        _draw_curves(ax, tuned, key, scale, {})
        for name, y in origin.items():
            ax.plot([0], [y], marker=method_style("mll")["marker"], color=method_style("mll")["color"], ms=6,
                    ls="none", label="start: the MLL teacher" if name == next(iter(origin)) else None)
            first = _mean_curve(tuned[name], key, scale)[1]
            if first:  # join the start to the fine-tune's first epoch
                x1 = next(iter(first))
                ax.plot([0, x1], [y, first[x1]], color=method_style(name)["color"], lw=1.0, ls=":")
        ax.set_title(f"{title} — fine-tunes alone", fontsize=10)
        ax.set_xlabel("fine-tune epoch (0: the teacher it starts from)")
    for ax, key in zip(grid.flatten(), list(keys) * rows):
        title, unit, _ = CURVE_PANELS.get(key, (key.replace("_", " "), "", 1.0))
        ax.set_ylabel(unit or title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in grid.flatten()[len(keys) * rows:]:
        ax.set_visible(False)
    n_seeds = max((len(runs) for runs in histories.values()), default=0)
    fig.suptitle("Training curves: " + ("one seed" if n_seeds < 2 else f"mean over {n_seeds} seeds (faint: each seed)"),
                 fontsize=11)
    return _finish(fig, path)


def _curves(ax, rows: Sequence[Mapping], x: str, y: str, group: str | None, scale: float = 1.0) -> list[float]:
    """Mean ± std of scale·y over rows sharing (group, x), raw rows as faint dots, one line per group (its colour and
    marker from METHOD_STYLES); returns the x values drawn."""
    by_group: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if _number(r.get(x)) is not None and _number(r.get(y)) is not None:
            by_group[str(r.get(group, "")) if group else ""][_number(r[x])].append(scale * _number(r[y]))
    for name, points in by_group.items():
        style = method_style(name)
        xs = sorted(points)
        stats = [mean_std(points[v]) for v in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker=style["marker"], ms=5, capsize=3,
                    color=style["color"], label=name or None)
        for v in xs:
            ax.plot([v] * len(points[v]), points[v], ".", color=style["color"], alpha=0.35)
    if group and by_group:
        ax.legend(fontsize=8)
    return sorted({v for points in by_group.values() for v in points})


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
