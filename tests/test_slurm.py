"""`mcmi-lab run --executor slurm` against a real one-node SLURM (tools/slurm_cluster.sh), and its option checks.

The cluster needs root and Debian's slurm-wlm and munge (.ci/run installs them; so does the fixture, as root with
apt-get). The jobs run this Python with this environment: PYTHONPATH gets the checkout first, so that they import
the mcmi_lab under test.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcmi_lab.cli import commands as cli
from mcmi_lab.cli import slurm
from mcmi_lab.study.runs import LOCK, live_slurm_jobs

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tools" / "slurm_cluster.sh"


def _install_slurm() -> str | None:
    """None when the SLURM daemons are there (installed now if need be), else why the tests skip."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM (slurm-wlm, munge) is not installed and cannot be: apt-get as root is needed"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], env=env, capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"apt-get install slurm-wlm munge failed: {done.stderr.strip()[-200:]}"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM for the session: SLURM_CONF and PYTHONPATH set while it runs, every daemon it started
    stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start slurmctld, slurmd and munged: they need root")
    reason = _install_slurm()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    try:
        yield folder
    finally:
        subprocess.run(["scancel", "--me"], capture_output=True)
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(slurm, "POLL_S", 0.5)


def _tiny_notebooks(folder: Path, bodies: dict) -> Path:
    """Notebooks named as the study's, each a parameters cell (run_dir, seed) and `body`."""
    import nbformat

    folder.mkdir()
    for name, body in bodies.items():
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"},
                                                "language_info": {"name": "python"}})
        params = nbformat.v4.new_code_cell('run_dir = ""\nseed = 0')
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params] + [nbformat.v4.new_code_cell(cell) for cell in body]
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


TEACHER_ROWS = ("from mcmi_lab.study.runs import write_results\n"
                "rows = [{'teacher': t, 'test_acc': 0.9, 'train_acc': 1.0, 'train_cmi': 0.01, 'test_cmi': 0.1, "
                "'train_ncmi': 0.1, 'test_ncmi': 0.2, 'test_ece': 0.01} for t in ('mll', 'control', 'mcmi')]\n"
                "write_results(run_dir, '01_teachers', {'teachers': rows}, {'seed': seed, 'run_dir': run_dir})\n")


def _numbers(results: dict) -> dict:
    """A results.json's seeds without what differs between two runs of the same computation: when and where
    (meta) and the epochs' wall-clock times."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("meta", "time")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(results["seeds"])


def _cells_run(notebook: Path) -> int:
    """Code cells papermill has run in a notebook it is writing (0 while there is none, or it is being written)."""
    try:
        cells = json.loads(notebook.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(cell.get("execution_count") is not None for cell in cells if cell["cell_type"] == "code")


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mcmi_lab.cli.commands", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the options, without a cluster -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("4:00:00", 240), ("2-00", 2880),
                                           ("1-02:03", 1563), ("0-00:00:30", 1)])
def test_time_limits_in_slurm_syntax(text, minutes):
    assert slurm.time_minutes(text) == minutes


@pytest.mark.parametrize("argv, message", [
    (["--partition", "gpu"], "--partition is not accepted with --executor local: it is an option of --executor slurm"),
    (["--executor", "slurm", "--time", "4h"], "--time='4h' is not accepted: expected minutes or [D-]HH:MM[:SS]"),
    (["--executor", "slurm", "--cpus-per-job", "0"], "--cpus-per-job=0 is not accepted: expected an integer >= 1"),
    (["--executor", "slurm", "--slurm-option", "dependency=afterok:1"], "--slurm-option 'dependency' is not accepted"),
    (["--executor", "slurm", "--jobs", "2"], "--jobs is not accepted with --executor slurm"),
])
def test_slurm_options_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    assert cli.main(["run", "smoke", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (out / "run.json").exists()


def test_slurm_options_become_submitit_parameters():
    options = slurm.SlurmOptions("gpu", 2, 8, "32G", "12:00:00", (("account", "proj"), ("exclusive", "")))
    assert options.parameters() == {"partition": "gpu", "cpus_per_task": 8, "mem": "32G", "gpus_per_node": 2,
                                    "stderr_to_stdout": True, "time": 720}
    assert options.sbatch_options() == {"account": "proj", "exclusive": True}
    assert slurm.SlurmOptions().parameters() == {"stderr_to_stdout": True, "time": None}  # the partition's limit


def test_job_states_from_the_queue_then_from_the_outcome_files(tmp_path):
    import pickle

    logs = tmp_path / slurm.LOGS
    logs.mkdir()
    traceback = ("Traceback (most recent call last):\n  File ...\nmcmi_lab.cli.NotebookError: 02_concentration.ipynb "
                 "failed at cell 3 (In [4]): KeyError: 'x' (executed notebook: /r/seed_0/notebooks/02.ipynb)\n")
    for job, outcome in (("11", ("success", 12.5)), ("12", ("error", traceback)),
                         ("13", ("error", "Traceback ...\nModuleNotFoundError: No module named 'mcmi_lab'\n"))):
        (logs / f"{job}_0_result.pkl").write_bytes(pickle.dumps(outcome))
    queue = {"10": "PENDING", "11": "COMPLETING"}  # a job SLURM still holds is read from the queue, outcome or not
    assert slurm.job_state(tmp_path, "10", queue) == ("pending", "PENDING")
    assert slurm.job_state(tmp_path, "11", queue) == ("running", "COMPLETING")
    assert slurm.job_state(tmp_path, "11", {}) == ("done", 12.5)
    assert slurm.job_state(tmp_path, "12", {}) == ("failed", "02_concentration.ipynb failed at cell 3 (In [4]): "
                                                   "KeyError: 'x' (executed notebook: /r/seed_0/notebooks/02.ipynb)")
    assert slurm.job_state(tmp_path, "13", {}) == ("failed", "ModuleNotFoundError: No module named 'mcmi_lab'")
    assert slurm.job_state(tmp_path, "14", {}) == ("stopped", None)  # gone without an outcome: SLURM ended it
    record = {"job_id": "14", "log": "/r/slurm/14_0_log.out"}
    assert slurm.failure_message("seed_3/05_few_shot", record, "stopped", None) == (
        "seed 3, 05_few_shot: SLURM job 14 ended before the notebook finished (scancel, time limit, preemption or a "
        "node failure; log /r/slurm/14_0_log.out): rerun the same command to resume")


def test_the_lock_of_a_run_folder_is_held_by_its_live_slurm_jobs(tmp_path, monkeypatch):
    """Without a cluster: squeue's answer stands in for it (the cluster tests below use the real one)."""
    from mcmi_lab.study import runs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(f"{int(dead.stdout)} 2026-01-01T00:00:00\nslurm 7 8\nslurm 9\n")
    monkeypatch.setattr(runs, "slurm_queue", lambda: {"8": "RUNNING", "9": "PENDING", "10": "RUNNING"})
    with pytest.raises(ValueError, match=rf"run folder '{tmp_path}' is being written by SLURM jobs 8, 9 of an "
                                         rf"earlier mcmi-lab run: wait for them \(mcmi-lab status {tmp_path}\)"):
        with runs.run_folder_lock(tmp_path):
            pass

    def no_squeue():
        raise OSError("squeue did not answer (no such file)")
    monkeypatch.setattr(runs, "slurm_queue", no_squeue)
    with pytest.raises(ValueError, match=r"is held by SLURM jobs 7, 8, 9 and squeue did not answer \(no such file\): "
                                         r"run where SLURM answers, or remove its \.run\.lock if none of them runs"):
        with runs.run_folder_lock(tmp_path):
            pass
    # the jobs have ended: the lock is taken over; this process's own jobs keep it after it lets go (--detach)
    monkeypatch.setattr(runs, "slurm_queue", lambda: {"10": "RUNNING"})
    with runs.run_folder_lock(tmp_path):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
        runs.hold_run_folder(tmp_path, ["10", "11"])
    assert (tmp_path / LOCK).read_text().splitlines()[1:] == ["slurm 10"]
    monkeypatch.setattr(runs, "slurm_queue", lambda: {})
    with runs.run_folder_lock(tmp_path):
        pass
    assert not (tmp_path / LOCK).exists()


# ---- on the cluster ---------------------------------------------------------------------------------------------

SMOKE = ["--notebooks", "01_teachers", "02_concentration", "--seeds", "0", "-p", "train_size", "200",
         "-p", "test_size", "200"]


def test_a_smoke_study_on_slurm_resumes_after_scancel_and_matches_the_local_run(slurm_cluster, tmp_path):
    threads = str(os.cpu_count() or 1)  # local: --jobs 1 gives the kernel every core; a job gets --cpus-per-job
    local = tmp_path / "local"
    assert cli.main(["run", "smoke", "--out", str(local), "--jobs", "1", *SMOKE]) == 0

    out = tmp_path / "slurm"
    command = ["run", "smoke", "--out", str(out), "--executor", "slurm", "--cpus-per-job", threads, *SMOKE]
    first = _cli(*command)
    # 02_concentration mid-notebook: its job runs and papermill has written the notebook after a cell ran
    running = out / "seed_0" / "notebooks" / ".02_concentration.ipynb.running"
    _wait_for(lambda: _cells_run(running) or first.poll() is not None, 600, "02_concentration's first cell")
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    job = jobs["seed_0/02_concentration"]["job_id"]
    subprocess.run(["scancel", job], check=True)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line == (f"mcmi-lab: seed 0, 02_concentration: SLURM job {job} ended before the notebook finished "
                    f"(scancel, time limit, preemption or a node failure; log {out}/slurm/{job}_0_log.out): "
                    "rerun the same command to resume")
    assert json.loads((out / "run.json").read_text())["status"].startswith("failed: seed 0, 02_concentration")
    assert not (out / LOCK).exists()  # no job of the study is left: the folder is free

    second = _cli(*command)
    stdout, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert "seed 0  01_teachers        done before with these parameters, kept" in stdout
    assert "submitted as SLURM job" in stdout and "seed_0/01_teachers " not in stdout  # only 02 ran again
    # same seeds, same code, same cores: the numbers are the same to the last bit (the jobs ran this mcmi_lab)
    assert _numbers(json.loads((out / "results.json").read_text())) == \
        _numbers(json.loads((local / "results.json").read_text()))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["executor"]["executor"] == "slurm"
    assert (out / "report.html").is_file() and (out / "slurm" / f"{job}_0_log.out").is_file()


def test_a_failing_notebook_names_seed_cell_error_job_and_log(slurm_cluster, tmp_path, monkeypatch, capsys,
                                                              fast_polls):
    # cell 3 of the executed notebook: papermill adds the injected parameters after the parameters cell
    books = _tiny_notebooks(tmp_path / "books", {"01_teachers": ["x = 1", "raise ValueError('no teachers today')"],
                                                 "02_concentration": ["print('never runs')"]})
    monkeypatch.setenv(cli.NOTEBOOKS_ENV, str(books))
    out = tmp_path / "r"
    code = cli.main(["run", "smoke", "--out", str(out), "--executor", "slurm", "--notebooks", "01_teachers",
                     "02_concentration"])
    err = capsys.readouterr().err
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    job, log = jobs["seed_0/01_teachers"]["job_id"], jobs["seed_0/01_teachers"]["log"]
    assert code == 1 and err.count("\n") == 1
    # the cause, not 02's job that SLURM cancelled because it needed 01's teachers
    assert err == (f"mcmi-lab: seed 0, 01_teachers: 01_teachers.ipynb failed at cell 3 (In [4]): ValueError: no "
                   f"teachers today (executed notebook: {out}/seed_0/notebooks/01_teachers.ipynb) (SLURM job {job}, "
                   f"log {log}) [and 1 more: mcmi-lab status {out}]\n")
    assert "ValueError: no teachers today" in Path(log).read_text()
    assert not (out / "seed_0" / "results").exists()


def test_a_detached_study_holds_its_folder_until_its_jobs_end(slurm_cluster, tmp_path, monkeypatch, capsys):
    books = _tiny_notebooks(tmp_path / "books", {
        "01_teachers": ["import time\ntime.sleep(3)", TEACHER_ROWS],
        "02_concentration": ["from mcmi_lab.study.runs import write_results\nwrite_results(run_dir, '02_concentration', "
                             "{'concentration': []}, {'seed': seed, 'run_dir': run_dir})"]})
    monkeypatch.setenv(cli.NOTEBOOKS_ENV, str(books))
    out = tmp_path / "r"
    command = ["run", "smoke", "--out", str(out), "--executor", "slurm", "--notebooks", "01_teachers",
               "02_concentration", "--detach"]
    assert cli.main(command) == 0
    assert "submitted; `mcmi-lab status" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["status"] == "submitted"
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert set(jobs) == {"seed_0/01_teachers", "seed_0/02_concentration", "report"}

    # the folder is the jobs': a second submission, and a local run, are refused in one line
    local = ["run", "smoke", "--out", str(out), "--notebooks", "01_teachers", "02_concentration"]
    for again in (command, local):
        assert cli.main(again) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mcmi-lab: error: run folder '{out}' is being written by SLURM jobs ")
        assert err.count("\n") == 1
    assert cli.main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert f"SLURM job {jobs['seed_0/02_concentration']['job_id']}" in status
    assert "status submitted" in status

    _wait_for(lambda: not live_slurm_jobs([job["job_id"] for job in jobs.values()]), 300, "the jobs to end")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "report.html").is_file() and set(json.loads((out / "results.json").read_text())["seeds"]["0"]) \
        == {"01_teachers", "02_concentration"}
    assert cli.main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("  seed 0  01_teachers        done (") and lines[-1] == "2 done"
    # the jobs have ended: the folder is free, and the same command resumes with nothing left to run
    assert cli.main(command) == 0
    assert "done before with these parameters, kept" in capsys.readouterr().out
