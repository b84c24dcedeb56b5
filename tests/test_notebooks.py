"""The notebooks: their structure (one parameters cell, numbered steps, no stored outputs, kernel metadata), then
each one executed by papermill with the smoke pipeline's parameters into one run folder, in the pipeline's order,
with the artifacts it must leave; the report of that folder; a broken parameter failing `mcmi-lab run` by name."""
import math
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from mcmi_lab import load_checkpoint
from mcmi_lab.cli.commands import execute_notebook, notebooks_dir
from mcmi_lab.study.pipelines import NOTEBOOKS, PARAMETERS, resolve_parameters
from mcmi_lab.study.runs import load_teacher, read_results, teacher_path

ALL = ("00_quickstart",) + NOTEBOOKS + ("09_own_data",)


def _load(name):
    return nbformat.read(notebooks_dir() / f"{name}.ipynb", as_version=4)


# ---- structure --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_notebook_structure(name):
    nb = _load(name)
    assert nb.metadata.kernelspec["name"] == "python3" and nb.metadata.language_info["name"] == "python"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be stripped in git"
    steps = [int(m.group(1)) for c in nb.cells if c.cell_type == "markdown"
             for m in [re.match(r"## (\d+)\. ", c.source)] if m]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    # thin notebooks: no training loop or optimiser written inline
    source = "\n".join(c.source for c in code)
    assert ".backward(" not in source and "optim." not in source


#: The public surface a notebook may import from: mcmi_lab's __all__ and the figure modules' __all__.
PUBLIC = ("mcmi_lab", "mcmi_lab.figures.cam", "mcmi_lab.figures.plots", "mcmi_lab.explorers.widgets")


def undeclared_imports(source: str) -> list[str]:
    """Names a notebook's code takes from mcmi_lab outside the declared public surface (``__all__``)."""
    import ast
    import importlib

    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    bad, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mcmi_lab":
            if node.module not in PUBLIC:
                bad += [f"{node.module}.{a.name}" for a in node.names]
                continue
            declared = importlib.import_module(node.module).__all__
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name not in declared]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "mcmi_lab":
                    if a.name not in PUBLIC:
                        bad.append(a.name)
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):  # ml.X attribute access through `import mcmi_lab as ml`
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if node.attr not in importlib.import_module(module).__all__:
                bad.append(f"{module}.{node.attr}")
    return bad


@pytest.mark.parametrize("name", ALL)
def test_notebooks_import_only_declared_public_names(name):
    source = "\n".join(c.source for c in _load(name).cells if c.cell_type == "code")
    assert undeclared_imports(source) == []


def test_the_public_name_check_catches_an_undeclared_import():
    assert undeclared_imports("from mcmi_lab.study.pipelines import load_run_data") == ["mcmi_lab.study.pipelines.load_run_data"]
    assert undeclared_imports("from mcmi_lab.figures.plots import _finish") == ["mcmi_lab.figures.plots._finish"]
    assert undeclared_imports("import mcmi_lab as ml\nml.fit\nml.kd_losses") == ["mcmi_lab.kd_losses"]
    assert undeclared_imports("%matplotlib inline\nfrom mcmi_lab import fit, predict") == []


def test_the_public_modules_declare_only_what_exists():
    import importlib

    for module in PUBLIC:
        mod = importlib.import_module(module)
        assert [n for n in mod.__all__ if not hasattr(mod, n)] == []


@pytest.mark.parametrize("name", ALL)
def test_declared_parameters_are_known_with_the_library_defaults(name):
    declared = papermill.inspect_notebook(str(notebooks_dir() / f"{name}.ipynb"))
    assert "run_dir" in declared and "seed" in declared
    for key, info in declared.items():
        assert key in PARAMETERS, f"{name} declares unknown parameter {key}"
        if name not in ("00_quickstart", "09_own_data") and key != "run_dir":  # they have their own sizes
            assert eval(info["default"]) == PARAMETERS[key].default, key


# ---- execution with the smoke parameters --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def single_threaded_kernels():
    """Kernels inherit the environment: one thread each, as `mcmi-lab run` gives them (a 2-thread kernel on a busy
    2-core machine waits on its own threads, many times slower on these tiny tensors)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_run")
    return out, out / "seed_0", {**resolve_parameters("smoke", {"interactive": False}), "seed": 0}


def _execute(run, name, **extra):
    out, run_dir, params = run
    executed = execute_notebook(name, run_dir, {**params, **extra})
    assert executed.is_file()
    return run_dir, read_results(run_dir, name), params


def _figures(run_dir, name):
    return sorted(p.name for p in (run_dir / "figures" / name).glob("*.png"))


def test_00_quickstart(tmp_path):
    params = {**resolve_parameters("smoke"), "seed": 0, "interactive": True,  # the widget too, headless
              "tensorboard": True}
    run_dir = tmp_path / "quick"
    executed = execute_notebook("00_quickstart", run_dir, params)
    runs = sorted(p.name for p in (run_dir / "tensorboard").iterdir())  # one TensorBoard run per training
    assert runs == ["control_λ=0", "mcmi_λ=0.5", "student_kd_control", "student_kd_mcmi", "student_kd_mll",
                    "teacher_cnn_small"]
    results = read_results(run_dir, "00_quickstart")
    assert [r["teacher"] for r in results["teachers"]] == ["mll", "control", "mcmi"]
    assert all(0 <= r["student_acc"] <= 1 for r in results["students"])
    assert _figures(run_dir, "00_quickstart") == ["cam_grid.png"]
    assert all(teacher_path(run_dir, t).is_file() for t in ("mll", "control", "mcmi"))
    outputs = [o for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


def test_09_own_data(tmp_path):
    """scikit-learn's digits written as an .npz and as an ImageFolder, read back identically, and trained on."""
    run_dir = tmp_path / "own"
    execute_notebook("09_own_data", run_dir, {"interactive": False, "teacher_epochs": 2, "finetune_epochs": 1})
    results = read_results(run_dir, "09_own_data")
    assert results["data"] == {"name": "digits", "classes": [str(c) for c in range(10)], "train_size": 1438,
                               "test_size": 359, "image": [1, 8, 8]}
    assert [r["teacher"] for r in results["teachers"]] == ["mll", "control", "mcmi, dose 0.05", "mcmi, dose 0.1"]
    assert all(0 <= r["test_acc"] <= 1 for r in results["teachers"])
    folder = Path(results["folder"])
    assert len(list((folder / "train").glob("*/*.png"))) == 1438 and Path(results["npz"]).is_file()
    assert not list(Path(results["npz"]).parent.glob("*.tmp"))
    assert _figures(run_dir, "09_own_data") == ["teacher_cmi.png"]


def test_01_teachers(run):
    run_dir, results, _ = _execute(run, "01_teachers")
    rows = results["teachers"]
    assert [r["teacher"] for r in rows] == ["mll", "control", "label_smoothing", "temperature", "mcmi"]
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and r["train_cmi"] >= 0 and r["test_ncmi"] >= 0 and 0 <= r["test_ece"] <= 1
    scaled = load_teacher(run_dir, "temperature")
    assert float(scaled.temperature) == pytest.approx(results["temperature"])
    assert _figures(run_dir, "01_teachers") == ["history_mcmi.png", "history_mll.png"]
    assert results["meta"]["parameters"]["lam"] == run[2]["lam"]
    assert results["data"]["name"] == "fashion-mnist" and results["data"]["classes"][0] == "T-shirt/top"
    assert results["data"]["image"] == [1, 28, 28] and results["data"]["train_size"] > 0
    # headless: the MLL teacher's training is checkpointed every epoch, so that a stopped run continues (issue 30)
    state = load_checkpoint(run_dir / "checkpoints" / "train_mll.ckpt")
    assert state["epoch"] == run[2]["teacher_epochs"] and len(state["history"]) == run[2]["teacher_epochs"]


def test_02_concentration(run):
    run_dir, results, _ = _execute(run, "02_concentration")
    assert len(results["concentration"]) == 5 and len(results["per_class_cmi"]["mcmi"]) == 10
    assert _figures(run_dir, "02_concentration") == ["cmi_bars.png", "kl_distributions.png", "per_class_cmi.png",
                                                     "projection.png"]


def test_03_distill(run):
    run_dir, results, params = _execute(run, "03_distill")
    pairs = [(r["teacher"], r["method"]) for r in results["students"]]
    assert pairs == [("none", "ce")] + [(t, m) for t in params["teachers"] for m in params["kd_methods"]]
    assert _figures(run_dir, "03_distill") == ["student_vs_teacher_cmi.png"]


def test_04_eigencam(run):
    run_dir, results, _ = _execute(run, "04_eigencam")
    overall = {r["model"]: r for r in results["cam"] if r["class"] == "all"}
    assert set(overall) == {"mll", "control", "label_smoothing", "mcmi"}
    assert all(0 < r["area_above_half"] <= 1 and r["n"] == 50 for r in overall.values())
    assert _figures(run_dir, "04_eigencam") == ["cam_grid.png"]


def test_05_few_shot(run):
    run_dir, results, params = _execute(run, "05_few_shot")
    rows = results["few_shot"]
    assert [(r["fraction"], r["teacher"]) for r in rows] == [(f, t) for f in params["fractions"]
                                                             for t in params["shot_teachers"]]
    assert rows[0]["n_train"] < rows[-1]["n_train"]
    # "steps": a student on a quarter of the data trains four times the epochs
    assert [r["epochs"] for r in rows] == [round(params["student_epochs"] / r["fraction"]) for r in rows]
    assert _figures(run_dir, "05_few_shot") == ["few_shot.png"]


def test_06_zero_shot(run):
    run_dir, results, _ = _execute(run, "06_zero_shot")
    rows = results["zero_shot"]
    assert [(r["omitted"], r["teacher"]) for r in rows] == [([3], "control"), ([3], "mcmi"), ([0, 3], "control"),
                                                            ([0, 3], "mcmi")]
    assert all(set(r["omitted_acc"]) == {str(c) for c in r["omitted"]} for r in rows)
    assert all(0 < r["omitted_mass"] < 1 for r in rows)  # the teacher's mass on the omitted classes (issue 34)
    assert len(_figures(run_dir, "06_zero_shot")) == 4


def test_07_dose_response(run):
    run_dir, results, params = _execute(run, "07_dose_response", tensorboard=True)
    logged = {p.name for p in (run_dir / "tensorboard").iterdir()}  # teachers and stacked students alike
    assert {"control_λ=0", "KD_student_control", f"few-shot_{min(params['fractions']):g}_student_control",
            "zero-shot_student_control"} <= logged, logged
    rows = results["dose_response"]
    assert rows[0]["method"] == "control" and rows[0]["dose"] == 0
    for method in ("mcmi", "label_smoothing", "temperature"):  # a collapsed dose is a row too (issue 34)
        assert [r["dose"] for r in rows if r["method"] == method] == params["doses"]
    for r in rows:
        students = ("student_acc", "few_shot_acc", "zero_shot_omitted_acc")
        if r["collapsed"] and "checkpoint" not in r:  # stopped by the collapse guard: no teacher
            assert not r["matched"] and not any(k in r for k in students)
            continue
        assert r["matched"] == (not r["collapsed"] and (r["method"] == "control"
                                                        or abs(r["train_cmi"] - r["dose"]) <= 0.25 * r["dose"]))
        assert (run_dir / r["checkpoint"]).is_file() and 0 < r["omitted_mass"] < 1
        assert 0 <= r["test_acc"] <= 1
        if r["matched"]:
            assert all(0 <= r[k] <= 1 for k in students)
        else:  # a dose the method did not reach: the teacher is recorded, no students are trained
            assert not any(k in r for k in students)
    assert _figures(run_dir, "07_dose_response") == ["dose_response.png"]


def test_08_known_bcpd(run):
    from mcmi_lab.data.synthetic import bayes_accuracy

    run_dir, results, params = _execute(run, "08_known_bcpd")
    rows = {r["teacher"]: r for r in results["known_bcpd"]}
    assert list(rows) == ["bayes", "mll", "control", "label_smoothing", "temperature", "mcmi"]
    assert rows["bayes"]["kl_to_bayes"] == 0 and all(r["kl_to_bayes"] > 0 for n, r in rows.items() if n != "bayes")
    assert results["bayes_accuracy"] == pytest.approx(bayes_accuracy(params["synthetic_separation"], 10))
    dosed = results["dose_response"]  # the dose-response on the known posterior
    assert dosed[0]["method"] == "control" and 0 < results["bayes_train_cmi"] < math.log(10)
    for method in ("mcmi", "label_smoothing", "temperature"):
        assert [r["dose"] for r in dosed if r["method"] == method] == params["doses"]
    assert all((run_dir / r["checkpoint"]).is_file() for r in results["known_bcpd"] if r["teacher"] != "bayes")
    for r in dosed:
        if r["collapsed"] and "checkpoint" not in r:  # stopped by the collapse guard: no teacher
            continue
        assert r["kl_to_bayes"] > 0 and 0 <= r["test_acc"] <= 1 and (run_dir / r["checkpoint"]).is_file()
        assert r["matched"] == (not r["collapsed"] and (r["method"] == "control"
                                                        or abs(r["train_cmi"] - r["dose"]) <= 0.25 * r["dose"]))
    assert _figures(run_dir, "08_known_bcpd") == ["dose_response.png", "kl_ece.png"]


def test_report_of_the_smoke_run(run):
    from mcmi_lab.report.build import build_report

    out = run[0]
    md, page = build_report(out)
    text = md.read_text()
    for section in ("## Teachers", "## Students by KD method", "## Few-shot students", "## Zero-shot students",
                    "## Known Bayes posterior", "## Eigen-CAM", "## Dose-response", "## Which claims held"):
        assert section in text
    assert "seed_0/figures/04_eigencam/cam_grid.png" in text and page.stat().st_size > md.stat().st_size
    assert "dose_response.png" in text and "#### Slopes against the dose" in text
    assert "figures/training_curves.png" in text and (out / "figures" / "training_curves.png").is_file()
    # tables speak in words, not in the results' keys (the parameters table names the -p keys, collapsed)
    body, params = text.split("## Parameters\n\n<details>\n<summary>")
    assert "| MCMI (CMI target) |" in body and "| area above half max (share of pixels) |" in body
    for key in ("| mcmi |", "| label_smoothing |", "area_above_half", "entropy_norm", "mass_inside"):
        assert key not in body, key
    # the parameters the notebooks that ran declared, no others (08's synthetic_* are declared by 08, which ran)
    declared = {k for name in NOTEBOOKS for c in _load(name).cells if "parameters" in c.metadata.get("tags", [])
                for k in PARAMETERS if re.search(rf"^{k} = ", c.source, re.M)} - {"run_dir", "seed", "interactive"}
    assert {m.group(1) for m in re.finditer(r"^\| (\w+) \| `", params, re.M)} == declared


def test_broken_parameter_fails_the_run_naming_notebook_and_cell(tmp_path):
    exe = Path(sys.executable).with_name("mcmi-lab")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mcmi_lab.cli.commands"]
    # a value that passes the parameter check but breaks a notebook: the MLP has no feature map for Eigen-CAM
    proc = subprocess.run(cmd + ["run", "smoke", "--out", str(tmp_path / "r"), "-p", "teacher_model", "mlp",
                                 "--notebooks", "01_teachers", "04_eigencam"],
                          capture_output=True, text=True, timeout=780)  # a hang guard: a busy 2-core CPU is slow
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    match = re.match(r"mcmi-lab: (04_eigencam)\.ipynb failed at cell (\d+) \(In \[\d+\]\): ValueError: ", last)
    assert match and int(match.group(2)) > 3, last  # past the parameters and set-up cells
    executed = tmp_path / "r" / "seed_0" / "notebooks" / "04_eigencam.ipynb"
    assert executed.is_file() and nbformat.read(executed, as_version=4).cells  # whole, under its real name
    assert not list(executed.parent.glob(".*.running"))
    assert not (tmp_path / "r" / "seed_0" / "results" / "04_eigencam.json").exists()
    # a device that is not there stops before any notebook runs, in one line
    proc = subprocess.run(cmd + ["run", "smoke", "--out", str(tmp_path / "r2"), "-p", "device", "cuda:99"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "mcmi-lab: error: device='cuda:99' is not available: this machine has ")


# ---- notebooks stay output-free in git --------------------------------------------------------------------------

def test_the_git_filter_strips_outputs_and_leaves_clean_notebooks_byte_for_byte(tmp_path):
    import json
    import shutil

    tool = Path(__file__).resolve().parent.parent / "tools" / "strip_notebooks.py"
    assert subprocess.run([sys.executable, str(tool), "--check"]).returncode == 0  # the tracked ones are clean
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True)  # noqa
    git("init", "-q")
    git("config", "filter.strip-notebooks.clean", f"{sys.executable} {tool} --stdin")
    shutil.copy(Path(__file__).resolve().parent.parent / ".gitattributes", repo)
    clean = notebooks_dir() / "07_dose_response.ipynb"
    shutil.copy(clean, repo / "notebooks" / "clean.ipynb")
    nb = json.loads(clean.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["outputs"] = [{"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0}}}]
    cell["execution_count"] = 3
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    (repo / "notebooks" / "ran.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    git("add", "notebooks")
    assert git("show", ":notebooks/clean.ipynb").stdout == clean.read_text()  # byte for byte
    staged = json.loads(git("show", ":notebooks/ran.ipynb").stdout)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in staged["cells"]
               if c["cell_type"] == "code") and "widgets" not in staged["metadata"]
    assert git("show", ":notebooks/ran.ipynb").stdout == clean.read_text()  # the run leaves no trace in git
