"""`mcmi-lab`: run the notebooks headlessly through papermill, get the data, rebuild a report.

    mcmi-lab run demo --out runs/demo [-p lam 0.25 -p fractions "[0.05, 1.0]"] [--seeds 0 1 2]
    mcmi-lab data
    mcmi-lab report runs/demo
    mcmi-lab run paper --out /shared/runs/paper --executor slurm --gpus-per-job 1 --time 12:00:00 [--detach]
    mcmi-lab status /shared/runs/paper
    mcmi-lab inspect runs/train/model.pt --data fashion-mnist [--json card.json]

`run` checks every parameter before any notebook starts, runs the pipeline's notebooks for each seed (each seed in
its own folder ``<out>/seed_<n>``, the executed notebooks kept there; several notebooks at once, each as soon as the
teachers it reads exist), merges the results into
``<out>/results.json`` and writes ``report.md`` / ``report.html``. A failing cell stops the run with the notebook,
the cell and the error named, and exit status 1; a bad parameter exits with status 2 before anything runs.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..data.registry import DATASETS, data_fingerprint, fashion_mnist_root
from .train import add_train_command
from ..training.objectives import StopTraining
from ..study.pipelines import (NOTEBOOKS, PARAMETERS, PIPELINES, START_ORDER, get_pipeline, notebook_needs, parse_value,
                               resolve_parameters)
from ..report.build import build_report
from ..study.report_card import format_card, inspect_checkpoint
from ..study.runs import (check_run_folder, clear_run_folder, completed, describe_device, merge_results, now, read_run_info,
                          run_folder_lock, seed_dir, write_run_info)
from .slurm import JobFailed, SlurmOptions, add_slurm_arguments, run_study, slurm_options, study_status
from ..utils import disk_full, write_json

#: Where the notebooks are: $MCMI_LAB_NOTEBOOKS, else ``notebooks/`` next to the package (a source checkout).
NOTEBOOKS_ENV = "MCMI_LAB_NOTEBOOKS"


class NotebookError(RuntimeError):
    """A notebook failed: the message names the notebook, the cell and the error."""


def notebooks_dir() -> Path:
    path = Path(os.environ.get(NOTEBOOKS_ENV) or Path(__file__).resolve().parents[2] / "notebooks").resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"the notebooks were not found at {path}: run from a source checkout of mcmi_lab or "
                                f"set ${NOTEBOOKS_ENV} to its notebooks/ folder")
    return path


def notebook_path(name: str) -> Path:
    path = notebooks_dir() / f"{name}.ipynb"
    if not path.is_file():
        known = sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))
        raise ValueError(f"notebook {name!r} is not known: expected one of {', '.join(known)}")
    return path


@functools.cache
def _headless_engine():
    """papermill's nbclient engine without nbclient's imitation of the Output widget's front end.

    That imitation answers every output drawn into an ``ipywidgets.Output`` with a message on the shell channel,
    sent while nbclient is awaiting the cell's reply on the same channel: a race that can leave a cell waiting
    forever on an idle kernel (jupyter/nbclient#312; it hung ``00_quickstart`` at its explorer cell in CI).
    Headless there is no one to see the widget: what it draws goes to the cell's outputs instead (and its
    ``clear_output`` clears the cell's).
    """
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, logger, papermill_engines

    class Client(PapermillNotebookClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.comm_open_handlers["jupyter.widget"] = lambda msg: None  # no imitation (None: no comm object)

    class Engine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            kwargs.pop("input_path", None)
            return Client(nb_man, kernel_name=kernel_name, timeout=execution_timeout, startup_timeout=start_timeout,
                          log=logger, log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file,
                          **kwargs).execute()

    papermill_engines.register(HEADLESS_ENGINE, Engine)
    return Engine


#: the papermill engine every notebook runs under (see :func:`_headless_engine`)
HEADLESS_ENGINE = "mcmi_lab_headless"


def execute_notebook(name: str, run_dir: str | os.PathLike, parameters: Mapping, kernel_name: str = "python3") -> Path:
    """Execute notebook `name` with papermill into ``<run_dir>/notebooks/<name>.ipynb``; returns that path.

    Only the parameters the notebook declares are injected (run_dir always, as an absolute path); the kernel runs
    in the notebooks folder, as in JupyterLab. Raises :class:`NotebookError` naming the cell when a cell fails.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    _headless_engine()

    source = notebook_path(name)
    declared = papermill.inspect_notebook(str(source))
    run_dir = Path(run_dir).resolve()
    inject = {k: v for k, v in parameters.items() if k in declared}
    inject["run_dir"] = str(run_dir)
    executed = run_dir / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    # papermill rewrites its output after every cell: it writes a hidden sibling, renamed over the executed notebook
    # once it stops (finished or failed), so a kill or a full disk never leaves a cut notebook under the real name
    partial = executed.with_name(f".{executed.name}.running")
    try:
        # the kernel's working directory through nbclient's resources, not papermill's cwd=, which chdirs this whole
        # process: with notebooks running in threads that moved the others' relative paths
        _start_again_if_the_kernel_never_answered(lambda: papermill.execute_notebook(
            str(source), str(partial), parameters=inject, kernel_name=kernel_name, progress_bar=False,
            resources={"metadata": {"path": str(source.parent)}}, engine_name=HEADLESS_ENGINE))
        os.replace(partial, executed)
    except PapermillExecutionError as err:
        _keep_partial(partial, executed)
        evalue = str(err.evalue).strip().splitlines()
        raise NotebookError(f"{name}.ipynb failed at cell {err.cell_index} (In [{err.exec_count}]): {err.ename}: "
                            f"{evalue[0] if evalue else ''} (executed notebook: {executed})") from None
    except Exception as err:  # the kernel died (memory), did not start, or timed out: still one line naming it
        if disk_full(err, executed.parent):
            partial.unlink(missing_ok=True)  # cut short by the full disk: not valid JSON, and it holds the space
            raise NotebookError(f"{name}.ipynb stopped: disk full while writing into {run_dir} (free some space and "
                                "rerun; the same parameters keep the notebooks already finished)") from None
        _keep_partial(partial, executed)
        first = (str(err).strip().splitlines() or [""])[0]
        raise NotebookError(f"{name}.ipynb did not run to the end: {type(err).__name__}: {first} "
                            f"(executed notebook: {executed})") from err
    return executed


#: how often a notebook is started when its kernel dies before answering (see below)
KERNEL_STARTS = 3


def _start_again_if_the_kernel_never_answered(execute: Callable[[], Any]) -> Any:
    """`execute()`, started again (at most KERNEL_STARTS times in all) when the kernel died before it answered:
    jupyter_client picks free ports, closes them and hands them to the new kernel, and a kernel started at the same
    moment by another process can bind one first ("Address already in use", seen with a test suite and a run side by
    side). No cell has run then, so starting again is safe."""
    for start in range(1, KERNEL_STARTS + 1):
        try:
            return execute()
        except RuntimeError as err:
            if start == KERNEL_STARTS or "before replying to kernel_info" not in str(err):
                raise


def _keep_partial(partial: Path, executed: Path) -> None:
    """A notebook that failed is kept (its outputs show the error) under its real name, when it was written whole."""
    try:
        if partial.is_file():
            os.replace(partial, executed)
    except OSError:
        pass


def default_jobs(pipeline: str) -> int:
    """Notebooks run at once: the pipeline's `jobs`, else one per CPU core (at most 4)."""
    jobs = get_pipeline(pipeline).jobs
    return jobs if jobs is not None else max(1, min(4, os.cpu_count() or 1))


@contextlib.contextmanager
def _kernel_environment(threads: int, log_path: Path) -> Iterator[None]:
    """While notebooks run: kernels get OMP_NUM_THREADS=`threads` (unless the user set it: several single-threaded
    kernels on a few cores beat one kernel whose threads wait on each other), and the kernels' own stderr (ipykernel's
    start-up warnings) goes to `log_path` instead of between the progress lines."""
    saved_env = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _schedule(tasks: list[tuple[int, str]], jobs: int, run: Callable[[int, str], None]) -> None:
    """Run (seed, notebook) tasks on `jobs` workers; a task starts once the notebooks it needs
    (pipelines.notebook_needs, when they are among the tasks) of the same seed are done. The first failure stops
    new starts; the running ones finish, then it is raised."""
    pending, running, done = list(tasks), {}, set()
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while running or (pending and error is None):
            for task in list(pending):
                if len(running) >= jobs or error is not None:
                    break
                seed, name = task
                if all((seed, need) in done or (seed, need) not in tasks for need in notebook_needs(name)):
                    pending.remove(task)
                    running[pool.submit(run, seed, name)] = task
            if not running:  # nothing can start: a needed notebook is missing from the tasks and failed earlier
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    done.add(task)
    if error is not None:
        raise error


def run_pipeline(pipeline: str, out: str | os.PathLike, overrides: Mapping | None = None,
                 seeds: Sequence[int] | None = None, notebooks: Sequence[str] | None = None,
                 jobs: int | None = None, echo: Callable[[str], None] = print, force: bool = False,
                 slurm: SlurmOptions | None = None) -> Path | None:
    """Run `pipeline` for every seed into `out`, then merge the results and write the report; returns report.html.

    overrides: parameter values over the pipeline's (checked first, a ValueError names the bad one); seeds: run
    seeds (default: the pipeline's); notebooks: which notebooks (default: the pipeline's; any of
    pipelines.NOTEBOOKS); jobs: notebooks executed at once (default :func:`default_jobs`), each kernel with
    cores / jobs threads.

    A run folder holds one configuration: `out` with a run of other parameters is refused (``force``: that run's
    results are deleted first); the same parameters resume, keeping every notebook whose results they already made.
    One run writes a folder at a time (a lock file holding its pid).

    slurm: run every (seed, notebook) as a SLURM job instead (mcmi_lab.cli.slurm; `jobs` does not apply); with
    ``slurm.detach`` returns None once they are submitted (a last job writes the report).
    """
    pipe = get_pipeline(pipeline)
    params = resolve_parameters(pipe, {"interactive": False, **dict(overrides or {})})
    seeds = list(pipe.seeds if seeds is None else seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r} are not accepted: expected distinct integers >= 0")
    if slurm is not None and jobs is not None:
        raise ValueError("--jobs is not accepted with --executor slurm: SLURM runs as many jobs at once as it gives")
    if slurm is not None:
        slurm.check_available()
    jobs = default_jobs(pipe.name) if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is not accepted: expected an integer >= 1")
    names = list(pipe.notebooks)
    if notebooks:  # any notebook of a full run, with this pipeline's parameters (the demo leaves 03/05/06 out)
        unknown = [n for n in notebooks if n not in NOTEBOOKS]
        if unknown:
            raise ValueError(f"notebook {unknown[0]!r} is not accepted: expected some of {', '.join(NOTEBOOKS)}")
        names = [n for n in NOTEBOOKS if n in notebooks]
    for name in names:
        notebook_path(name)  # a missing notebook fails now, not after an hour of training
    out = Path(out).resolve()  # once, before any notebook runs: every path below is absolute
    out.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(out):  # one writer per folder; one configuration per folder
        if force:
            clear_run_folder(out)
        data = data_fingerprint(params.get("dataset"))  # a data file changed under the same path is refused too
        check_run_folder(out, pipe.name, params, data)
        earlier = read_run_info(out)
        threads = max(1, (os.cpu_count() or 1) // jobs) if slurm is None else slurm.cpus_per_job or 1
        info = {"pipeline": pipe.name, "description": pipe.description,
                "notebooks": list(dict.fromkeys(earlier.get("notebooks", []) + names)),
                "seeds": sorted(set(earlier.get("seeds", [])) | set(seeds)),
                "parameters": params, "data": data, "device": describe_device(params["device"]), "jobs": jobs,
                "executor": "local" if slurm is None else slurm.describe(),
                "threads_per_kernel": int(os.environ.get("OMP_NUM_THREADS", threads)), "started": now(),
                "command": " ".join(["mcmi-lab"] + sys.argv[1:]), "status": "running",
                "timings_s": dict(earlier.get("timings_s", {}))}
        write_run_info(out, info)
        start = time.perf_counter()
        echo(f"mcmi-lab: pipeline {pipe.name!r}, seeds {seeds}, {len(names)} notebooks, "
             f"{f'{jobs} at a time' if slurm is None else 'as SLURM jobs'} -> {out}")

        def run_one(seed: int, name: str) -> None:
            t0 = time.perf_counter()
            execute_notebook(name, seed_dir(out, seed), {**params, "seed": seed})
            seconds = time.perf_counter() - t0
            info["timings_s"][f"seed_{seed}/{name}"] = round(seconds, 1)
            echo(f"  seed {seed}  {name:<18} {seconds:7.1f} s")

        try:
            done = [(seed, name) for seed in seeds for name in names
                    if completed(seed_dir(out, seed), name, {**params, "seed": seed}, data)]
            for seed, name in done:  # the same configuration ran these to the end before: a rerun resumes
                echo(f"  seed {seed}  {name:<18} done before with these parameters, kept (--force reruns it)")
            rank = {name: i for i, name in enumerate(START_ORDER)}
            tasks = sorted(((seed, name) for seed in seeds for name in names if (seed, name) not in done),
                           key=lambda task: (rank.get(task[1], len(rank)), task[0]))
            if slurm is None:
                with _kernel_environment(threads, out / "kernels.log"):
                    _schedule(tasks, jobs, run_one)
            elif not run_study(out, tasks, params, slurm, "mcmi_lab.cli.commands:execute_notebook",
                               {NOTEBOOKS_ENV: str(notebooks_dir())}, echo, info["timings_s"]):
                info["status"] = "submitted"
                return None  # its last job writes the report
            info["status"] = "finished"
        except BaseException as err:
            info["status"] = (f"failed: {err}" if isinstance(err, (NotebookError, JobFailed))
                              else f"stopped: {type(err).__name__}")
            raise
        finally:
            info["finished"] = now()
            info["wall_time_s"] = round(time.perf_counter() - start, 1)
            in_flight = sys.exc_info()[1] is not None
            try:
                write_run_info(out, info)
                if any((seed_dir(out, s) / "results").is_dir() for s in seeds):
                    merge_results(out)
            except OSError:
                if not in_flight:
                    raise  # else the notebook's own error (raised on) is the one to see, not a full disk after it
        _, page = build_report(out)
    return page


# ---- the command line -------------------------------------------------------------------------------------------

def _parameter_help() -> str:
    lines = ["pipelines:"] + [f"  {p.name:<6} {p.description}" for p in PIPELINES.values()]
    lines += ["", "parameters (-p NAME VALUE; VALUE is JSON when it parses, else a string; a list in quotes, e.g. "
              "-p kd_methods '[\"kd\", \"dkd\"]'), with the notebooks' default and each pipeline's own value:"]
    for name, p in PARAMETERS.items():
        override = ", ".join(f"{pipe.name} {pipe.parameters[name]!r}" for pipe in PIPELINES.values()
                             if name in pipe.parameters and pipe.parameters[name] != p.default)
        lines.append(f"  {name:<22} {p.help} (default {p.default!r}" + (f"; {override}" if override else "") + ")")
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = {}
    for name, value in args.param or []:
        overrides[name] = parse_value(value)
    page = run_pipeline(args.pipeline, args.out, overrides, args.seeds, args.notebooks, args.jobs, force=args.force,
                        slurm=slurm_options(args))
    if page is not None:
        print(f"mcmi-lab: report written to {page} (and {page.with_suffix('.md')})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print("\n".join(study_status(args.dir)))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    """Find Fashion-MNIST; when it is nowhere, install Debian's `dataset-fashion-mnist` with apt-get (as root, or
    through passwordless sudo) and look again (then torchvision's download too). Every failure is one line."""
    try:
        try:
            root = fashion_mnist_root(download=False)
        except FileNotFoundError:
            if shutil.which("apt-get") is None:
                raise
            prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
            if prefix and shutil.which("sudo") is None:
                raise FileNotFoundError("Fashion-MNIST is missing and apt-get needs root: run "
                                        "`sudo apt-get install dataset-fashion-mnist`, or see `mcmi-lab data --help`")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            print("installing Debian package dataset-fashion-mnist ...", flush=True)
            for cmd in (["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"],
                        ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]):
                done = subprocess.run(prefix + cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0
                if done and "install" in cmd:
                    break
            root = fashion_mnist_root(download=True)
    except Exception as err:  # one clear message, not a traceback
        print(f"mcmi-lab: {err}", file=sys.stderr)
        return 1
    print(f"mcmi-lab: Fashion-MNIST is ready in {root / 'FashionMNIST' / 'raw'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    md, page = build_report(args.dir)
    print(f"mcmi-lab: report written to {page} (and {md})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Print the report card of a checkpoint (report_card.inspect_checkpoint); --json writes it atomically."""
    card = inspect_checkpoint(args.model, args.data, args.train_size, args.test_size, args.data_root,
                              omitted=args.omit, temperature=args.temperature)
    print(format_card(card))
    if args.json is not None:
        print(f"mcmi-lab: card written to {write_json(args.json, card)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcmi-lab", description="Knowledge distillation with MCMI teachers: "
                                     "headless runs of the notebooks, data, reports.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a named pipeline's notebooks through papermill and write the report",
                         epilog=_parameter_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("pipeline", choices=list(PIPELINES), help=", ".join(PIPELINES))
    run.add_argument("--out", required=True, type=Path, help="run folder (created; reused if it exists)")
    run.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="override a parameter (repeatable)")
    run.add_argument("--seeds", nargs="+", type=int, help="run seeds (default: the pipeline's)")
    run.add_argument("--notebooks", nargs="+", help="run these notebooks instead of the pipeline's (any of a full run, e.g. 01_teachers 03_distill)")
    run.add_argument("--force", action="store_true", help="replace the results of an earlier run with other "
                     "parameters in --out (without it that is refused; the same parameters resume)")
    run.add_argument("--jobs", type=int, help="notebooks executed at once (default: one per core, at most 4; "
                     "paper: 1)")
    add_slurm_arguments(run)
    run.set_defaults(func=_cmd_run)

    data = sub.add_parser("data", help="make Fashion-MNIST available offline and say where it is")
    data.set_defaults(func=_cmd_data)

    report = sub.add_parser("report", help="rebuild results.json, report.md and report.html of a run folder")
    report.add_argument("dir", type=Path, help="run folder written by `mcmi-lab run`")
    report.set_defaults(func=_cmd_report)

    status = sub.add_parser("status", help="say which notebooks of a run folder are done, pending, running, "
                            "failed or stopped (SLURM jobs with their ids and logs)")
    status.add_argument("dir", type=Path, help="run folder written by `mcmi-lab run`")
    status.set_defaults(func=_cmd_status)

    inspect = sub.add_parser("inspect", help="print a checkpoint's teacher report card: accuracy, NLL, ECE, Brier, "
                             "CMI, NCMI, Γ (train and test), per-class CMI; KL(P* ‖ P) on --data synthetic")
    inspect.add_argument("model", type=Path, metavar="MODEL.pt",
                         help="model.pt of `mcmi-lab train`, or a run's checkpoints/teacher_*.pt")
    inspect.add_argument("--data", required=True, metavar="NAME|PATH", help="a data set name "
                         f"({', '.join(sorted(DATASETS))}) or a path to an .npz or ImageFolder folder")
    inspect.add_argument("--train-size", type=int, metavar="N", help="N training samples (a seeded subset; "
                         "default: all)")
    inspect.add_argument("--test-size", type=int, metavar="N", help="N test samples (a seeded subset; default: all)")
    inspect.add_argument("--data-root", metavar="DIR", help="directory holding the data set files")
    inspect.add_argument("--json", type=Path, metavar="FILE", help="also write the card as JSON (atomically)")
    inspect.add_argument("--omit", type=int, nargs="+", metavar="CLASS", help="classes a zero-shot student would not "
                         "see: the card adds their mass on the other classes' images (omitted_mass)")
    inspect.add_argument("--temperature", type=float, default=4.0, metavar="T", help="KD temperature of --omit's "
                         "mass (default 4)")
    inspect.set_defaults(func=_cmd_inspect)

    add_train_command(sub)  # `mcmi-lab train` (torchrun, resumable training): mcmi_lab/cli/train.py
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (NotebookError, JobFailed) as err:
        print(f"mcmi-lab: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"mcmi-lab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, a read-only or missing folder: one line, not a traceback
        print(f"mcmi-lab: error: {err}", file=sys.stderr)
        return 1
    except StopTraining as err:  # the collapse guard or a non-finite term (mcmi-lab train)
        print(f"mcmi-lab: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mcmi-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
