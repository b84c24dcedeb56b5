"""ipywidgets glue for notebooks: every callback calls the same library function the headless path calls.

* ``cam_explorer``: :func:`mcmi_lab.figures.cam.plot_cam_grid` for a chosen class, images and pair of teachers;
* ``teacher_explorer``: :func:`mcmi_lab.explorers.explore.teacher_figure`, one image through every teacher;
* ``concentration_explorer``: :func:`mcmi_lab.explorers.explore.concentration_figure`, one class through every teacher;
* ``results_explorer``: :func:`mcmi_lab.explorers.results.results_figure`, a finished run's results.

The teachers' predictions are computed once when an explorer is built (:func:`mcmi_lab.explorers.explore.prepare_explore`),
never in a callback. Figures are shown as PNG images, so they display the same whatever matplotlib backend the
kernel runs; the latest one is kept as ``box.figure``. A choice that cannot be drawn shows its one-line reason.
"""
from __future__ import annotations

import io
from typing import Callable, Mapping

import torch
from torch import nn

from ..figures.cam import plot_cam_grid
from .explore import (AMONG, ExploreData, class_order, concentration_figure, prepare_explore, select_images,
                      teacher_figure)
from .results import METRICS, SPECIAL_VIEWS, available_views, load_run_results, results_figure, view_choices
from ..report.build import TEACHER_LABELS

__all__ = [
    "cam_grid_for",
    "cam_explorer",
    "teacher_explorer",
    "concentration_explorer",
    "results_explorer",
]

ALL_CLASSES = -1


def _class_indices(data, label: int) -> torch.Tensor:
    labels = data.labels.cpu()
    return torch.arange(len(labels)) if label == ALL_CLASSES else torch.nonzero(labels == label).flatten()


def cam_grid_for(models: Mapping[str, nn.Module], data, label: int = ALL_CLASSES, count: int = 4, offset: int = 0,
                 pair: tuple[str, str] | None = None, target_layers=None):
    """The explorer's figure without widgets: `count` images of class `label` (or of all classes) from `offset` on,
    Eigen-CAM of the two teachers in `pair` (default: the first two models) through :func:`plot_cam_grid`."""
    names = list(pair) if pair is not None else list(models)[:2]
    chosen = {n: models[n] for n in dict.fromkeys(names)}  # the same teacher twice is drawn once
    index = _class_indices(data, label)[offset:offset + count]
    if len(index) == 0:
        raise ValueError(f"offset={offset} is not accepted: the selected class has fewer images")
    index = index.to(data.images.device)
    return plot_cam_grid(data.images[index], chosen, data=data, labels=data.labels[index].cpu(),
                         target_layers=target_layers)


def cam_explorer(models: Mapping[str, nn.Module], data, target_layers=None, max_images: int = 8):
    """A VBox: class dropdown, image count and offset sliders, two teacher dropdowns, and the figure in an Output.

    The latest figure is kept as ``box.figure`` (a matplotlib Figure).
    """
    import ipywidgets as w

    if len(models) == 0:
        raise ValueError("models={} is not accepted: expected at least one model")
    names = list(models)
    label = w.Dropdown(options=[("all classes", ALL_CLASSES)] + [(c, i) for i, c in enumerate(data.classes)],
                       value=ALL_CLASSES, description="class")
    count = w.IntSlider(value=min(4, max_images), min=1, max=max_images, description="images",
                        continuous_update=False)
    offset = w.IntSlider(value=0, min=0, max=max(0, len(data) - 1), description="offset", continuous_update=False)
    first = w.Dropdown(options=names, value=names[0], description="teacher A")
    second = w.Dropdown(options=names, value=names[min(1, len(names) - 1)], description="teacher B")
    out = w.Output()
    box = w.VBox([w.HBox([label, count, offset]), w.HBox([first, second]), out])

    def draw() -> None:
        offset.max = max(0, len(_class_indices(data, label.value)) - 1)  # fires another "value" event: _once
        _show(box, out, lambda: cam_grid_for(models, data, label.value, count.value, offset.value,
                                             (first.value, second.value), target_layers))

    observer = _once(draw)
    for control in (label, count, offset, first, second):
        control.observe(observer, names="value")
    observer()
    return box


# ---- shared -------------------------------------------------------------------------------------------------------

def _message(out, text: str) -> None:
    out.clear_output(wait=True)
    with out:
        print(text)


def _show(box, out, draw: Callable) -> None:
    """Draw into `out` as a PNG and keep the figure as ``box.figure``; a ValueError shows its one line instead."""
    from IPython.display import Image, display

    try:
        fig = draw()
    except ValueError as err:
        return _message(out, str(err))
    box.figure = fig
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    out.clear_output(wait=True)
    with out:
        display(Image(png.getvalue()))


def _once(draw: Callable[[], None], busy: list | None = None) -> Callable:
    """An observer that runs `draw` once per user change (changing one control's options fires more events);
    observers given the same `busy` flag do not run inside one another."""
    busy = busy if busy is not None else [False]

    def observer(_=None) -> None:
        if busy[0]:
            return
        busy[0] = True
        try:
            draw()
        finally:
            busy[0] = False

    observer.busy = busy
    return observer


def _explore_data(teachers, data, temperature: float, outputs) -> ExploreData:
    return teachers if isinstance(teachers, ExploreData) else prepare_explore(teachers, data, temperature, outputs)


def _default_teachers(names: list[str]) -> list[str]:
    """MLL, control and MCMI side by side where the run has them, else every teacher."""
    shown = [n for n in ("mll", "control", "mcmi") if n in names]
    return shown if len(shown) >= 2 else names


def _teacher_picker(w, names: list[str]):
    return w.SelectMultiple(options=[(TEACHER_LABELS.get(n, n), n) for n in names], value=_default_teachers(names),
                            description="teachers", rows=min(5, len(names)))


# ---- teacher_explorer -------------------------------------------------------------------------------------------------

def teacher_explorer(teachers: Mapping[str, nn.Module] | ExploreData, data=None, temperature: float = 4.0,
                     outputs=None):
    """Pick an image (class, which images: all / the teachers disagree / a teacher is wrong, then a slider, or a data
    index) and see :func:`~mcmi_lab.explorers.explore.teacher_figure`: the image, each teacher's probabilities at T = 1 and at
    the KD `temperature` (log scale option), its KL to the class centroid and its Eigen-CAM, side by side.

    teachers: name -> model (predicted once here, or `outputs` = name -> predict(model, data)), or an ExploreData.
    """
    import ipywidgets as w

    ex = _explore_data(teachers, data, temperature, outputs)
    label = w.Dropdown(options=[("all classes", -1)] + [(c, i) for i, c in enumerate(ex.classes)], value=-1,
                       description="class")
    among = w.Dropdown(options=[(words, key) for key, words in AMONG.items()], value="all", description="among")
    pick = w.IntSlider(value=0, min=0, max=max(0, len(ex.labels) - 1), description="image", continuous_update=False)
    index = w.BoundedIntText(value=0, min=0, max=len(ex.labels) - 1, description="data index")
    shown = _teacher_picker(w, ex.names)
    log = w.Checkbox(value=False, description="log scale")
    cam = w.Checkbox(value=True, description="Eigen-CAM")
    where = w.Label()
    out = w.Output()
    box = w.VBox([w.HBox([label, among, pick]), w.HBox([index, where]), w.HBox([shown, w.VBox([log, cam])]), out])
    box.explore = ex

    def draw() -> None:
        candidates = select_images(ex, label.value, among.value)
        pick.max = max(0, len(candidates) - 1)
        if len(candidates) == 0:
            where.value = "no such image"
            return _message(out, f"no image of {label.label} where {AMONG[among.value]}: pick another class or "
                                 "'all images'")
        chosen = int(candidates[min(pick.value, len(candidates) - 1)])
        index.value = chosen
        where.value = f"image {pick.value + 1} of {len(candidates)}"
        _show(box, out, lambda: teacher_figure(ex, chosen, list(shown.value), log.value, cam.value))

    def jump() -> None:  # a data index: show that image among all images
        label.value, among.value = -1, "all"
        pick.max = len(ex.labels) - 1
        pick.value = index.value
        draw()

    def refilter() -> None:  # another class or selection: start at its first image
        pick.value = 0
        draw()

    observer = _once(draw)
    for control in (pick, shown, log, cam):
        control.observe(observer, names="value")
    for control in (label, among):
        control.observe(_once(refilter, observer.busy), names="value")
    index.observe(_once(jump, observer.busy), names="value")
    observer()
    return box


# ---- concentration_explorer ---------------------------------------------------------------------------------------

def concentration_explorer(teachers: Mapping[str, nn.Module] | ExploreData, data=None, outputs=None):
    """Pick a class and see :func:`~mcmi_lab.explorers.explore.concentration_figure`: each teacher's distribution of
    KL(P_x ‖ Q_y), the class centroid as bars and a 2-D projection of the class with the same axes for every
    teacher; pick one of its images (in data order, or by one teacher's KL, largest first) to see it in red."""
    import ipywidgets as w

    ex = _explore_data(teachers, data, 4.0, outputs)
    label = w.Dropdown(options=[(c, i) for i, c in enumerate(ex.classes)], value=0, description="class")
    orders = [("data order", None)] + [(f"KL of {TEACHER_LABELS.get(n, n)}, largest first", n) for n in ex.names]
    order = w.Dropdown(options=orders, value="mcmi" if "mcmi" in ex.names else ex.names[-1], description="order")
    pick = w.IntSlider(value=0, min=0, max=0, description="image", continuous_update=False)
    picked = w.Checkbox(value=True, description="show the picked image")
    shown = _teacher_picker(w, ex.names)
    log = w.Checkbox(value=False, description="log scale")
    where = w.Label()
    out = w.Output()
    box = w.VBox([w.HBox([label, order]), w.HBox([pick, picked, where]), w.HBox([shown, log]), out])
    box.explore = ex

    def draw() -> None:
        members = class_order(ex, label.value, order.value)
        pick.max = max(0, len(members) - 1)
        point = int(members[min(pick.value, len(members) - 1)]) if picked.value and len(members) else None
        where.value = f"data index {point}" if point is not None else ""
        _show(box, out, lambda: concentration_figure(ex, label.value, list(shown.value), point, log.value))

    def reorder() -> None:  # another class or order: start at its first image
        pick.value = 0
        draw()

    observer = _once(draw)
    for control in (pick, picked, shown, log):
        control.observe(observer, names="value")
    for control in (label, order):
        control.observe(_once(reorder, observer.busy), names="value")
    observer()
    return box


# ---- results_explorer -------------------------------------------------------------------------------------------------

def results_explorer(run_dir, view: str | None = None):
    """Browse a finished run's results without training anything: pick a view (student accuracy, few-shot, zero-shot,
    teacher CMI, ECE, the dose-response, the zero-shot confusion matrices ...), the teachers or methods, and see
    :func:`~mcmi_lab.explorers.results.results_figure` with the per-seed points and 95% intervals.

    run_dir: a run folder of ``mcmi-lab run`` or one notebook's run_dir; view: the one shown first (default: the
    first the run has)."""
    import ipywidgets as w

    results = load_run_results(run_dir)
    views = available_views(results)
    if view is not None and view not in views:
        raise ValueError(f"view={view!r} is not accepted for this run: expected one of {', '.join(views)}")
    words = {**{k: m.label for k, m in METRICS.items()}, **{k: v[2] for k, v in SPECIAL_VIEWS.items()}}
    view = w.Dropdown(options=[(words[v], v) for v in views], value=view or views[0], description="view",
                      layout=w.Layout(width="32em"))
    teachers = w.SelectMultiple(description="teachers", rows=5)
    methods = w.SelectMultiple(description="methods", rows=5)
    omitted = w.Dropdown(description="omitted")
    out = w.Output()
    box = w.VBox([view, w.HBox([teachers, methods, omitted]), out])
    box.results = results

    def refresh_choices() -> None:  # a new view: its own teachers, methods and omitted sets, all selected
        choices = view_choices(results, view.value)
        teachers.options = [(TEACHER_LABELS.get(n, n), n) for n in choices["teachers"]]
        teachers.value = tuple(choices["teachers"])
        methods.options = choices["methods"]
        methods.value = tuple(choices["methods"])
        sets = []
        if view.value == "zero_shot_confusion":
            rows = [r for nb in results["seeds"].values() for r in nb.get("06_zero_shot", {}).get("zero_shot", [])]
            sets = list(dict.fromkeys(tuple(r["omitted"]) for r in rows))
        omitted.options = [(", ".join(map(str, s)), s) for s in sets]
        omitted.value = sets[0] if sets else None
        teachers.disabled, methods.disabled, omitted.disabled = not choices["teachers"], not choices["methods"], \
            not sets

    def draw() -> None:
        if view.value != draw.view:
            draw.view = view.value
            refresh_choices()
        _show(box, out, lambda: results_figure(
            results, view.value, list(teachers.value) if not teachers.disabled else None,
            list(methods.value) if not methods.disabled else None, omitted.value))

    draw.view = None
    observer = _once(draw)
    for control in (view, teachers, methods, omitted):
        control.observe(observer, names="value")
    observer()
    return box
