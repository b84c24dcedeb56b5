"""`mcmi-lab run --executor slurm`: every (seed, notebook) of a study a SLURM job, submitted through submitit.

A seed's notebooks that read its teachers wait on its 01_teachers job (``--dependency=afterok``; SLURM cancels them
when it fails, ``--kill-on-invalid-dep=yes``). Everything a job leaves is in the run folder::

    <out>/slurm/jobs.json                "seed_<n>/<notebook>" -> the SLURM job that runs it (job_id, log, submitted)
    <out>/slurm/<job id>_0_log.out       the job's log (stdout and stderr)
    <out>/slurm/<job id>_0_result.pkl    submitit's outcome: ("success", seconds) or ("error", traceback)

so the run folder must sit on a file system every node sees. A job's state is read from ``squeue`` while SLURM
holds it and from its outcome file afterwards: no accounting (``sacct``) is needed. A job that ended without an
outcome was stopped by SLURM (scancel, time limit, preemption, a node failure): rerunning the same command runs
again every notebook that has not finished (runs.completed). The jobs run this Python (sys.executable) with the
submitting environment (sbatch exports it), so they import the same mcmi_lab.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..study.pipelines import notebook_needs
from ..report.build import build_report
from ..study.runs import (completed, hold_run_folder, merge_results, now, read_run_info, seed_dir, slurm_queue,
                          write_run_info)
from ..utils import write_json

LOGS = "slurm"
JOBS = "jobs.json"
#: seconds between two looks at the queue while the command waits
POLL_S = 5.0
#: the task key of the job that merges the results and writes the report of a detached study
REPORT = "report"

Task = tuple[int, str]


class JobFailed(RuntimeError):
    """A SLURM job of a study failed or was stopped: the message names seed, notebook, cell, error, job id and log."""


class JobStopped(BaseException):
    """SLURM signalled the job (scancel, time limit, preemption): not an Exception, so that no handler on the way
    mistakes it for the notebook's own error; submitit then writes no outcome and the job reads as stopped."""


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how the jobs run: sbatch's --partition, --gpus-per-node, --cpus-per-task, --mem (SLURM syntax,
    e.g. "16G"), --time (minutes, or [D-]HH:MM[:SS]), other sbatch options (name -> value, "" for a bare flag),
    and whether the command returns once everything is submitted."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem: str | None = None
    time: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    detach: bool = False

    def __post_init__(self):
        for name in ("gpus_per_job", "cpus_per_job"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or (value == 0 and name == "cpus_per_job")):
                raise ValueError(f"--{name.replace('_', '-')}={value!r} is not accepted: expected an integer >= "
                                 f"{0 if name == 'gpus_per_job' else 1}")
        if self.time is not None:
            time_minutes(self.time)
        for key, _ in self.options:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or key in ("dependency", "output", "error", "job-name"):
                raise ValueError(f"--slurm-option {key!r} is not accepted: expected an sbatch option name without "
                                 "dashes (e.g. account=proj, qos=high, constraint=a100); dependency, output, error "
                                 "and job-name are set by mcmi-lab")

    def check_available(self) -> None:
        """sbatch on PATH and submitit installed, or one line saying what to do."""
        if shutil.which("sbatch") is None:
            raise ValueError("--executor slurm needs SLURM's sbatch on PATH: run mcmi-lab on the cluster's login node")
        if importlib.util.find_spec("submitit") is None:
            raise ValueError("--executor slurm needs submitit: pip install 'mcmi_lab[slurm]' (or pip install submitit)")

    def parameters(self) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters of every job (without its name and dependency)."""
        params = {"partition": self.partition, "cpus_per_task": self.cpus_per_job, "mem": self.mem,
                  "gpus_per_node": self.gpus_per_job or None, "stderr_to_stdout": True}
        # time None: no --time line, the partition's limit (submitit's own default would be 5 minutes)
        return {**{k: v for k, v in params.items() if v is not None},
                "time": None if self.time is None else time_minutes(self.time)}

    def sbatch_options(self) -> dict[str, Any]:
        return {key: value if value != "" else True for key, value in self.options}

    def describe(self) -> dict[str, Any]:
        return {"executor": "slurm", **{k: v for k, v in asdict(self).items() if k != "options"},
                "sbatch_options": dict(self.options)}


def time_minutes(text: str | int) -> int:
    """A SLURM time limit in whole minutes (rounded up): "90", "1:30:00", "2-00", "2-12:00", "2-12:00:00"."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ValueError(f"--time={text!r} is not accepted: expected minutes or [D-]HH:MM[:SS], e.g. 240 or 4:00:00")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"--time={text!r} is not accepted: expected a time limit above zero")
    return -(-seconds // 60)


# ---- in the job -------------------------------------------------------------------------------------------------

def _stop(signum, frame):
    raise JobStopped(f"SLURM sent {signal.Signals(signum).name}")


def run_job(execute: str, name: str, run_dir: str, parameters: Mapping, environment: Mapping[str, str]) -> float:
    """In the SLURM job: run notebook `name` into `run_dir` with `execute` ("module:function", imported here: a
    function of a command run as ``python -m`` would be pickled by value, cut from its module); returns seconds.

    environment: variables the notebooks need (where they are); the kernels get OMP_NUM_THREADS = the job's cores
    unless it was set. SIGTERM (scancel, the time limit) and SIGUSR2 (submitit's early warning) stop the job."""
    os.environ.update(environment)
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, _stop)
    module, _, function = execute.partition(":")
    start = time.perf_counter()
    getattr(importlib.import_module(module), function)(name, run_dir, dict(parameters))
    return round(time.perf_counter() - start, 1)


def finish_study(out: str) -> None:
    """In the last job of a detached study: the timings, results.json, the report, and run.json says finished."""
    info = read_run_info(out)
    for key, record in _read_jobs(Path(out)).items():
        outcome = _outcome(Path(out), record["job_id"])
        if key != REPORT and outcome and outcome[0] == "success":
            info.setdefault("timings_s", {})[key] = outcome[1]
    info.update(status="finished", finished=now())
    write_run_info(out, info)
    merge_results(out)
    build_report(out)


# ---- submitting -------------------------------------------------------------------------------------------------

def submit_study(out: Path, tasks: Sequence[Task], parameters: Mapping, options: SlurmOptions, execute: str,
                 environment: Mapping[str, str]) -> dict[str, dict]:
    """Submit one job per (seed, notebook) of `tasks` (in start order: a seed's 01_teachers before what needs it),
    and with ``options.detach`` a last job that writes the report once they all succeeded. Records every job in
    ``<out>/slurm/jobs.json`` and in the run folder's lock (the jobs hold the folder). Returns task key -> record."""
    import submitit  # an optional package: the `slurm` extra

    folder = out / LOGS
    executor = submitit.SlurmExecutor(folder=folder)
    records = _read_jobs(out)
    submitted: dict[Task, str] = {}

    def submit(key: str, needs: list[str], fn: Callable, *args) -> str:
        extra = options.sbatch_options()
        if needs:
            extra.update({"dependency": "afterok:" + ":".join(needs), "kill-on-invalid-dep": "yes"})
        executor.update_parameters(job_name=f"mcmi-{key.replace('/', '-')}", additional_parameters=extra,
                                   **options.parameters())
        try:
            job = executor.submit(fn, *args)
        except Exception as err:  # sbatch refused it (a partition, a time limit): one line, naming the job
            raise ValueError(f"SLURM refused the job of {key}: {_last_line(str(err))}") from None
        records[key] = {"job_id": job.job_id, "log": str(job.paths.stdout), "submitted": now()}
        write_json(folder / JOBS, records)
        hold_run_folder(out, [job.job_id])
        return job.job_id

    for seed, name in tasks:
        needs = [submitted[(seed, need)] for need in notebook_needs(name) if (seed, need) in submitted]
        submitted[(seed, name)] = submit(task_key(seed, name), needs, run_job, execute, name,
                                         str(seed_dir(out, seed)), {**parameters, "seed": seed}, dict(environment))
    if options.detach and submitted:
        submit(REPORT, list(submitted.values()), finish_study, str(out))
    return records


def task_key(seed: int, name: str) -> str:
    return f"seed_{seed}/{name}"


def _read_jobs(out: Path) -> dict[str, dict]:
    path = out / LOGS / JOBS
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- states -----------------------------------------------------------------------------------------------------

def _outcome(out: Path, job_id: str) -> tuple[str, Any] | None:
    """submitit's outcome of a job: ("success", value) / ("error", traceback), or None when it wrote none."""
    path = out / LOGS / f"{job_id}_0_result.pkl"
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _error_line(traceback: str) -> str:
    """The one line of a job's error: the notebook's own message (cli.NotebookError), else 'Type: message'."""
    line = _last_line(traceback)
    kind, _, message = line.partition(": ")
    kind = kind.rsplit(".", 1)[-1]
    return message if kind == "NotebookError" else f"{kind}: {message}" if message else kind


def job_state(out: Path, job_id: str, queue: Mapping[str, str]) -> tuple[str, Any]:
    """("pending" | "running", squeue state), ("done", seconds), ("failed", one line) or ("stopped", None).

    `queue` must be read before the outcome file: a job gone from it has written whatever it writes."""
    if job_id in queue:
        return ("pending" if queue[job_id] == "PENDING" else "running"), queue[job_id]
    outcome = _outcome(out, job_id)
    if outcome is None:
        return "stopped", None
    kind, value = outcome
    if kind == "success":
        return "done", value
    return "failed", _error_line(value)


def failure_message(key: str, record: Mapping, state: str, detail: str | None) -> str:
    """The one line naming seed, notebook, (cell and error), the SLURM job id and its log."""
    seed, _, name = key.partition("/")
    where = f"{seed.replace('_', ' ')}, {name}" if name else key
    if state == "failed":
        return f"{where}: {detail} (SLURM job {record['job_id']}, log {record['log']})"
    return (f"{where}: SLURM job {record['job_id']} ended before the notebook finished (scancel, time limit, "
            f"preemption or a node failure; log {record['log']}): rerun the same command to resume")


def wait_for_jobs(out: Path, records: Mapping[str, dict], keys: Sequence[str], echo: Callable[[str], None],
                  timings: dict, poll_s: float | None = None) -> None:
    """Wait until every job of `keys` has ended, echoing each as it ends; the timings of the finished ones go into
    `timings`. Raises :class:`JobFailed` with the first failure (a notebook's own error before a stop; jobs SLURM
    cancelled because a notebook they need failed are not the cause)."""
    pending, failures, warned = list(keys), [], False
    while pending:
        try:
            queue = slurm_queue()
        except OSError as err:  # slurmctld busy or restarting: look again
            if not warned:
                echo(f"  (SLURM does not answer: {err}; waiting)")
                warned = True
            time.sleep(POLL_S if poll_s is None else poll_s)
            continue
        for key in list(pending):
            state, detail = job_state(out, records[key]["job_id"], queue)
            if state in ("pending", "running"):
                continue
            pending.remove(key)
            seed, _, name = key.partition("/")
            if state == "done":
                timings[key] = detail
                echo(f"  {seed.replace('_', ' ')}  {name:<18} {detail:7.1f} s  (SLURM job {records[key]['job_id']})")
            else:
                failures.append((key, state, detail))
                echo(f"  {seed.replace('_', ' ')}  {name:<18} {state} (SLURM job {records[key]['job_id']}, "
                     f"log {records[key]['log']})")
        if pending:
            time.sleep(POLL_S if poll_s is None else poll_s)
    if failures:
        failed = {key for key, _, _ in failures}
        causes = [f for f in failures if not any(task_key(int(f[0].split("/")[0][5:]), need) in failed
                                                 for need in notebook_needs(f[0].split("/")[1]))]
        key, state, detail = min(causes or failures, key=lambda f: f[1] != "failed")
        more = len(failures) - 1
        raise JobFailed(failure_message(key, records[key], state, detail)
                        + (f" [and {more} more: mcmi-lab status {out}]" if more else ""))


def cancel_jobs(records: Mapping[str, dict], keys: Sequence[str]) -> None:
    """scancel the jobs of `keys` (those that have ended are ignored by SLURM)."""
    ids = [records[key]["job_id"] for key in keys if key in records]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def run_study(out: Path, tasks: Sequence[Task], parameters: Mapping, options: SlurmOptions, execute: str,
              environment: Mapping[str, str], echo: Callable[[str], None], timings: dict) -> bool:
    """Submit `tasks` as SLURM jobs; unless detached, wait for them (interrupted: they are cancelled). Returns True
    when the study ran to the end here, False when it was only submitted (``options.detach``)."""
    records = submit_study(out, tasks, parameters, options, execute, environment)
    keys = [task_key(seed, name) for seed, name in tasks]
    for key in keys + ([REPORT] if options.detach and keys else []):
        echo(f"  {key:<29} submitted as SLURM job {records[key]['job_id']}")
    if options.detach:
        if keys:
            echo(f"mcmi-lab: submitted; `mcmi-lab status {out}` says what is done, the report is written when all "
                 f"have finished (logs in {out / LOGS})")
        return not keys
    try:
        wait_for_jobs(out, records, keys, echo, timings)
    except KeyboardInterrupt:
        cancel_jobs(records, keys)
        echo(f"mcmi-lab: interrupted; the study's SLURM jobs were cancelled (rerun the same command to resume)")
        raise
    return True


# ---- the command line ---------------------------------------------------------------------------------------

def add_slurm_arguments(run: argparse.ArgumentParser) -> None:
    """The options of `mcmi-lab run` that send the notebooks to SLURM."""
    slurm = run.add_argument_group("SLURM (--executor slurm: every seed's notebook a job; --out on a file system "
                                   "every node sees)")
    slurm.add_argument("--executor", choices=("local", "slurm"), default="local", help="where the notebooks run "
                       "(default: local, this machine)")
    slurm.add_argument("--partition", help="sbatch --partition")
    slurm.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs of each job (sbatch --gpus-per-node)")
    slurm.add_argument("--cpus-per-job", type=int, metavar="N", help="cores of each job (sbatch --cpus-per-task; "
                       "the kernel's threads)")
    slurm.add_argument("--mem", help="memory of each job, SLURM syntax (sbatch --mem, e.g. 16G)")
    slurm.add_argument("--time", help="time limit of each job: minutes or [D-]HH:MM[:SS] (sbatch --time)")
    slurm.add_argument("--slurm-option", action="append", metavar="KEY=VALUE", help="another sbatch option, e.g. "
                       "account=proj or qos=high (repeatable; KEY alone for a flag)")
    slurm.add_argument("--detach", action="store_true", help="return once the jobs are submitted (a last job "
                       "writes the report; `mcmi-lab status DIR` says what is done)")


def slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """--executor slurm and its options (refused, in one line, with the local executor)."""
    given = [f"--{k.replace('_', '-')}" for k in ("partition", "gpus_per_job", "cpus_per_job", "mem", "time",
                                                 "slurm_option", "detach") if getattr(args, k) not in (None, False)]
    if args.executor == "local":
        if given:
            raise ValueError(f"{given[0]} is not accepted with --executor local: it is an option of --executor slurm")
        return None
    options = []
    for item in args.slurm_option or []:
        key, _, value = item.partition("=")
        options.append((key.strip().lstrip("-"), value.strip()))
    return SlurmOptions(args.partition, args.gpus_per_job or 0, args.cpus_per_job, args.mem, args.time,
                        tuple(options), args.detach)


# ---- mcmi-lab status --------------------------------------------------------------------------------------------

def study_status(out: str | os.PathLike) -> list[str]:
    """Lines saying, for every seed and notebook of the run in `out`, whether it is done, pending, running, failed
    (with its one-line error) or stopped, with its SLURM job and log; the last line counts them. squeue is asked
    only when a job has not finished."""
    out = Path(out).resolve()
    info = read_run_info(out)
    if not info:
        raise FileNotFoundError(f"{out} holds no run (no run.json): expected a folder written by mcmi-lab run")
    records, params, timings = _read_jobs(out), info.get("parameters", {}), info.get("timings_s", {})
    rows = [(seed, name, completed(seed_dir(out, seed), name, {**params, "seed": seed}))
            for seed in info.get("seeds", []) for name in info.get("notebooks", [])]
    open_jobs = [task_key(seed, name) for seed, name, done in rows if not done and task_key(seed, name) in records]
    if info.get("status") != "finished" and REPORT in records:
        open_jobs.append(REPORT)
    queue, note = {}, None
    try:
        queue = slurm_queue() if open_jobs else {}
    except OSError as err:
        queue, note = None, f"  (SLURM does not answer: {err}; the states of unfinished jobs are unknown)"
    lines = [f"run folder {out}: pipeline {info.get('pipeline')!r}, seeds {info.get('seeds')}, status "
             f"{info.get('status')}"]
    counts: dict[str, int] = {}
    for seed, name, done in rows:
        key = task_key(seed, name)
        if done:
            state, text = "done", "done" + (f" ({timings[key]} s)" if key in timings else "")
        elif key not in open_jobs:
            state = text = "not run"
        else:
            state, text = _job_text(out, key, records[key], queue)
        counts[state] = counts.get(state, 0) + 1
        lines.append(f"  seed {seed}  {name:<18} {text}")
    if REPORT in open_jobs:
        lines.append(f"  {'report':<25} {_job_text(out, REPORT, records[REPORT], queue)[1]}")
    lines += [note] if note else []
    return lines + [", ".join(f"{n} {state}" for state, n in counts.items())]


def _job_text(out: Path, key: str, record: Mapping, queue: Mapping[str, str] | None) -> tuple[str, str]:
    """(state, what the status line says) of the job of an unfinished notebook (or of the report)."""
    if queue is None:
        return "unknown", f"unknown (SLURM job {record['job_id']}, log {record['log']})"
    state, detail = job_state(out, record["job_id"], queue)
    if state == "done" and key != REPORT:  # the job ended well, yet the results are missing or other parameters'
        state, detail = "failed", "the job ended without the notebook's results"
    if state in ("failed", "stopped"):
        return state, f"{state}: {failure_message(key, record, state, detail)}"
    return state, f"{state} (SLURM job {record['job_id']}, log {record['log']})"
