"""A finished run's results as figures and tables, without training anything: the plain functions behind
:func:`mcmi_lab.explorers.widgets.results_explorer`.

:func:`load_run_results` reads a run folder of ``mcmi-lab run`` (``seed_<n>/results/*.json``) or one notebook's
``run_dir`` (``results/*.json``). A *view* is a metric of :data:`METRICS` (per-seed values of one results table,
drawn per teacher with the seeds as dots and the mean with its 95% Student-t interval over seeds), or one of
:data:`SPECIAL_VIEWS`: the dose-response figures of 07 and 08 (:func:`mcmi_lab.figures.plots.plot_dose_response`) and the
zero-shot confusion matrices per teacher with the omitted classes marked. The per-seed values come from the report's
own readers (:func:`mcmi_lab.report.build.seed_rows`, :func:`mcmi_lab.report.build.values`), the intervals from
:func:`mcmi_lab.metrics.stats.paired_difference`, so the explorer shows the report's numbers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .explore import teacher_colors
from ..figures.plots import TEACHER_LABELS, dose_points, method_style, plot_dose_response, save_figure
from ..report.build import omitted_mean, seed_rows, values
from ..study.runs import collect_results, read_results, seed_dirs
from ..metrics.stats import paired_difference
from ..utils import mpl_text

__all__ = [
    "Metric",
    "METRICS",
    "SPECIAL_VIEWS",
    "load_run_results",
    "available_views",
    "view_choices",
    "results_table",
    "results_figure",
    "zero_shot_confusions",
]


@dataclass(frozen=True)
class Metric:
    """One number per row of a results table. group: the row field that splits a teacher's values (None: one value
    per teacher); scale: 100 for accuracies shown in %."""

    label: str
    notebook: str
    table: str
    value: str | Callable[[dict], Any]
    group: str | None = None
    scale: float = 1.0


METRICS = {
    "teacher_test_acc": Metric("teacher test accuracy (%)", "01_teachers", "teachers", "test_acc", scale=100.0),
    "teacher_train_cmi": Metric("teacher train CMI (nats)", "01_teachers", "teachers", "train_cmi"),
    "teacher_test_cmi": Metric("teacher test CMI (nats)", "01_teachers", "teachers", "test_cmi"),
    "teacher_test_ncmi": Metric("teacher test NCMI (CMI / Γ, no unit)", "01_teachers", "teachers", "test_ncmi"),
    "teacher_test_ece": Metric("teacher test ECE, top label (%)", "01_teachers", "teachers", "test_ece", scale=100.0),
    "student_acc": Metric("KD student test accuracy (%)", "03_distill", "students", "student_acc", "method", 100.0),
    "few_shot_acc": Metric("few-shot student test accuracy (%)", "05_few_shot", "few_shot", "student_acc", "fraction",
                           100.0),
    "zero_shot_acc": Metric("zero-shot student test accuracy, all classes (%)", "06_zero_shot", "zero_shot",
                            "student_acc", "omitted", 100.0),
    "zero_shot_omitted_acc": Metric("zero-shot student accuracy on the omitted classes (%)", "06_zero_shot",
                                    "zero_shot", omitted_mean, "omitted", 100.0),
    "known_bcpd_kl": Metric("KL(P* ‖ teacher) on test, known posterior (nats)", "08_known_bcpd", "known_bcpd",
                            "kl_to_bayes"),
}
#: Views that are not one number per teacher: (notebook, table, words).
SPECIAL_VIEWS = {
    "dose_response": ("07_dose_response", "dose_response", "dose-response: students and teacher against train CMI"),
    "known_bcpd_dose_response": ("08_known_bcpd", "dose_response", "dose-response on the known posterior"),
    "zero_shot_confusion": ("06_zero_shot", "zero_shot", "zero-shot confusion matrices, omitted classes marked"),
}
_DOSE_YS = {"dose_response": ("test_acc", "student_acc", "few_shot_acc", "zero_shot_omitted_acc"),
            "known_bcpd_dose_response": ("kl_to_bayes", "test_acc")}

Results = Mapping[str, Any]


# ---- reading ------------------------------------------------------------------------------------------------------

def load_run_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"run": run.json, "seeds": {seed: {notebook: results}}}`` of a run folder of ``mcmi-lab run``, or of one
    notebook's run_dir (its seed taken from the results' parameters)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is not accepted: no such folder; expected a run folder of "
                         "mcmi-lab run (--out) or a notebook's run_dir")
    if seed_dirs(path):
        results = collect_results(path)
    else:
        files = sorted((path / "results").glob("*.json"))
        seeds: dict[str, dict] = {}
        for f in files:
            result = read_results(path, f.stem)
            seed = str(((result.get("meta") or {}).get("parameters") or {}).get("seed", 0))
            seeds.setdefault(seed, {})[f.stem] = result
        results = {"run": {}, "seeds": seeds}
    if not any(results["seeds"].values()):
        raise ValueError(f"run_dir={str(run_dir)!r} is not accepted: it holds no results; expected "
                         "seed_<n>/results/*.json (a run of mcmi-lab run) or results/*.json (a notebook's run_dir)")
    return results


def _results(source: Results | str | os.PathLike) -> Results:
    return source if isinstance(source, Mapping) and "seeds" in source else load_run_results(source)


def _where(view: str) -> tuple[str, str]:
    if view in METRICS:
        return METRICS[view].notebook, METRICS[view].table
    if view in SPECIAL_VIEWS:
        return SPECIAL_VIEWS[view][:2]
    raise ValueError(f"view {view!r} is not accepted: expected one of {', '.join([*METRICS, *SPECIAL_VIEWS])}")


def available_views(source: Results | str | os.PathLike) -> list[str]:
    """The views whose results table the run holds (in :data:`METRICS`, then :data:`SPECIAL_VIEWS` order)."""
    results = _results(source)
    return [v for v in [*METRICS, *SPECIAL_VIEWS] if seed_rows(results, *_where(v))]


def view_choices(source: Results | str | os.PathLike, view: str) -> dict[str, list[str]]:
    """What a view can be filtered by: ``{"teachers": [...], "methods": [...]}`` as the run names them."""
    rows = [r for rs in _rows(_results(source), view).values() for r in rs]
    key = "method" if view in _DOSE_YS else "teacher"
    names = list(dict.fromkeys(str(r[key]) for r in rows if key in r))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows if "method" in r)) if view in (
        "student_acc", *_DOSE_YS) else []
    return {"teachers": [] if view in _DOSE_YS else names, "methods": methods}


def _rows(results: Results, view: str) -> dict[str, list[dict]]:
    rows = seed_rows(results, *_where(view))
    if not rows:
        raise ValueError(f"view {view!r} is not accepted for this run: it holds no {_where(view)[0]} results; "
                         f"expected one of {', '.join(available_views(results)) or 'none'}")
    return rows


def _pick(kind: str, wanted: Sequence[str] | None, present: Sequence[str], view: str) -> list[str]:
    if wanted is None:
        return list(present)
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    if not wanted:
        raise ValueError(f"{kind}=[] is not accepted: expected some of {', '.join(present)}")
    for w in wanted:
        if w not in present:
            raise ValueError(f"{kind[:-1]} {w!r} is not accepted for view {view!r}: expected one of "
                             f"{', '.join(present) or 'none (this view has no ' + kind + ')'}")
    return wanted


def _classes(results: Results) -> list[str] | None:
    names = next((nb["06_zero_shot"]["classes"] for nb in results["seeds"].values()
                  if "classes" in nb.get("06_zero_shot", {})), None)
    return [mpl_text(c) for c in names] if names is not None else None  # drawn by matplotlib: "$" literal


def _group_text(field: str, value: Any, classes: Sequence[str] | None) -> str:
    if field == "fraction":
        return f"{100 * value:g}% of the data"
    if field == "omitted":
        return "omitted: " + ", ".join(classes[c] if classes else str(c) for c in value)
    return str(value)


# ---- tables -------------------------------------------------------------------------------------------------------

def _interval(vals: Sequence[float]) -> dict[str, float]:
    d = paired_difference(vals, [0.0] * len(vals))  # the mean with its 95% t interval over the seeds
    return {"mean": d["mean"], "low": d["low"], "high": d["high"], "n": d["n"]}


def results_table(source: Results | str | os.PathLike, view: str, teachers: Sequence[str] | None = None,
                  methods: Sequence[str] | None = None) -> list[dict]:
    """The numbers behind :func:`results_figure`. A metric: one row per (group, teacher) with ``values`` ({seed:
    value}, scaled as shown), ``mean``, ``low``, ``high`` (95% interval, nan with one seed) and ``n``. A dose view:
    one row per (metric, method, dose) from :func:`mcmi_lab.figures.plots.dose_points`. The confusion view: one row per
    teacher with the pooled confusion counts and the accuracy on the omitted classes (%)."""
    results = _results(source)
    rows = _rows(results, view)
    choices = view_choices(results, view)
    if view in _DOSE_YS:
        if teachers is not None:
            raise ValueError(f"teachers={teachers!r} is not accepted for view {view!r}: it compares methods; "
                             f"expected methods= some of {', '.join(choices['methods'])}")
        kept = _pick("methods", methods, choices["methods"], view)
        flat = [r for rs in rows.values() for r in rs if r["method"] in kept or r["method"] == "control"]
        flat = [r for r in flat if r.get("matched", True)]
        return [{"metric": y, "method": m, "dose": p["dose"], "train_cmi": p["x"], "mean": p["y"], "low": p["low"],
                 "high": p["high"], "n": len(p["ys"])}
                for y in _DOSE_YS[view] for m, pts in dose_points(flat, y).items() for p in pts]
    if methods is not None and view != "student_acc":
        raise ValueError(f"methods={methods!r} is not accepted for view {view!r}: only student_acc and the "
                         "dose-response views have KD or dose methods")
    names = _pick("teachers", teachers, choices["teachers"], view)
    if view == "zero_shot_confusion":
        sets = list(dict.fromkeys(tuple(r["omitted"]) for rs in rows.values() for r in rs))
        out = []
        for s in sets:
            pooled = zero_shot_confusions(results, list(s), names)
            for name, cm in pooled.items():
                acc = float(cm[list(s), list(s)].sum() / cm[list(s)].sum()) * 100.0
                out.append({"teacher": name, "omitted": list(s), "confusion": cm.tolist(), "omitted_acc": acc,
                            "n": len(values(rows, "student_acc", teacher=name, omitted=list(s)))})
        return out
    metric = METRICS[view]
    groups = [None] if metric.group is None else list(dict.fromkeys(
        tuple(r[metric.group]) if isinstance(r[metric.group], list) else r[metric.group]
        for rs in rows.values() for r in rs))
    kept = _pick("methods", methods, choices["methods"], view) if metric.group == "method" else None
    out = []
    for g in groups:
        if kept is not None and g not in kept:
            continue
        match = {} if g is None else {metric.group: list(g) if isinstance(g, tuple) else g}
        for name in names:
            vals = {s: metric.scale * v for s, v in values(rows, metric.value, teacher=name, **match).items()}
            if vals:
                out.append({"teacher": name, **match, "values": vals, **_interval(list(vals.values()))})
    return out


def zero_shot_confusions(source: Results | str | os.PathLike, omitted: Sequence[int],
                         teachers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """teacher -> the zero-shot student's confusion counts (K, K; rows: true class) for the omitted set, summed
    over the seeds."""
    rows = _rows(_results(source), "zero_shot_confusion")
    out: dict[str, torch.Tensor] = {}
    for name in _pick("teachers", teachers, view_choices(source, "zero_shot_confusion")["teachers"],
                      "zero_shot_confusion"):
        for seed_list in rows.values():
            for r in seed_list:
                if r["teacher"] == name and list(r["omitted"]) == list(omitted):
                    cm = torch.tensor(r["confusion"], dtype=torch.long)
                    out[name] = out[name] + cm if name in out else cm
    if not out:
        raise ValueError(f"omitted={list(omitted)!r} is not accepted: the run's zero-shot sets are "
                         f"{sorted({tuple(r['omitted']) for rs in rows.values() for r in rs})}")
    return out


# ---- figures ------------------------------------------------------------------------------------------------------

def _metric_figure(results: Results, view: str, table: list[dict]) -> Figure:
    metric = METRICS[view]
    names = list(dict.fromkeys(r["teacher"] for r in table))
    groups = list(dict.fromkeys(None if metric.group is None else (
        tuple(r[metric.group]) if isinstance(r[metric.group], list) else r[metric.group]) for r in table))
    colors = teacher_colors(names)
    width = 0.8 / max(1, len(names)) if metric.group else 0.8
    fig = Figure(figsize=(max(5.0, 1.0 + 0.55 * len(table)), 4.0), layout="constrained")
    ax = fig.subplots()
    seeds = max(r["n"] for r in table)
    for r in table:
        g = None if metric.group is None else (tuple(r[metric.group]) if isinstance(r[metric.group], list)
                                               else r[metric.group])
        offset = width * (names.index(r["teacher"]) - (len(names) - 1) / 2)
        x = groups.index(g) + offset if metric.group else names.index(r["teacher"])
        pts = list(r["values"].values())
        spread = [x + width * 0.3 * (i / max(1, len(pts) - 1) - 0.5) for i in range(len(pts))] if len(pts) > 1 else [x]
        ax.plot(spread, pts, ".", color=colors[r["teacher"]], alpha=0.45, ms=7)
        err = None
        if r["n"] > 1 and math.isfinite(r["low"]):
            err = [[r["mean"] - r["low"]], [r["high"] - r["mean"]]]
        ax.errorbar([x], [r["mean"]], yerr=err, fmt=method_style(r["teacher"])["marker"], ms=7, capsize=4,
                    color=colors[r["teacher"]], mec="black", label=TEACHER_LABELS.get(r["teacher"], r["teacher"]))
    classes = _classes(results)
    if metric.group:
        ax.set_xticks(range(len(groups)), [_group_text(metric.group, g, classes) for g in groups],
                      rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    else:
        ax.set_xticks(range(len(names)), [TEACHER_LABELS.get(n, n) for n in names], rotation=20, ha="right")
    ax.set_ylabel(metric.label)
    ax.grid(axis="y", alpha=0.3)
    spread_text = "one seed: no interval" if seeds < 2 else f"mean and 95% interval over {seeds} seeds; dots: seeds"
    ax.set_title(f"{metric.label.rsplit(' (', 1)[0]}\n{spread_text}", fontsize=10)
    return fig


def _confusion_figure(results: Results, table: list[dict], omitted: Sequence[int]) -> Figure:
    shown = [r for r in table if r["omitted"] == list(omitted)]
    if not shown:
        raise ValueError(f"omitted={list(omitted)!r} is not accepted: the run's zero-shot sets are "
                         f"{list(dict.fromkeys(tuple(r['omitted']) for r in table))}")
    cms = [torch.tensor(r["confusion"], dtype=torch.float64) for r in shown]
    k = len(cms[0])
    classes = _classes(results) or [str(c) for c in range(k)]
    fig = Figure(figsize=(1.0 + (0.42 * k + 1.2) * len(shown), 0.42 * k + 2.2), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False, sharey=True)[0]
    image = None
    for ax, r, cm in zip(axes, shown, cms):
        share = cm / cm.sum(dim=1, keepdim=True).clamp_min(1)
        image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                v = float(share[i, j])
                if k <= 12 and v >= 0.005:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 else "black")
        for c in omitted:  # the omitted class's row: what the student never saw
            ax.add_patch(Rectangle((-0.5, c - 0.5), k, 1, fill=False, edgecolor="red", lw=2))
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        for label in ax.get_xticklabels() + ax.get_yticklabels():
            if label.get_text() in {classes[c] for c in omitted}:
                label.set_color("red")
                label.set_fontweight("bold")
        ax.set_xlabel("predicted class")
        ax.set_title(f"{TEACHER_LABELS.get(r['teacher'], r['teacher'])}\nomitted classes: {r['omitted_acc']:.1f}% "
                     "correct", fontsize=9)
    axes[0].set_ylabel("true class")
    bar = fig.colorbar(image, ax=list(axes), shrink=0.8)
    bar.set_label("share of the true class's test images (numbers: %)", fontsize=8)
    n = max(r["n"] for r in shown)
    fig.suptitle(f"Zero-shot students, omitted classes in red: {', '.join(classes[c] for c in omitted)} "
                 f"(pooled over {n} seed{'s' if n != 1 else ''})", fontsize=10)
    return fig


def results_figure(source: Results | str | os.PathLike, view: str, teachers: Sequence[str] | None = None,
                   methods: Sequence[str] | None = None, omitted: Sequence[int] | None = None, path=None) -> Figure:
    """The figure of one view of a finished run (see the module docstring); `teachers` / `methods` filter it
    (:func:`view_choices`), `omitted` picks the zero-shot set of the confusion view (default: the first)."""
    results = _results(source)
    table = results_table(results, view, teachers, methods)
    if view in _DOSE_YS:
        rows = [r for rs in _rows(results, view).values() for r in rs
                if r["method"] == "control" or r["method"] in {t["method"] for t in table}]
        fig = plot_dose_response(rows, _DOSE_YS[view])
    elif view == "zero_shot_confusion":
        fig = _confusion_figure(results, table, table[0]["omitted"] if omitted is None else list(omitted))
    else:
        fig = _metric_figure(results, view, table)
    if path is not None:
        save_figure(fig, path)
    return fig
