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

import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..training.checkpoint import load_checkpoint, load_model, save_model
from ..data.registry import data_fingerprint
from ..models.wrappers import TemperatureScaled
from ..utils import get_device, write_json

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
    """Write a notebook's results (JSON-ready values, tensors allowed) with when, where and with what they were made
    (``meta.data``: the data set's fingerprint, :func:`mcmi_lab.data.registry.data_fingerprint`, when it names one)."""
    meta = {"notebook": notebook, "finished": now(), "device": describe_device((parameters or {}).get("device"))}
    if parameters is not None:
        meta["parameters"] = dict(parameters)
        if "dataset" in parameters:
            meta["data"] = data_fingerprint(parameters["dataset"])
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
    """The seed folders of a run, by seed, in seed order: those of the seeds run.json names (a ``seed_7`` folder it
    does not name is not part of the run); without run.json every folder named exactly ``seed_<n>`` (not seed_00)."""
    info = read_run_info(out)
    if "seeds" in info:
        return {s: seed_dir(out, s) for s in sorted(info["seeds"]) if seed_dir(out, s).is_dir()}
    found = {}
    for path in Path(out).glob(f"{SEED_PREFIX}*"):
        suffix = path.name[len(SEED_PREFIX):]
        if path.is_dir() and suffix.isdigit() and path.name == seed_dir(out, int(suffix)).name:
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def write_run_info(out: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    return write_json(Path(out) / RUN_INFO, dict(info))


#: What run.json's entries must be (mcmi-lab run writes them so): key -> (check, in words).
_RUN_INFO_TYPES = {
    "pipeline": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "notebooks": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of notebook names"),
    "seeds": (lambda v: isinstance(v, list) and all(type(n) is int and n >= 0 for n in v), "a list of integers >= 0"),
    "parameters": (lambda v: isinstance(v, dict), "an object of parameters"),
    "timings_s": (lambda v: isinstance(v, dict), "an object of timings"),
    "data": (lambda v: isinstance(v, dict), "an object (the data's fingerprint)"),
    **{key: (lambda v: isinstance(v, str), "a string") for key in ("device", "started", "finished", "status")},
    "wall_time_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number of seconds"),
}


def read_run_info(out: str | os.PathLike) -> dict[str, Any]:
    """run.json of a run folder ({} when there is none); one line naming the file and the entry when an entry is not
    of the type mcmi-lab run writes."""
    path = Path(out) / RUN_INFO
    if not path.is_file():
        return {}
    info = _read_json_object(path, repr(str(path)), "remove it, or run into a fresh --out",
                             "the JSON object mcmi-lab run writes")
    for key, (ok, words) in _RUN_INFO_TYPES.items():
        if key in info and not ok(info[key]):
            raise ValueError(f"{str(path)!r}: {key!r} holds a {type(info[key]).__name__} that is not accepted: "
                             f"expected {words}, as mcmi-lab run writes it (fix or remove the file, or use a fresh "
                             "--out)")
    return info


def collect_results(out: str | os.PathLike) -> dict[str, Any]:
    """Merge a run: ``{"run": run.json, "seeds": {"0": {notebook: results}, ...}}`` from every seed folder."""
    seeds = {}
    for seed, path in seed_dirs(out).items():
        files = sorted((path / "results").glob("*.json"))
        seeds[str(seed)] = {f.stem: _read_result_file(f) for f in files}
    return {"run": read_run_info(out), "seeds": seeds}


#: The tables of the results files: each a list of row objects (what the report reads).
RESULT_TABLES = ("teachers", "students", "few_shot", "zero_shot", "known_bcpd", "dose_response", "cam")


def _read_json_object(path: Path, label: str, remedy: str, expected: str) -> dict[str, Any]:
    """A JSON object from `path`, or one line naming the file (`label`), what is wrong and what to do."""
    try:
        obj = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{label} is not valid JSON ({err}): {remedy}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{label} holds a {type(obj).__name__}: expected {expected}")
    return obj


def _read_result_file(path: Path) -> dict[str, Any]:
    """One results file, or one line naming it when it is not the JSON a notebook writes."""
    result = _read_json_object(path, f"results file {str(path)!r}", "rerun its notebook, or remove the file",
                               "a JSON object as a notebook writes it (write_results)")
    for key in RESULT_TABLES:
        rows = result.get(key)
        if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
            raise ValueError(f"results file {str(path)!r}: {key!r} is not accepted: expected a list of row objects, "
                             f"got {type(rows).__name__}")
    return result


def merge_results(out: str | os.PathLike) -> Path:
    """Write ``results.json`` of a run from its seed folders (see :func:`collect_results`)."""
    return write_json(Path(out) / RESULTS, collect_results(out))


# ---- one run folder, one configuration ------------------------------------------------------------------------------

LOCK = ".run.lock"
#: Parameters that do not change what a run computes (where it writes, whether it shows widgets).
FREE_PARAMETERS = ("run_dir", "seed", "interactive")


def parameter_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"lam 0.5 -> 0.9"`` for every parameter both name with different values (FREE_PARAMETERS aside)."""
    return [f"{k} {recorded[k]!r} -> {wanted[k]!r}" for k in wanted
            if k in recorded and k not in FREE_PARAMETERS and recorded[k] != wanted[k]]


def data_differences(recorded: Mapping[str, Any] | None, data: Mapping[str, Any] | None) -> list[str]:
    """``"the data at m.npz changed (1,234 -> 1,240 bytes, blake2b 1a2b3c4d -> 5e6f7a8b)"`` when both fingerprints
    (:func:`mcmi_lab.data.registry.data_fingerprint`) name the same data set and differ."""
    if not recorded or not data or recorded == data or recorded.get("dataset") != data.get("dataset"):
        return []  # another dataset is a parameter difference, named there
    size = f"{recorded.get('bytes', '?'):,} -> {data.get('bytes', '?'):,} bytes" if isinstance(
        recorded.get("bytes"), int) and isinstance(data.get("bytes"), int) else "size unknown"
    return [f"the data at {data['dataset']} changed ({size}, blake2b {str(recorded.get('blake2b'))[:8]} -> "
            f"{str(data.get('blake2b'))[:8]})"]


def check_run_folder(out: str | os.PathLike, pipeline: str, parameters: Mapping[str, Any],
                     data: Mapping[str, Any] | None = None) -> None:
    """A run folder holds one configuration: refuse (one line, naming the differences) to run `pipeline` with
    `parameters` on `data` (its fingerprint) into a folder whose run.json records another pipeline, other
    parameters or other contents of the same data files."""
    info = read_run_info(out)
    if not info.get("parameters"):
        return
    diff = ([f"pipeline {info.get('pipeline')!r} -> {pipeline!r}"] if info.get("pipeline") not in (None, pipeline)
            else []) + parameter_differences(info["parameters"], parameters) + data_differences(info.get("data"), data)
    if diff:
        raise ValueError(f"run folder {str(out)!r} holds a run with other settings ({'; '.join(diff)}): use another "
                         "--out, or --force to replace that run's results")


def clear_run_folder(out: str | os.PathLike) -> None:
    """What --force replaces: the seed folders, run.json, results.json and the report of an earlier run."""
    out = Path(out)
    for path in seed_dirs(out).values():
        shutil.rmtree(path)
    for name in (RUN_INFO, RESULTS, "report.md", "report.html"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "figures", ignore_errors=True)


def completed(run_dir: str | os.PathLike, notebook: str, parameters: Mapping[str, Any],
              data: Mapping[str, Any] | None = None) -> bool:
    """True when `notebook` already left its results in `run_dir`, made with `parameters` and, when `data` (a
    fingerprint) is given, on that data (a path data set's results that recorded none are redone)."""
    path = results_path(run_dir, notebook)
    try:
        meta = json.loads(path.read_text()).get("meta", {})
        recorded = meta.get("parameters")
    except (OSError, ValueError, AttributeError):
        return False
    same_data = data is None or meta.get("data") == data or ("data" not in meta and "blake2b" not in data)
    return isinstance(recorded, dict) and recorded.get("seed") == parameters.get("seed") \
        and not parameter_differences(recorded, parameters) and same_data


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux's /proc/<pid>/stat field 22); None elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _lock_holder(text: str) -> tuple[int, str | None, str | None]:
    """(pid, start, host) of a lock's first line: ``<pid> start=<ticks> host=<name> <time>`` (older locks: the pid
    and the time only)."""
    fields = text.split()
    pid = int(fields[0])
    extra = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    return pid, extra.get("start"), extra.get("host")


@contextlib.contextmanager
def run_folder_lock(out: str | os.PathLike) -> Iterator[None]:
    """Only one `mcmi-lab run` writes a run folder at a time: ``<out>/.run.lock`` holds the writer's pid, its start
    time and the host, and the ids of the SLURM jobs it submitted (:func:`hold_run_folder`), which hold the folder
    after the command has ended (``--detach``, or killed) while SLURM still runs them. A lock left by a process that
    no longer exists (killed), or whose pid now belongs to a process started later (the pid reused), and whose jobs
    have all ended, is taken over. A refusal says how to clear a lock left behind."""
    path = Path(out) / LOCK
    host = platform.node()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            text = ""
            try:
                text = path.read_text()
                pid, start, holder_host = _lock_holder(text)
                if holder_host in (None, host):
                    os.kill(pid, 0)
                    if start is not None and _process_start(pid) not in (None, start):
                        raise ProcessLookupError  # the pid was reused by another process
            except (OSError, ValueError, IndexError):  # gone, reused, or an unreadable lock: stale unless its jobs run
                jobs = live_slurm_jobs(_lock_jobs(text), f"run folder {str(out)!r}")
                if jobs:
                    raise ValueError(f"run folder {str(out)!r} is being written by SLURM jobs {', '.join(jobs)} of an "
                                     f"earlier mcmi-lab run: wait for them (mcmi-lab status {out}), scancel them, or "
                                     "use another --out") from None
                path.unlink(missing_ok=True)
                continue
            where = f" on {holder_host}" if holder_host not in (None, host) else ""
            raise ValueError(f"run folder {str(out)!r} is being written by another mcmi-lab run (pid {pid}{where}): "
                             f"wait for it to finish, or use another --out; if no mcmi-lab run is writing it, remove "
                             f"{path}") from None
    else:
        raise ValueError(f"run folder {str(out)!r} could not be locked ({path}): remove that file if no run is using it")
    try:
        start = _process_start(os.getpid())
        os.write(fd, f"{os.getpid()}{f' start={start}' if start else ''} host={host} {now()}\n".encode())
        os.close(fd)
        yield
    finally:
        try:  # jobs SLURM still runs keep the folder theirs (and those squeue cannot tell about)
            jobs = _lock_jobs(path.read_text())
        except OSError:
            jobs = []
        try:
            keep = live_slurm_jobs(jobs)
        except ValueError:
            keep = jobs
        if not keep:
            path.unlink(missing_ok=True)
        else:  # this process lets go (--detach): from now on the jobs alone hold the folder
            path.write_text(f"- {now()}\nslurm {' '.join(keep)}\n")


def hold_run_folder(out: str | os.PathLike, job_ids: Iterable[str]) -> None:
    """Record SLURM jobs in the lock of a run folder this process holds (see :func:`run_folder_lock`)."""
    with open(Path(out) / LOCK, "a") as lock:
        lock.write(f"slurm {' '.join(job_ids)}\n")


def _lock_jobs(text: str) -> list[str]:
    return [job for line in text.splitlines() if line.startswith("slurm ") for job in line.split()[1:]]


#: squeue states of a job that may still write (anything else has ended)
LIVE_JOB_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                   "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")


def slurm_queue() -> dict[str, str]:
    """This user's SLURM jobs that have not ended, job id -> state, from ``squeue``; OSError when it cannot answer."""
    try:
        done = subprocess.run(["squeue", "--me", "--noheader", "--format=%i %T"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OSError(f"squeue did not answer ({err})") from None
    if done.returncode != 0:
        raise OSError(f"squeue failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
    pairs = (line.split() for line in done.stdout.splitlines() if line.strip())
    return {job: state for job, state in pairs if state in LIVE_JOB_STATES}


def live_slurm_jobs(job_ids: Iterable[str], where: str = "the run folder") -> list[str]:
    """Those of `job_ids` that SLURM has not ended; a ValueError naming `where` when squeue cannot tell."""
    job_ids = list(job_ids)
    if not job_ids:
        return []
    try:
        queue = slurm_queue()
    except OSError as err:
        raise ValueError(f"{where} is held by SLURM jobs {', '.join(job_ids)} and {err}: run where SLURM answers, "
                         f"or remove its {LOCK} if none of them runs") from None
    return [job for job in job_ids if job in queue]
