"""Experiment tracking: a ``fit`` callback that writes every epoch's record to TensorBoard.

``fit(..., tensorboard="runs/t/tensorboard")`` (a :class:`~mcmi_lab.training.loop.TrainConfig` field; the notebooks'
``tensorboard`` parameter sets it to ``run_dir/tensorboard``) gives each training run its own TensorBoard run,
named by what it trains (``teacher_cnn_small``, ``mcmi_λ=0.5``, ``student_kd_mcmi``); ``tensorboard --logdir runs/``
then shows every run, seed and notebook side by side. It needs the optional ``tensorboard`` package
(``pip install 'mcmi_lab[tensorboard]'``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch.nn as nn

__all__ = ["TensorBoardLogger", "run_folder"]

#: Keys of a fit record that are not scalars over epochs.
_NOT_SCALARS = ("epoch",)


def run_folder(log_dir: str | os.PathLike, name: str) -> Path:
    """A new folder under `log_dir` for one training run: `name` with path-unsafe characters replaced by "_", and
    "-2", "-3", ... appended when a run of that name is already there (three seeds of one student stay apart)."""
    stem = re.sub(r"[^\w.=+-]+", "_", name).strip("_") or "run"
    root = Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        folder = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            folder.mkdir()  # atomic: two processes never get the same folder
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"tensorboard={str(log_dir)!r}: 9,999 runs named {stem!r} already there; use another folder")


class TensorBoardLogger:
    """``fit`` callback: each numeric value of the epoch record (loss terms, accuracies, CMI, λ, lr, time) as a
    TensorBoard scalar at step = epoch. Written and flushed every epoch, so a killed run keeps what it logged."""

    def __init__(self, log_dir: str | os.PathLike, name: str = ""):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(f"tensorboard={str(log_dir)!r} needs the tensorboard package: pip install "
                              "'mcmi_lab[tensorboard]' (or pip install tensorboard), or leave tensorboard unset") from None
        self.folder = run_folder(log_dir, name)
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def __call__(self, record: Mapping, model: nn.Module | None = None) -> None:
        step = int(record["epoch"])
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
