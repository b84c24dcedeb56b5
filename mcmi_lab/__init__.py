"""mcmi_lab: knowledge distillation with MCMI teachers.

Where things live: ``data`` (data sets as tensors, views, batches), ``models`` (zoo + ``build_model``),
``cmi`` (centroids, CMI, separation, NCMI, streaming meter), ``losses`` (MCMI and KD losses),
``train`` (``fit`` and its objectives), ``evaluate`` (``predict`` and metrics), ``recipes`` (teacher, MCMI
fine-tune, control), ``kd`` (the KD methods and ``distill``), ``cam`` (Eigen-CAM), ``plots``, ``runs``/``report``
(artifacts), ``cli`` (``mcmi-lab``).
"""
__version__ = "0.1.0"

from .data import (DATASETS, ImageData, batches, few_shot, from_dataset, from_tensors, load_dataset,
                   omit_classes, stratified_split, subset)
from .utils import get_device, set_seed

__all__ = [
    "__version__", "get_device", "set_seed",
    "DATASETS", "ImageData", "load_dataset", "from_tensors", "from_dataset", "few_shot", "omit_classes",
    "subset", "stratified_split", "batches",
]
