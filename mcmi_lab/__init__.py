"""mcmi_lab: knowledge distillation with MCMI teachers.

Where things live, one sub-package per layer (lowest first; a layer imports only from those before it):
``metrics`` (CMI, NCMI, the statistics), ``losses`` (pure MCMI, KD and feature losses), ``data`` (data sets as
tensors, views, batches, the user's files, the synthetic task), ``models`` (zoo + ``build_model``, feature hooks),
``training`` (``fit``, objectives, stacks, ``predict``, checkpoints), ``kd`` (the KD methods and ``distill``),
``study`` (recipes, dose-matched teachers, pipelines, run folders, the teacher card), ``figures`` (plots,
Eigen-CAM), ``report`` (report.md/html), ``explorers`` (widgets and the functions behind them), ``cli``
(``mcmi-lab``).

The public surface is ``__all__`` below plus the ``__all__`` of the three figure modules, ``mcmi_lab.figures.cam``,
``mcmi_lab.figures.plots`` and ``mcmi_lab.explorers.widgets``, which are imported on use (they pull in grad-cam,
matplotlib and ipywidgets): ``from mcmi_lab.figures.cam import plot_cam_grid``. The notebooks use nothing else
(tests/test_notebooks.py).
"""
__version__ = "0.1.0"

from .training.checkpoint import UnsafeCheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from .metrics.cmi import (CMIMeter, class_centroids, conditional_mutual_information, kl_to_centroids, ncmi, omitted_mass,
                          per_class_cmi, probabilities, separation)
from .data.core import ImageData, batches, few_shot, from_dataset, from_tensors, omit_classes, stratified_split, subset
from .data.registry import DATASETS, load_dataset
from .study.dose import (SmoothingSearch, dose_students, dose_teachers, match_label_smoothing, match_temperature, matched,
                         save_dose_teacher)
from .training.evaluate import evaluate, measure_cmi, metrics_from_logits, predict, teacher_omitted_mass
from .explorers.explore import ExploreData, concentration_figure, prepare_explore, select_images, teacher_figure
from .explorers.results import load_run_results, results_figure, results_table
from .models.features import capture, feature_shapes
from .kd import KD_METHODS, build_objective, distill, method_hparams
from .losses.teacher import cmim_loss, kd_loss, mcmi_loss, mse_teacher_loss, ncmi_loss
from .models import MODELS, build_model, cam_layer, classifier_layer, feature_layers
from .training.objectives import MCMIObjective, Objective, StopTraining, kd_objective, mcmi_objective, mll_objective
from .models.wrappers import TemperatureScaled
from .study.pipelines import PARAMETERS, PIPELINES, TEACHERS, omit_sets
from .study.recipes import (finetune_control, finetune_label_smoothing, finetune_mcmi, finetune_mcmi_doses, finetune_teacher,
                            load_run_data, model_metrics, temperature_scale, train_student, train_students, train_teacher)
from .report.build import build_report, markdown_table
from .study.report_card import format_card, inspect_checkpoint, metric_correlations, report_card
from .study.runs import figure_path, load_teacher, load_teachers, read_results, save_teacher, write_results
from .metrics.stats import brier_score, derive_seeds, expected_calibration_error, mean_std, paired_difference, spearman
from .data.synthetic import SyntheticTask, kl_to_posterior
from .training.stack import ModelStack, stack_models, stack_problem, unstack
from .training.stack_fit import fit_stack
from .training.teacher_objectives import TEACHER_OBJECTIVES, build_teacher_objective, teacher_objective_hparams
from .training.loop import TrainConfig, fit
from .utils import get_device, set_seed

__all__ = [
    "__version__", "get_device", "set_seed",
    # data
    "SmoothingSearch", "dose_students", "dose_teachers", "match_label_smoothing", "match_temperature", "matched",
    "save_dose_teacher",
    "DATASETS", "ImageData", "load_dataset", "from_tensors", "from_dataset", "few_shot", "omit_classes",
    "subset", "stratified_split", "batches", "SyntheticTask",
    # models
    "MODELS", "build_model", "feature_layers", "classifier_layer", "cam_layer", "capture", "feature_shapes",
    # CMI and losses
    "CMIMeter", "probabilities", "class_centroids", "kl_to_centroids", "conditional_mutual_information",
    "per_class_cmi", "separation", "ncmi", "omitted_mass", "teacher_omitted_mass", "mcmi_loss", "kd_loss", "mse_teacher_loss", "cmim_loss", "ncmi_loss",
    # training
    "TrainConfig", "fit", "Objective", "MCMIObjective", "StopTraining", "mll_objective", "mcmi_objective",
    "fit_stack", "ModelStack", "stack_models", "stack_problem", "unstack",
    "kd_objective", "KD_METHODS", "distill", "build_objective", "method_hparams",
    "TEACHER_OBJECTIVES", "build_teacher_objective", "teacher_objective_hparams",
    # the paper's steps (recipes)
    "load_run_data", "train_teacher", "finetune_teacher", "finetune_mcmi", "finetune_mcmi_doses", "finetune_control",
    "finetune_label_smoothing",
    "temperature_scale", "TemperatureScaled", "train_student", "train_students", "model_metrics",
    # evaluation and statistics
    "predict", "evaluate", "metrics_from_logits", "measure_cmi", "kl_to_posterior", "expected_calibration_error",
    "mean_std", "paired_difference", "derive_seeds", "brier_score", "spearman",
    "report_card", "format_card", "inspect_checkpoint", "metric_correlations",
    # artifacts
    "save_checkpoint", "load_checkpoint", "save_model", "load_model", "UnsafeCheckpointError",
    # run folders and reports (what the notebooks hand each other)
    "save_teacher", "load_teacher", "load_teachers", "write_results", "read_results", "figure_path",
    "markdown_table", "build_report",
    # exploring: what the teachers know and a finished run's results (the explorers of mcmi_lab.explorers.widgets draw these)
    "ExploreData", "prepare_explore", "select_images", "teacher_figure", "concentration_figure", "load_run_results",
    "results_table", "results_figure",
    # headless runs (papermill): the notebooks' parameters and the named pipelines (mcmi_lab.cli.commands.run_pipeline)
    "PARAMETERS", "PIPELINES", "TEACHERS", "omit_sets",
]
