"""The dose-response figure: each metric against the teacher's train CMI, one line per method, with the teachers
that did not make a dose drawn as such (collapsed: ×, unmatched: hollow marker)."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from .common import DOSE_LABELS, METHOD_LABELS, PERCENT, _finish, _number, _panels, method_style
from ..metrics.stats import mean_std, paired_difference


def dose_points(rows: Sequence[Mapping], y: str, x: str = "train_cmi") -> dict[str, list[dict]]:
    """Per method, per dose: x and y over the seeds with the mean and a 95% t interval of y, clipped to the metric's
    range ("low", "high"; "raw_low", "raw_high" before clipping). rows: dose-response rows with "method", "dose",
    "seed"; the caller chooses which rows (matched, not collapsed) go in."""
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: {"x": [], "y": []}))
    for r in rows:
        if _number(r.get(x)) is not None and _number(r.get(y)) is not None:
            cell = groups[str(r["method"])][r.get("dose")]
            cell["x"].append(_number(r[x]))
            cell["y"].append(_number(r[y]) * (100.0 if y in PERCENT else 1.0))
    out = {}
    top = 100.0 if y in PERCENT else math.inf  # every dose metric is >= 0 (and a percentage <= 100)
    for method, doses in groups.items():
        points = []
        for dose, cell in doses.items():
            d = paired_difference(cell["y"], [0.0] * len(cell["y"]))
            points.append({"dose": dose, "x": mean_std(cell["x"])[0], "y": d["mean"],
                           "low": max(d["low"], 0.0), "high": min(d["high"], top),
                           "raw_low": d["low"], "raw_high": d["high"], "xs": cell["x"], "ys": cell["y"]})
        out[method] = sorted(points, key=lambda p: p["x"])
    return out


def _y_range(values: list[float], percent: bool) -> tuple[float, float]:
    """Axis limits from the drawn means and seeds (not from the intervals, which at 2 seeds span everything), padded,
    at least 2 points (percentages) or 10% of the largest value tall, inside what the metric can be."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, 2.0 if percent else 0.1 * max(abs(hi), 1e-6))
    mid = (lo + hi) / 2
    lo, hi = mid - 0.6 * span, mid + 0.6 * span
    return (max(lo, 0.0) if min(values) >= 0 else lo), (min(hi, 100.0) if percent else hi)


def _draw_points(ax, pts: list[dict], style: Mapping, transform, ylim: tuple[float, float], label: str,
                 zorder: float) -> bool:
    """Means with their intervals, the seeds as faint dots, and a caret at the axis edge where an interval runs past
    it; returns whether one did."""
    if not pts:
        return False
    err = [[p["y"] - p["low"] for p in pts], [p["high"] - p["y"] for p in pts]]
    has_ci = all(math.isfinite(e) for side in err for e in side)
    ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts], yerr=err if has_ci else None, ls="none",
                marker=style["marker"], ms=style.get("ms", 6), mec="white", mew=0.6, capsize=3, color=style["color"],
                label=label, transform=transform, zorder=zorder)
    cut = False
    for p in pts:
        ax.plot(p["xs"], p["ys"], ".", color=style["color"], alpha=0.3, transform=transform, zorder=zorder - 1)
        for edge, raw, mark in ((ylim[0], p["raw_low"], "v"), (ylim[1], p["raw_high"], "^")):
            if has_ci and math.isfinite(raw) and (raw < edge if mark == "v" else raw > edge):
                ax.plot([p["x"]], [edge], mark, color=style["color"], ms=6, clip_on=False, transform=transform,
                        zorder=zorder + 1)
                cut = True
    return cut


def _x_of(r: Mapping, x: str) -> float | None:
    return _number(r.get(x)) if _number(r.get(x)) is not None else _number(r.get("dose"))


def plot_dose_response(rows: Sequence[Mapping], ys: Sequence[str] = ("test_acc", "student_acc", "few_shot_acc",
                                                                      "zero_shot_omitted_acc"),
                       x: str = "train_cmi", reference: Mapping[str, float] | None = None, path=None) -> Figure:
    """Each metric in `ys` against the teacher's train CMI, one line per method (colour and marker from
    METHOD_STYLES): the mean per dose with its 95% interval over seeds (bars; none with one seed) and the seeds as
    faint dots. Methods are drawn a few points apart sideways so that no point hides another (the control's star
    under label smoothing's first dose). The y axis spans the means and seeds; an interval that runs past it is cut
    and marked by a caret at the edge. Rows with ``collapsed`` true (no epoch above the accuracy floor) are drawn as
    × at their train CMI on the axis floor, rows with ``matched`` false (a dose the method did not reach) as hollow
    markers (at the axis floor where they have no value, e.g. no student); neither is in a mean. `reference`:
    label -> x of a dashed vertical line in every panel (e.g. the Bayes posterior's own train CMI)."""
    collapsed = [r for r in rows if r.get("collapsed")]
    unmatched = [r for r in rows if not r.get("collapsed") and not r.get("matched", True)]
    rows = [r for r in rows if r.get("matched", True) and not r.get("collapsed")]
    n_seeds = len({r.get("seed") for r in rows})
    present = [y for y in ys if any(_number(r.get(y)) is not None for r in rows + unmatched)] or list(ys[:1])
    fig, axes = _panels(len(present), size=(4.8, 3.7), ncols=min(len(present), 2))
    methods = [m for m in dict.fromkeys(str(r["method"]) for r in rows + unmatched + collapsed) if m != "control"]
    shift = {m: 5.0 * (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}  # points, sideways
    cut_any = False
    for ax, y in zip(axes, present):
        points = dose_points(rows, y, x)
        control = points.pop("control", [])
        moved = {m: offset_copy(ax.transData, fig=fig, x=shift.get(m, 0.0), y=0.0, units="points") for m in methods}
        drawn = [v for pts in list(points.values()) + [control] for p in pts for v in [p["y"], *p["ys"]]]
        drawn += [_number(r[y]) * (100.0 if y in PERCENT else 1.0) for r in unmatched if _number(r.get(y)) is not None]
        lo, hi = _y_range(drawn, y in PERCENT) if drawn else (0.0, 1.0)
        ax.set_ylim(lo, hi)
        control_style = method_style("control")
        for method, pts in points.items():
            style = method_style(method)
            line = control + pts  # each method's line starts at the control (dose 0); its markers are its own
            ax.plot([p["x"] for p in line], [p["y"] for p in line], color=style["color"], lw=1.5,
                    transform=moved[method], zorder=2)
            cut_any |= _draw_points(ax, pts, style, moved[method], (lo, hi), METHOD_LABELS.get(method, method), 3)
        cut_any |= _draw_points(ax, control, {**control_style, "ms": 13}, ax.transData, (lo, hi),
                                METHOD_LABELS["control"], 2.5)
        floor = ax.get_xaxis_transform()  # x in data, y in axes fraction: the axis floor whatever the range
        # x range by hand: the floor markers (axes fraction) and the shifted points are not all in the data limits
        xs = [_x_of(r, x) for r in unmatched + collapsed if _x_of(r, x) is not None]
        xs += [v for pts in list(points.values()) + [control] for p in pts for v in p["xs"]]
        xs += list((reference or {}).values())
        if xs:
            pad = 0.06 * (max(xs) - min(xs)) or 0.01 * max(abs(max(xs)), 1e-6)
            ax.set_xlim(min(xs) - pad, max(xs) + pad)
        for r in unmatched:
            at = _x_of(r, x)
            style, value = method_style(str(r["method"])), _number(r.get(y))
            if at is None:
                continue
            if value is None:
                ax.plot([at], [0.03], style["marker"], mfc="none", mec=style["color"], ms=7, clip_on=False,
                        transform=offset_copy(floor, fig=fig, x=shift.get(str(r["method"]), 0.0), units="points"))
            else:
                ax.plot([at], [value * (100.0 if y in PERCENT else 1.0)], style["marker"], mfc="none",
                        mec=style["color"], ms=7, transform=moved.get(str(r["method"]), ax.transData), zorder=2.5)
        for r in collapsed:
            if _x_of(r, x) is not None:
                ax.plot([_x_of(r, x)], [0.03], "x", color=method_style(str(r["method"]))["color"], ms=9, mew=2,
                        clip_on=False, zorder=4,
                        transform=offset_copy(floor, fig=fig, x=shift.get(str(r["method"]), 0.0), units="points"))
        for j, (label, at) in enumerate((reference or {}).items()):
            ax.axvline(at, color="0.4", ls="--" if j == 0 else ":", lw=1.2, label=label)
        ax.set_xlabel(DOSE_LABELS.get(x, x))
        ax.set_ylabel(DOSE_LABELS.get(y, y))
        ax.grid(alpha=0.3)
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        for method in methods:  # a method with no matched dose still needs its colour named
            if METHOD_LABELS.get(method, method) not in labels:
                style = method_style(method)
                handles.append(Line2D([], [], marker=style["marker"], mfc="none", mec=style["color"], ls="none"))
                labels.append(METHOD_LABELS.get(method, method) + " (no matched dose)")
        if unmatched:
            handles.append(Line2D([], [], marker="o", mfc="none", mec="0.3", ls="none"))
            labels.append(f"unmatched: train CMI off its dose ({len(unmatched)})")
        if collapsed:
            handles.append(Line2D([], [], marker="x", color="0.3", mew=2, ls="none"))
            labels.append(f"collapsed: no epoch above the accuracy floor ({len(collapsed)})")
        fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncol=min(len(labels), 3))
    spread = ("one seed: no intervals" if n_seeds < 2 else f"mean and 95% interval over {n_seeds} seeds per dose")
    notes = ["methods drawn a few points apart sideways, so that none hides another"]
    if cut_any:
        notes.append("▲▼: an interval that runs past the axis, cut there")
    if unmatched or collapsed:
        notes.append("hollow / ×: teachers in no mean (on the axis floor where they have no value)")
    fig.suptitle(f"Dose-response: {spread}\n" + "\n".join(notes), fontsize=9)
    return _finish(fig, path)
