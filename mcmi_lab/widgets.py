"""ipywidgets glue for notebooks: every callback calls the same library function the headless path calls.

``cam_explorer`` draws :func:`mcmi_lab.cam.plot_cam_grid` for a chosen class, images and pair of teachers. The
figure is shown as a PNG image, so it displays the same whatever matplotlib backend the kernel runs.
"""
from __future__ import annotations

import io
from typing import Mapping

import torch
from torch import nn

from .cam import plot_cam_grid

__all__ = [
    "cam_grid_for",
    "cam_explorer",
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
    from IPython.display import Image, display

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

    busy = [False]  # clamping offset.max fires another "value" event: draw once

    def draw(_=None) -> None:
        if busy[0]:
            return
        busy[0] = True
        try:
            offset.max = max(0, len(_class_indices(data, label.value)) - 1)
            fig = cam_grid_for(models, data, label.value, count.value, offset.value, (first.value, second.value),
                               target_layers)
            box.figure = fig
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=90)
            out.clear_output(wait=True)
            with out:
                display(Image(png.getvalue()))
        finally:
            busy[0] = False

    for control in (label, count, offset, first, second):
        control.observe(draw, names="value")
    draw()
    return box
