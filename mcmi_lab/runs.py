"""Run folders: where notebooks leave their artifacts and where the next notebook and the report find them.

One seed of a run is a folder (a notebook's ``run_dir``)::

    <run_dir>/checkpoints/teacher_<name>.pt      save_teacher / load_teacher (plain-data checkpoints)
    <run_dir>/results/<notebook>.json            write_results / read_results
    <run_dir>/figures/<notebook>/<name>.png      figure_path
    <run_dir>/notebooks/<notebook>.ipynb         the executed notebook (written by mcmi-lab run)

A run of several seeds (``mcmi-lab run``) holds one such folder per seed, ``seed_<n>/``, next to ``run.json`` (what
was run), the merged ``results.json`` and the report. Notebooks hand over artifacts, never kernel state.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_model, save_model
from .models.wrappers import TemperatureScaled
from .utils import get_device, write_json

RUN_INFO = "run.json"
RESULTS = "results.json"
SEED_PREFIX = "seed_"
#: Which notebook writes the teachers: named in the error when one is missing.
TEACHER_NOTEBOOK = "01_teachers"


def now() -> str:
    """The local time as ISO 8601 with the UTC offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def describe_device(device: str | torch.device | None = None) -> str:
    """"cuda (NVIDIA H100 ...)" / "cpu (x86_64, 2 threads)": what the numbers were computed on."""
    dev = get_device(device)
    if dev.type == "cuda":
        try:
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        except (RuntimeError, AssertionError) as err:  # named but not there: say so, the run fails where it is used
            return f"{dev} (unavailable: {str(err).splitlines()[0]})"
    return f"{dev.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


# ---- teachers ---------------------------------------------------------------------------------------------------

def teacher_path(run_dir: str | os.PathLike, name: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"teacher_{name}.pt"


def save_teacher(run_dir: str | os.PathLike, name: str, model: nn.Module, **extra: Any) -> Path:
    """Save a teacher under `run_dir`. A temperature-scaled model (``models.wrappers.TemperatureScaled``) is stored as its
    base model plus ``temperature``, so :func:`load_teacher` rebuilds it from plain data."""
    if isinstance(model, TemperatureScaled):
        return save_model(teacher_path(run_dir, name), model.model, temperature=float(model.temperature), **extra)
    return save_model(teacher_path(run_dir, name), model, **extra)


def load_teacher(run_dir: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """A teacher saved by :func:`save_teacher`, in eval mode; a clear error naming the notebook to run if missing."""
    path = teacher_path(run_dir, name)
    if not path.is_file():
        raise FileNotFoundError(f"teacher {name!r} is missing ({path}): run notebooks/{TEACHER_NOTEBOOK}.ipynb with "
                                f"run_dir={str(run_dir)!r} first (`mcmi-lab run` runs the notebooks in order)")
    model = load_model(path, device)
    temperature = load_checkpoint(path).get("temperature")
    if temperature is not None:
        model = TemperatureScaled(model, temperature).to(device)
    return model.eval()


def load_teachers(run_dir: str | os.PathLike, names: Iterable[str], device: str | torch.device = "cpu"
                  ) -> dict[str, nn.Module]:
    return {name: load_teacher(run_dir, name, device) for name in names}


# ---- results and figures ----------------------------------------------------------------------------------------

def results_path(run_dir: str | os.PathLike, notebook: str) -> Path:
    return Path(run_dir) / "results" / f"{notebook}.json"


def write_results(run_dir: str | os.PathLike, notebook: str, results: Mapping[str, Any],
                  parameters: Mapping[str, Any] | None = None) -> Path:
    """Write a notebook's results (JSON-ready values, tensors allowed) with when, where and with what they were made."""
    meta = {"notebook": notebook, "finished": now(), "device": describe_device((parameters or {}).get("device"))}
    if parameters is not None:
        meta["parameters"] = dict(parameters)
    return write_json(results_path(run_dir, notebook), {"meta": meta, **results})


def read_results(run_dir: str | os.PathLike, notebook: str) -> dict[str, Any]:
    path = results_path(run_dir, notebook)
    if not path.is_file():
        raise FileNotFoundError(f"results of {notebook} are missing ({path}): run notebooks/{notebook}.ipynb with "
                                f"run_dir={str(run_dir)!r} first")
    return json.loads(path.read_text())


def figure_path(run_dir: str | os.PathLike, notebook: str, name: str) -> Path:
    """Where a notebook's figure goes: ``<run_dir>/figures/<notebook>/<name>.png`` (the folder is created)."""
    path = Path(run_dir) / "figures" / notebook / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---- a run of several seeds ---------------------------------------------------------------------------------------

def seed_dir(out: str | os.PathLike, seed: int) -> Path:
    return Path(out) / f"{SEED_PREFIX}{seed}"


def seed_dirs(out: str | os.PathLike) -> dict[int, Path]:
    """The seed folders of a run, by seed, in seed order."""
    found = {}
    for path in Path(out).glob(f"{SEED_PREFIX}*"):
        suffix = path.name[len(SEED_PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def write_run_info(out: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    return write_json(Path(out) / RUN_INFO, dict(info))


def read_run_info(out: str | os.PathLike) -> dict[str, Any]:
    path = Path(out) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_results(out: str | os.PathLike) -> dict[str, Any]:
    """Merge a run: ``{"run": run.json, "seeds": {"0": {notebook: results}, ...}}`` from every seed folder."""
    seeds = {}
    for seed, path in seed_dirs(out).items():
        files = sorted((path / "results").glob("*.json"))
        seeds[str(seed)] = {f.stem: json.loads(f.read_text()) for f in files}
    return {"run": read_run_info(out), "seeds": seeds}


def merge_results(out: str | os.PathLike) -> Path:
    """Write ``results.json`` of a run from its seed folders (see :func:`collect_results`)."""
    return write_json(Path(out) / RESULTS, collect_results(out))
