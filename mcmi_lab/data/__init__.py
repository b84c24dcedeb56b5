"""Data as tensors: the container and its views, the data-set registry, the user's own files, the synthetic task with a known posterior."""
# `mcmi_lab.data` was one module; its public names stay importable from here
from .core import (  # noqa: F401
    SPLITS, ImageData, from_tensors, from_dataset, few_shot, omit_classes, subset, stratified_split, augment_batch,
    epoch_generator, batches, stacked_batches_problem, stacked_batches,
)
