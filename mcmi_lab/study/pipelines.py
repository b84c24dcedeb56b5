"""Named pipelines (`demo`, `smoke`, `paper`): which notebooks run, with which parameters, and how they are checked.

Every notebook in ``notebooks/`` declares a subset of :data:`PARAMETERS` in its ``parameters`` cell, with the
defaults written here (a test keeps the two in step). A pipeline overrides some defaults; ``mcmi-lab run`` then
overrides some more from the command line and checks the whole set with :func:`validate_parameters` before any
notebook runs, so a bad value fails in one line instead of minutes later in a cell.

The steps the notebooks run (teachers, controls, students, the run data) are in :mod:`mcmi_lab.study.recipes`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..data.registry import check_dataset, dataset_classes
from ..kd import KD_METHODS
from ..models import MODELS
from ..training.objectives import UPDATES
from ..utils import check_choice, check_float, check_int

#: The notebook set of a full run, in execution order (01 writes the teachers every later notebook reads).
NOTEBOOKS = ("01_teachers", "02_concentration", "03_distill", "04_eigencam", "05_few_shot", "06_zero_shot",
             "07_dose_response", "08_known_bcpd")
#: What a notebook reads from the run folder: every notebook but 08 (its own synthetic teachers) and the quickstart
#: needs the teachers of 01_teachers. `mcmi-lab run` starts a notebook once those of the same seed are done.
INDEPENDENT = ("00_quickstart", "01_teachers", "08_known_bcpd", "09_own_data")


#: Start order when several notebooks run at once: the teachers first (everything waits on them), then the longest,
#: so that the run does not end with one long notebook on one core while the others idle.
START_ORDER = ("01_teachers", "07_dose_response", "08_known_bcpd", "03_distill", "06_zero_shot", "02_concentration",
               "05_few_shot", "04_eigencam")


def notebook_needs(name: str) -> tuple[str, ...]:
    return () if name in INDEPENDENT else ("01_teachers",)


#: Teachers written by 01_teachers: MLL, the three fair controls, and MCMI.
TEACHERS = ("mll", "control", "label_smoothing", "temperature", "mcmi")


# ---- checks: each raises one ValueError line naming the parameter, the value and what is accepted -------------

def _optional(check: Callable) -> Callable:
    return lambda name, value, params: None if value is None else check(name, value, params)


def _int(minimum: int = 0) -> Callable:
    return lambda name, value, params: check_int(name, value, minimum=minimum)


def _float(low=None, high=None, low_open=False, high_open=False) -> Callable:
    def check(name, value, params):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} is not accepted: expected a number")
        check_float(name, value, low, high, low_open, high_open)
    return check


def _choice(choices: Callable[[], Sequence[str]]) -> Callable:
    return lambda name, value, params: check_choice(name, value, tuple(choices()))


def _bool(name, value, params):
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not accepted: expected true or false")


def _str(name, value, params):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}={value!r} is not accepted: expected a non-empty string")


def _list_of(item: Callable, example: str = "[0.1, 0.5]") -> Callable:
    def check(name, value, params):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}={value!r} is not accepted: expected a non-empty JSON list, e.g. -p {name} "
                             f"'{example}'")
        for i, v in enumerate(value):
            item(f"{name}[{i}]", v, params)
    return check


def _model_names() -> Sequence[str]:
    return list(MODELS)


def _updates() -> Sequence[str]:
    return UPDATES


def _kd_method_names() -> Sequence[str]:
    return list(KD_METHODS)


def _omit_sets(name, value, params):
    """A list of class sets: each item an index (one class) or a list of indices (several at once)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name}={value!r} is not accepted: expected a non-empty list of classes or class lists, "
                         "e.g. [3, [0, 3, 6]]")
    k = dataset_classes(params.get("dataset"))
    for i, item in enumerate(value):
        classes = item if isinstance(item, list) else [item]
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, int) or c < 0 or (k is not None and c >= k):
                where = f"[0, {k - 1}]" if k is not None else ">= 0"
                raise ValueError(f"{name}[{i}]={item!r} is not accepted: expected class indices in {where} "
                                 f"for dataset {params.get('dataset')!r}")
        if not classes or (k is not None and len(set(classes)) >= k):
            raise ValueError(f"{name}[{i}]={item!r} is not accepted: expected at least one omitted class and at "
                             f"least one kept class")


@dataclass(frozen=True)
class Parameter:
    default: Any
    check: Callable[[str, Any, Mapping], None]
    help: str


_EPOCHS, _LR = _int(1), _float(0.0, low_open=True)

#: Every parameter a notebook may declare: name -> default (the notebooks' own defaults), check, meaning.
PARAMETERS: dict[str, Parameter] = {
    "run_dir": Parameter("../runs/notebooks", _str, "run folder: checkpoints/, results/, figures/ of one seed"),
    "seed": Parameter(0, _int(0), "run seed; teacher/fine-tune/student seeds derive from it (stats.derive_seeds)"),
    "device": Parameter(None, _optional(_str), "torch device (None: cuda > mps > cpu)"),
    "interactive": Parameter(True, _bool, "show widgets and progress bars (mcmi-lab run sets false)"),
    "tensorboard": Parameter(False, _bool, "every training's epochs as TensorBoard scalars under run_dir/tensorboard (tensorboard extra)"),
    # data
    "dataset": Parameter("fashion-mnist", lambda name, value, params: check_dataset(value, name),
                         "data set name (data.DATASETS)"),
    "data_root": Parameter(None, _optional(_str), "directory holding the data set (None: the usual places)"),
    "train_size": Parameter(10000, _optional(_int(1)), "training samples (class-interleaved subset; None: all)"),
    "test_size": Parameter(None, _optional(_int(1)), "test samples (None: all)"),
    "val_fraction": Parameter(0.1, _float(0.0, 1.0, True, True), "validation part of train (temperature scaling)"),
    "batch_size": Parameter(64, _int(1), "batch size of every training run"),
    "augment": Parameter(False, _bool, "random crop + flip for the teachers (off: they converge, DESIGN.md §2)"),
    "student_augment": Parameter(True, _bool, "random crop + flip for the students (the reference student recipe)"),
    # teachers
    "teacher_model": Parameter("cnn_small", _choice(_model_names), "teacher architecture (models.MODELS)"),
    "teacher_epochs": Parameter(40, _EPOCHS, "epochs of the MLL teacher"),
    "teacher_lr": Parameter(0.05, _LR, "learning rate of the MLL teacher (step schedule)"),
    "finetune_epochs": Parameter(5, _EPOCHS, "extra epochs of MCMI and of every control teacher"),
    "finetune_lr": Parameter(0.01, _LR, "learning rate of the fine-tunes (cosine schedule)"),
    "lam": Parameter(0.5, _float(0.0), "λ of the MCMI teacher: CE − λ·KL(P_x ‖ Q_y)"),
    "centroid_update": Parameter("running", _choice(_updates), "MCMI centroid update (train.MCMIObjective)"),
    "label_smoothing": Parameter(0.1, _float(0.0, 1.0, high_open=True), "smoothing of the label-smoothing teacher"),
    "doses": Parameter([0.05, 0.1, 0.2, 0.3], _list_of(_float(0.0, low_open=True)),
                       "train-CMI doses in nats of the dose-response study (07)"),
    "dose_lr": Parameter(0.05, _LR, "learning rate of the dose-response fine-tunes (cosine; the controller was "
                                    "measured at it)"),
    # students
    "student_model": Parameter("cnn_tiny", _choice(_model_names), "student architecture (models.MODELS)"),
    "student_epochs": Parameter(10, _EPOCHS, "epochs of every student"),
    "student_lr": Parameter(0.05, _LR, "learning rate of the students (step schedule)"),
    "kd_methods": Parameter(["kd"], _list_of(_choice(_kd_method_names), '["kd", "dkd"]'), "KD methods of 03_distill"),
    "kd_temperature": Parameter(4.0, _float(0.0, low_open=True), "KD temperature T"),
    "teachers": Parameter(list(TEACHERS), _list_of(_choice(lambda: TEACHERS), '["control", "mcmi"]'),
                          "teachers distilled in 03"),
    "shot_teachers": Parameter(["control", "mcmi"], _list_of(_choice(lambda: TEACHERS), '["control", "mcmi"]'),
                               "teachers distilled in few-shot (05) and zero-shot (06)"),
    "fractions": Parameter([0.05, 0.1, 0.25, 1.0], _list_of(_float(0.0, 1.0, low_open=True)),
                           "few-shot training fractions (05)"),
    "few_shot_schedule": Parameter("epochs", _choice(lambda: ("epochs", "steps")),
                                   "few-shot students train student_epochs (the paper) or student_epochs / fraction "
                                   "(as many steps as on the full data)"),
    "omit_classes": Parameter([3, [0, 3, 6]], _omit_sets, "zero-shot: each item a class or a list of classes (06)"),
    # Eigen-CAM
    "cam_images": Parameter(6, _int(1), "images in the Eigen-CAM grid (04)"),
    "cam_stat_images": Parameter(500, _int(1), "test images behind the Eigen-CAM statistics (04)"),
    # known BCPD
    "synthetic_separation": Parameter(3.5, _float(0.0), "overlap knob of the synthetic task (08)"),
    "synthetic_size": Parameter(8, _int(2), "image side of the synthetic task (08)"),
    "synthetic_model": Parameter("mlp", _choice(_model_names), "teacher and student architecture of the synthetic "
                                                                 "task (08; its Bayes classifier is linear)"),
    "synthetic_train_size": Parameter(4000, _int(10), "training samples of the synthetic task (08)"),
    "synthetic_epochs": Parameter(40, _EPOCHS, "epochs of the synthetic task's MLL teacher (08)"),
    "synthetic_test_size": Parameter(2000, _int(1), "test samples of the synthetic task (08)"),
}


@dataclass(frozen=True)
class Pipeline:
    """A named run: notebooks in order, parameter overrides of :data:`PARAMETERS`, default seeds, and how many
    notebooks run at once (None: one per CPU core, each kernel single-threaded; 1 for one GPU)."""

    name: str
    description: str
    notebooks: tuple[str, ...] = NOTEBOOKS
    parameters: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    jobs: int | None = None


PIPELINES: dict[str, Pipeline] = {
    "demo": Pipeline(
        "demo", "Fashion-MNIST on CPU: near-converged cnn_small teachers on a stratified subset, the dose-response "
                "study (MCMI, label smoothing, temperature at train-CMI doses 0.05 and 0.2, each teacher with KD, "
                "few-shot and zero-shot cnn_tiny students of 10 epochs' steps), concentration, Eigen-CAM and the "
                "known posterior; 3 seeds",
        notebooks=("01_teachers", "02_concentration", "04_eigencam", "07_dose_response", "08_known_bcpd"),
        # students: 10 epochs, the most the 15-minute budget holds (README "How long the students train": the KD
        # student gains 4.8 more points by 30); few-shot students as many steps (25% of the data, 40 epochs).
        # Doses: 0.05, the one dose all three methods reach, and 0.2, the highest MCMI holds without collapsing
        parameters={"train_size": 2500, "test_size": 5000, "teacher_epochs": 40, "finetune_epochs": 8,
                    "student_epochs": 10, "few_shot_schedule": "steps", "doses": [0.05, 0.2], "fractions": [0.25],
                    "omit_classes": [3], "teachers": list(TEACHERS)}),
    "dose": Pipeline(
        "dose", "the dose-response study alone, on twice the demo's data (4,500 training images, students of 30 "
                "epochs' steps, where the demo's KD students came within reach of their plateau): 01_teachers, then "
                "07_dose_response; 3 seeds, several hours on 2 cores",
        notebooks=("01_teachers", "07_dose_response"),
        parameters={"train_size": 5000, "teacher_epochs": 40, "finetune_epochs": 8, "student_epochs": 30,
                    "few_shot_schedule": "steps", "fractions": [0.05, 0.25], "omit_classes": [3, [0, 3]]}),
    "smoke": Pipeline(
        "smoke", "seconds per notebook: tiny subsets, one epoch; checks that everything runs, not what it finds",
        parameters={"train_size": 400, "test_size": 300, "teacher_epochs": 1, "finetune_epochs": 1,
                    "student_epochs": 1, "kd_methods": ["kd", "at"], "doses": [0.05, 0.1], "fractions": [0.25, 1.0],
                    "few_shot_schedule": "steps", "omit_classes": [3, [0, 3]], "teachers": ["mll", "control", "mcmi"],
                    "cam_images": 2, "cam_stat_images": 50, "synthetic_train_size": 300, "synthetic_epochs": 1,
                    "synthetic_test_size": 200},
        seeds=(0,)),
    "paper": Pipeline(
        "paper", "CIFAR-100 reference recipe (needs a GPU and the data): resnet56 teacher 240 epochs, MCMI fine-tune "
                 "20 epochs (λ = 0.2, frozen centroids as in the reference code), resnet20 students 240 epochs",
        parameters={"dataset": "cifar100", "train_size": None, "batch_size": 64, "augment": True,
                    "student_augment": True,
                    "teacher_model": "resnet56", "teacher_epochs": 240, "teacher_lr": 0.05,
                    "finetune_epochs": 20, "finetune_lr": 0.05, "lam": 0.2, "centroid_update": "frozen",
                    "student_model": "resnet20", "student_epochs": 240,
                    "student_lr": 0.05, "fractions": [0.05, 0.1, 0.25, 1.0], "omit_classes": [0, [0, 1, 2, 3, 4]],
                    "cam_images": 8, "cam_stat_images": 1000,
                    "synthetic_train_size": 20000, "synthetic_epochs": 60, "synthetic_test_size": 5000},
        seeds=(0, 1, 2, 3, 4), jobs=1),
}


# ---- parameters: parse, resolve, validate ---------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false/null), "None" as None, else the string."""
    if text == "None":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def get_pipeline(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise ValueError(f"pipeline {name!r} is not known: expected one of {', '.join(PIPELINES)}")
    return PIPELINES[name]


def resolve_parameters(pipeline: str | Pipeline, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the pipeline's values, then `overrides`; unknown names and bad values raise one ValueError."""
    pipe = get_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in PARAMETERS]
    if unknown:
        raise ValueError(f"parameter {unknown[0]!r} is not known: expected one of {', '.join(PARAMETERS)}")
    params = {name: copy.deepcopy(p.default) for name, p in PARAMETERS.items()}
    params.update(copy.deepcopy(pipe.parameters))
    params.update(overrides)
    return validate_parameters(params)


def validate_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check every known parameter in `params` (ValueError, one line, on the first bad one); returns a copy."""
    for name, value in params.items():
        if name not in PARAMETERS:
            raise ValueError(f"parameter {name!r} is not known: expected one of {', '.join(PARAMETERS)}")
        PARAMETERS[name].check(name, value, params)
    return dict(params)


def omit_sets(omit: Sequence[int | Sequence[int]]) -> list[list[int]]:
    """`omit_classes` as a list of class lists: ``[3, [0, 3]]`` -> ``[[3], [0, 3]]``."""
    return [list(item) if isinstance(item, (list, tuple)) else [item] for item in omit]
