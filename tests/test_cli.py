"""mcmi-lab's command line: parameter parsing and checks, the run orchestration (with a fake notebook runner), the
report built from a small hand-made results tree (numbers checked against plainly written formulas), `data`."""
import json
import math
from pathlib import Path

import pytest

from mcmi_lab.cli import commands as cli
from mcmi_lab.study.pipelines import PARAMETERS, PIPELINES, omit_sets, parse_value, resolve_parameters
from mcmi_lab.report.build import build_report, markdown_table, render_html
from mcmi_lab.study.runs import write_results, write_run_info

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)
T_975 = {1: 12.706204736, 2: T_975_DF2, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836, 6: 2.446911851,
         7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852}  # by degrees of freedom (tables)


# ---- parameters ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("0.5", 0.5), ("3", 3), ("[0.05, 1.0]", [0.05, 1.0]), ("[3, [0, 3]]", [3, [0, 3]]), ("true", True),
    ("null", None), ("None", None), ("cnn_small", "cnn_small"), ('"42"', "42"), ("/tmp/x", "/tmp/x"),
])
def test_parse_value_reads_json_else_string(text, value):
    assert parse_value(text) == value


def test_resolve_layers_defaults_pipeline_and_overrides():
    params = resolve_parameters("smoke", {"lam": 0.25})
    assert params["lam"] == 0.25
    assert params["train_size"] == PIPELINES["smoke"].parameters["train_size"]
    assert params["kd_temperature"] == PARAMETERS["kd_temperature"].default
    assert set(params) == set(PARAMETERS)


def test_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        resolve_parameters("smoke", {"lamda": 0.5})
    msg = str(err.value)
    assert "'lamda'" in msg and "lam" in msg and "fractions" in msg and "\n" not in msg


@pytest.mark.parametrize("name, value, fragment", [
    ("lam", -0.1, "lam=-0.1"),
    ("doses", [0.1, -1], "doses[1]=-1"),
    ("fractions", [0.0, 0.5], "fractions[0]=0.0"),
    ("fractions", [1.5], "fractions[0]=1.5"),
    ("fractions", [], "fractions=[]"),
    ("teacher_epochs", 0, "teacher_epochs=0"),
    ("student_epochs", 2.5, "student_epochs=2.5"),
    ("finetune_epochs", True, "finetune_epochs=True"),
    ("omit_classes", [10], "omit_classes[0]=10"),
    ("omit_classes", [[0, -1]], "omit_classes[0]=[0, -1]"),
    ("omit_classes", [list(range(10))], "at least one kept class"),
    ("kd_methods", ["nope"], "kd_methods[0]='nope'"),
    ("centroid_update", "weekly", "centroid_update='weekly'"),
    ("teacher_model", "resnet9000", "teacher_model='resnet9000'"),
    ("val_fraction", 1.0, "val_fraction=1.0"),
    ("augment", "yes", "augment='yes'"),
    ("lam", "big", "lam='big'"),
])
def test_bad_values_fail_in_one_line_naming_parameter_and_value(name, value, fragment):
    with pytest.raises(ValueError) as err:
        resolve_parameters("smoke", {name: value})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_list_parameter_error_shows_how_to_write_one():
    with pytest.raises(ValueError, match=r"""kd_methods='kd' is not accepted: expected a non-empty JSON list, e.g. -p """
                                         r"""kd_methods '\["kd", "dkd"\]'$"""):
        resolve_parameters("smoke", {"kd_methods": "kd"})


def test_run_help_shows_each_pipelines_own_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.lstrip().startswith("train_size "))
    assert "(default 10000; demo 2500, dose 5000, smoke 400, paper None)" in line


def test_omitted_classes_are_checked_against_the_dataset():
    assert resolve_parameters("paper", {"omit_classes": [99, [0, 50]]})["omit_classes"] == [99, [0, 50]]
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        resolve_parameters("smoke", {"omit_classes": [99]})
    assert omit_sets([3, [0, 3]]) == [[3], [0, 3]]


def test_every_pipeline_is_valid_and_names_existing_notebooks():
    for name, pipe in PIPELINES.items():
        resolve_parameters(name)
        for nb in pipe.notebooks:
            assert cli.notebook_path(nb).is_file()


# ---- the command line ---------------------------------------------------------------------------------------------

def test_bad_value_exits_2_before_anything_runs(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "execute_notebook", lambda *a, **k: ran.append(a))
    out = tmp_path / "run"
    code = cli.main(["run", "smoke", "--out", str(out), "-p", "lam", "-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not ran and not out.exists()
    assert err == "mcmi-lab: error: lam=-1 is not accepted: expected a finite number in [0, inf)"


def test_unknown_parameter_exits_2(tmp_path, capsys):
    code = cli.main(["run", "smoke", "--out", str(tmp_path / "r"), "-p", "epochs", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "'epochs'" in err and "teacher_epochs" in err and err.count("\n") == 1


def test_run_orchestrates_seeds_notebooks_and_report(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_execute(name, run_dir, parameters, kernel_name="python3"):
        calls.append((name, Path(run_dir).name, parameters["seed"], parameters["interactive"], parameters["lam"]))
        if name == "01_teachers":
            rows = [{"teacher": t, "test_acc": 0.9, "train_acc": 1.0, "train_cmi": 0.01 * (1 + parameters["seed"]),
                     "test_cmi": 0.1, "train_ncmi": 0.1, "test_ncmi": 0.2, "test_ece": 0.01}
                    for t in ("mll", "control", "mcmi")]
            write_results(run_dir, name, {"teachers": rows})
        return Path(run_dir) / "notebooks" / f"{name}.ipynb"

    monkeypatch.setattr(cli, "execute_notebook", fake_execute)
    out = tmp_path / "run"
    code = cli.main(["run", "smoke", "--out", str(out), "--seeds", "3", "5", "-p", "lam", "0.25", "--jobs", "1",
                     "--notebooks", "03_distill", "01_teachers"])
    assert code == 0
    # pipeline order, every seed in its own folder, the run seed injected, headless, the override applied
    # the teachers of every seed first (everything waits on them), then the rest
    assert calls == [("01_teachers", "seed_3", 3, False, 0.25), ("01_teachers", "seed_5", 5, False, 0.25),
                     ("03_distill", "seed_3", 3, False, 0.25), ("03_distill", "seed_5", 5, False, 0.25)]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["seeds"] == [3, 5] and info["parameters"]["lam"] == 0.25
    assert set(info["timings_s"]) == {f"seed_{s}/{n}" for s in (3, 5) for n in ("01_teachers", "03_distill")}
    merged = json.loads((out / "results.json").read_text())
    assert set(merged["seeds"]) == {"3", "5"}
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "report written to" in capsys.readouterr().out


def test_run_takes_a_notebook_the_pipeline_leaves_out_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    calls = []

    def fake_execute(name, run_dir, parameters, kernel_name="python3"):
        calls.append(name)
        write_results(run_dir, name, {"done": True})
        return Path(run_dir) / "notebooks" / f"{name}.ipynb"

    monkeypatch.setattr(cli, "execute_notebook", fake_execute)
    assert "03_distill" not in cli.get_pipeline("demo").notebooks
    cli.run_pipeline("demo", tmp_path / "r", seeds=[0], notebooks=["03_distill", "01_teachers"], jobs=1,
                     echo=lambda line: None)
    assert calls == ["01_teachers", "03_distill"]
    with pytest.raises(ValueError, match="notebook '09_nothing' is not accepted: expected some of 01_teachers, "):
        cli.run_pipeline("demo", tmp_path / "r2", seeds=[0], notebooks=["09_nothing"])


def _tiny_notebook(path: Path, body: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"},
                                            "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell('run_dir = ""\nseed = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def test_parallel_notebooks_with_a_relative_out_never_move_the_working_directory(tmp_path, monkeypatch):
    """Two notebooks at once, --out relative: papermill's cwd= chdir'ed the whole process, so a notebook starting
    in another thread resolved its run folder inside notebooks/ (a make demo failed so)."""
    import os

    books = tmp_path / "books"
    books.mkdir()
    record = ("import os, time\nfrom pathlib import Path\ntime.sleep(0.5)\n"
              "Path(run_dir, NAME + '.cwd').write_text(os.getcwd())\n")
    _tiny_notebook(books / "01_teachers.ipynb", record.replace("NAME", "'01_teachers'") + (
        "from mcmi_lab.study.runs import write_results\nrows = [{'teacher': t, 'test_acc': 0.9, 'train_acc': 1.0, "
        "'train_cmi': 0.01, 'test_cmi': 0.1, 'train_ncmi': 0.1, 'test_ncmi': 0.2, 'test_ece': 0.01} "
        "for t in ('mll', 'control', 'mcmi')]\nwrite_results(run_dir, '01_teachers', {'teachers': rows})\n"))
    _tiny_notebook(books / "08_known_bcpd.ipynb", record.replace("NAME", "'08_known_bcpd'"))
    monkeypatch.setenv(cli.NOTEBOOKS_ENV, str(books))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    moves = []
    real_chdir = os.chdir
    monkeypatch.setattr(os, "chdir", lambda path: (moves.append(str(path)), real_chdir(path))[1])
    code = cli.main(["run", "smoke", "--out", "rel/out", "--seeds", "0", "1", "--jobs", "2",
                     "--notebooks", "01_teachers", "08_known_bcpd"])
    # papermill's file handler chdirs around each read and write, but only ever into the directory it started in
    assert code == 0 and set(moves) <= {str(work)} and Path.cwd() == work
    for seed in (0, 1):
        for name in ("01_teachers", "08_known_bcpd"):
            assert (work / "rel" / "out" / f"seed_{seed}" / f"{name}.cwd").read_text() == str(books)  # kernel cwd
    assert sorted(p.name for p in books.iterdir()) == ["01_teachers.ipynb", "08_known_bcpd.ipynb"]


def test_failing_notebook_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    started = []

    def failing(name, run_dir, parameters, kernel_name="python3"):
        started.append(name)
        if name == "01_teachers":
            raise cli.NotebookError(f"{name}.ipynb failed at cell 4 (In [3]): KeyError: 'x'")

    monkeypatch.setattr(cli, "execute_notebook", failing)
    code = cli.main(["run", "smoke", "--out", str(tmp_path / "r"), "--jobs", "2"])
    assert code == 1
    assert set(started) <= {"01_teachers", "08_known_bcpd"}  # nothing that needs the teachers started
    assert capsys.readouterr().err.strip() == "mcmi-lab: 01_teachers.ipynb failed at cell 4 (In [3]): KeyError: 'x'"
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"].startswith("failed: 01_teachers")


def test_schedule_respects_needs_and_job_count():
    import threading
    import time

    events, lock, active, peak = [], threading.Lock(), [0], [0]
    beside = threading.Event()  # set when seed 0's 08 has started: its 01 waits for it, however slow the machine

    def run(seed, name):
        with lock:
            events.append(("start", seed, name))
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        if (seed, name) == (0, "08_known_bcpd"):
            beside.set()
        if (seed, name) == (0, "01_teachers"):
            assert beside.wait(timeout=600), "08 never started beside seed 0's teachers"
        time.sleep(0.01)
        with lock:
            active[0] -= 1
            events.append(("end", seed, name))

    tasks = [(s, n) for s in (0, 1) for n in ("01_teachers", "03_distill", "05_few_shot", "08_known_bcpd")]
    cli._schedule(tasks, 2, run)
    assert sorted((s, n) for kind, s, n in events if kind == "end") == sorted(tasks)
    assert peak[0] == 2
    for seed in (0, 1):
        teachers_done = events.index(("end", seed, "01_teachers"))
        assert all(events.index(("start", seed, n)) > teachers_done for n in ("03_distill", "05_few_shot"))
    # 08 needs nothing: it ran beside seed 0's teachers
    assert events.index(("start", 0, "08_known_bcpd")) < events.index(("end", 0, "01_teachers"))


def test_data_command_reports_success_and_failure(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "fashion_mnist_root", lambda download: tmp_path)
    assert cli.main(["data"]) == 0
    assert str(tmp_path / "FashionMNIST" / "raw") in capsys.readouterr().out

    def missing(download):
        raise FileNotFoundError("Fashion-MNIST was not found. Get it one of three ways: ...")

    monkeypatch.setattr(cli, "fashion_mnist_root", missing)
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)  # no apt-get here: the error, not an install
    assert cli.main(["data"]) == 1
    assert capsys.readouterr().err.strip() == "mcmi-lab: Fashion-MNIST was not found. Get it one of three ways: ..."


def test_report_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_command_from_launch_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"run", "data", "report", "train"} <= set(sub.choices)


# ---- the report from a hand-made results tree ---------------------------------------------------------------------

def _mean_std(v):
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _ci(a, b):
    d = [x - y for x, y in zip(a, b)]
    m, s = _mean_std(d)
    half = T_975_DF2 * s / math.sqrt(len(d))
    return m, m - half, m + half


SEEDS = (0, 1, 2)
CONTROL_CMI, MCMI_CMI = [0.010, 0.012, 0.011], [0.140, 0.100, 0.120]
CONTROL_ACC, MCMI_ACC = [0.900, 0.910, 0.905], [0.880, 0.890, 0.885]
KD_CONTROL, KD_MCMI = [0.80, 0.81, 0.82], [0.81, 0.80, 0.83]
FEW_CONTROL, FEW_MCMI = [0.70, 0.71, 0.72], [0.60, 0.61, 0.63]
ZERO_CONTROL, ZERO_MCMI = [0.003, 0.021, 0.181], [0.317, 0.487, 0.400]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake_run")
    write_run_info(out, {"pipeline": "demo", "description": "a fake run", "notebooks": ["01_teachers"],
                         "seeds": [0, 1, 2],
                         "parameters": {"lam": 0.5}, "device": "cpu (test)", "started": "2026-01-01T00:00:00+00:00",
                         "finished": "2026-01-01T00:10:00+00:00", "status": "finished", "wall_time_s": 600.0})
    for i in SEEDS:
        run_dir = out / f"seed_{i}"
        teachers = [{"teacher": "mll", "test_acc": 0.9, "train_acc": 1.0, "train_cmi": 0.012, "test_cmi": 0.2,
                     "train_ncmi": 0.01, "test_ncmi": 0.05, "test_ece": 0.05},
                    {"teacher": "control", "test_acc": CONTROL_ACC[i], "train_acc": 1.0, "train_cmi": CONTROL_CMI[i],
                     "test_cmi": 0.2, "train_ncmi": 0.01, "test_ncmi": 0.05, "test_ece": 0.05},
                    {"teacher": "mcmi", "test_acc": MCMI_ACC[i], "train_acc": 0.99, "train_cmi": MCMI_CMI[i],
                     "test_cmi": 0.3, "train_ncmi": 0.1, "test_ncmi": 0.08, "test_ece": 0.04}]
        write_results(run_dir, "01_teachers", {"teachers": teachers})
        write_results(run_dir, "03_distill", {"students": [
            {"teacher": "none", "method": "ce", "student_acc": 0.78},
            {"teacher": "control", "method": "kd", "student_acc": KD_CONTROL[i], "teacher_cmi": CONTROL_CMI[i]},
            {"teacher": "mcmi", "method": "kd", "student_acc": KD_MCMI[i], "teacher_cmi": MCMI_CMI[i]}]})
        write_results(run_dir, "05_few_shot", {"few_shot": [
            {"teacher": "control", "fraction": 0.05, "student_acc": FEW_CONTROL[i]},
            {"teacher": "mcmi", "fraction": 0.05, "student_acc": FEW_MCMI[i]},
            {"teacher": "control", "fraction": 1.0, "student_acc": 0.8},
            {"teacher": "mcmi", "fraction": 1.0, "student_acc": 0.8}]})
        write_results(run_dir, "06_zero_shot", {"classes": [f"c{k}" for k in range(10)], "zero_shot": [
            {"teacher": "control", "omitted": [3], "student_acc": 0.80, "omitted_acc": {"3": ZERO_CONTROL[i]}},
            {"teacher": "mcmi", "omitted": [3], "student_acc": 0.82, "omitted_acc": {"3": ZERO_MCMI[i]}}]})
        write_results(run_dir, "08_known_bcpd", {"bayes_accuracy": 0.902, "known_bcpd": [
            {"teacher": "bayes", "kl_to_bayes": 0.0, "ece": 0.01, "accuracy": 0.9},
            {"teacher": "control", "kl_to_bayes": 0.30 + 0.01 * i, "ece": 0.05, "accuracy": 0.85, "student_acc": 0.84},
            {"teacher": "mcmi", "kl_to_bayes": 0.20 + 0.02 * i, "ece": 0.03, "accuracy": 0.86, "student_acc": 0.85}]})
    md, page = build_report(out)
    return out, md.read_text(), page.read_text()


def test_report_states_what_was_run(fake_run):
    _, md, _ = fake_run
    assert md.startswith("# mcmi_lab report: demo\n")
    assert "- pipeline `demo`; seeds: 0, 1, 2 (sub-seeds" in md and "- device: cpu (test)" in md and "- wall time: 10.0 min (600 s)" in md
    assert "| lam | `0.5` |" in md


def test_report_teacher_table_is_mean_std_over_seeds(fake_run):
    _, md, _ = fake_run
    m, s = _mean_std([100 * a for a in MCMI_ACC])
    c, cs = _mean_std(MCMI_CMI)
    row = next(line for line in md.splitlines() if line.startswith("| MCMI |"))
    assert "| teacher (n=3 each) | test acc (%) | train acc (%) | train CMI |" in md  # n once per table
    assert row.startswith(f"| MCMI | {m:.1f} ± {s:.1f} | 99.0 ± 0.0 | {c:.3f} ± {cs:.3f} |")


def test_report_claims_follow_the_intervals(fake_run):
    _, md, _ = fake_run
    claims = md.split("## Which claims held on this data")[1].split("\n## ")[0]
    lines = [line for line in claims.splitlines() if line.startswith("- ")]
    m, lo, hi = _ci(MCMI_CMI, CONTROL_CMI)
    cmi = next(v for v in lines if "train CMI" in v)
    assert f"{m:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}, n=3) — **held**" in cmi
    m, lo, hi = _ci([100 * x for x in KD_MCMI], [100 * x for x in KD_CONTROL])
    kd = next(v for v in lines if v.startswith("- kd student"))
    assert f"{m:+.2f} (95% CI {lo:+.2f} .. {hi:+.2f}, n=3) — **not shown**" in kd
    few = next(v for v in lines if "few-shot" in v)
    d = [100 * (x - y) for x, y in zip(FEW_MCMI, FEW_CONTROL)]
    need = next(n for n in range(2, 100) if T_975[n - 1] * _mean_std(d)[1] / math.sqrt(n) <= 2)
    assert few.endswith(f"— **reversed** (excludes the paper's +5.72; ±2 points needs {need} seeds)")
    m, lo, hi = _ci([100 * x for x in ZERO_MCMI], [100 * x for x in ZERO_CONTROL])
    zero = next(v for v in lines if "zero-shot" in v)
    assert f"{m:+.2f} (95% CI {lo:+.2f} .. {hi:+.2f}, n=3) — **held**" in zero
    bcpd = [v for v in lines if "known BCPD" in v]
    assert len(bcpd) == 1 and bcpd[0].endswith("**held**")  # no MLL row in this tree: that claim is left out


def test_report_zero_shot_and_bcpd_tables(fake_run):
    _, md, _ = fake_run
    m, s = _mean_std([100 * x for x in ZERO_MCMI])
    assert f"| MCMI | 82.0 ± 0.0 | {m:.1f} ± {s:.1f} |" in md and "| teacher (n=3 each) | overall |" in md
    assert "### Omitted: c3" in md and "Bayes accuracy (closed form): 90.2%." in md
    assert "| no teacher (labels only) | 78.0 ± 0.0 |" in md


def test_report_html_embeds_tables_and_figures(fake_run):
    out, md, page = fake_run
    assert (out / "figures" / "teacher_cmi.png").is_file() and "](figures/teacher_cmi.png)" in md
    assert page.count("<table>") == md.count("\n|---") and "data:image/png;base64," in page
    assert json.loads((out / "results.json").read_text())["run"]["pipeline"] == "demo"


def test_markdown_table_and_html_rendering_exact():
    table = markdown_table([{"a": 1, "b": 0.5, "c": "x|y"}, {"a": None, "b": float("nan"), "c": [1, 2]}], digits=2)
    assert table == "| a | b | c |\n|---|---|---|\n| 1 | 0.50 | x\\|y |\n| — | — | 1, 2 |"
    html = render_html("# T <1>\n\n" + table + "\n\n- **b** and `c`\n")
    assert "<h1>T &lt;1&gt;</h1>" in html
    assert "<tr><td>1</td><td>0.50</td><td>x|y</td></tr>" in html
    assert "<ul><li><strong>b</strong> and <code>c</code></li></ul>" in html


def _ls_slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def test_report_dose_response_slopes_and_pairs_by_hand(tmp_path):
    out = tmp_path / "dose_run"
    write_run_info(out, {"pipeline": "demo", "description": "doses", "notebooks": ["07_dose_response"],
                         "seeds": [0, 1, 2], "parameters": {}, "device": "cpu (test)", "status": "finished"})
    ctrl_cmi, ctrl_kd = [0.01, 0.012, 0.011], [0.80, 0.81, 0.82]
    mcmi = {0.1: ([0.09, 0.11, 0.10], [0.82, 0.82, 0.85]), 0.2: ([0.21, 0.19, 0.22], [0.83, 0.84, 0.84])}
    smooth = {0.1: ([0.10, 0.09, 0.11], [0.79, 0.80, 0.80]), 0.2: ([0.20, 0.21, 0.08], [0.78, 0.78, 0.70])}
    for i in SEEDS:
        rows = [{"method": "control", "dose": 0.0, "matched": True, "train_cmi": ctrl_cmi[i], "student_acc": ctrl_kd[i]}]
        for name, table in (("mcmi", mcmi), ("label_smoothing", smooth)):
            for dose, (cmis, accs) in table.items():
                rows.append({"method": name, "dose": dose, "train_cmi": cmis[i], "student_acc": accs[i],
                             "matched": abs(cmis[i] - dose) <= 0.25 * dose})
        write_results(out / f"seed_{i}", "07_dose_response", {"dose_response": rows})
    md = build_report(out)[0].read_text()
    section = md[md.index("## Dose-response"):]
    slopes = [_ls_slope([ctrl_cmi[i], mcmi[0.1][0][i], mcmi[0.2][0][i]],
                        [100 * ctrl_kd[i], 100 * mcmi[0.1][1][i], 100 * mcmi[0.2][1][i]]) for i in SEEDS]
    m, low, high = _ci(slopes, [0, 0, 0])
    assert (f"| MCMI (CMI target) | KD student accuracy (points per nat) | {m:+.2f} [{low:+.2f}, {high:+.2f}] | "
            f"{sum(max(x) - min(x) for x in zip(ctrl_cmi, mcmi[0.1][0], mcmi[0.2][0])) / 3:.3f} | rises |") in section
    assert "| method | metric | slope (95% CI) (n=3) | dose span (nats) | verdict |" in section
    # seed 2's label smoothing at 0.2 reached 0.08: unmatched, said so, and out of its slope and of the 0.2 pair
    assert "| label smoothing | 0.2 | seed 2: 0.080 |" in section
    ls = [_ls_slope([ctrl_cmi[i], smooth[0.1][0][i]] + ([smooth[0.2][0][i]] if i < 2 else []),
                    [100 * ctrl_kd[i], 100 * smooth[0.1][1][i]] + ([100 * smooth[0.2][1][i]] if i < 2 else []))
          for i in SEEDS]
    m, low, high = _ci(ls, [0, 0, 0])
    assert f"| label smoothing | KD student accuracy (points per nat) | {m:+.2f} [{low:+.2f}, {high:+.2f}] |" in section
    m, low, high = _ci([100 * a for a in mcmi[0.1][1]], [100 * a for a in smooth[0.1][1]])
    assert (f"| 0.1 | KD student accuracy (points) | {m:+.2f} [{low:+.2f}, {high:+.2f}] (n=3) | not shown | cannot "
            "exclude the paper's +3.32 |") in section
    d = [100 * (mcmi[0.2][1][i] - smooth[0.2][1][i]) for i in (0, 1)]  # two matched pairs at 0.2: no verdict
    assert f"| 0.2 | KD student accuracy (points) | {sum(d) / 2:+.2f} [" in section and \
        "] (n=2) | no verdict (two seeds) | — |" in section


def test_report_known_posterior_dose_response_by_hand(tmp_path):
    """08's dose rows: KL to P* per nat of train CMI (no ×100), and MCMI − label smoothing judged on the lower side."""
    out = tmp_path / "bayes_run"
    write_run_info(out, {"pipeline": "demo", "description": "doses", "notebooks": ["08_known_bcpd"],
                         "seeds": [0, 1, 2], "parameters": {}, "device": "cpu (test)", "status": "finished"})
    ctrl = ([0.010, 0.012, 0.011], [0.080, 0.082, 0.079])  # (train CMI, KL) per seed
    mcmi = ([0.10, 0.11, 0.09], [0.050, 0.049, 0.056])
    smooth = ([0.10, 0.09, 0.105], [0.090, 0.095, 0.088])
    for i in SEEDS:
        rows = [{"method": "control", "dose": 0.0, "matched": True, "train_cmi": ctrl[0][i], "kl_to_bayes": ctrl[1][i]}]
        rows += [{"method": name, "dose": 0.1, "matched": True, "train_cmi": c[0][i], "kl_to_bayes": c[1][i]}
                 for name, c in (("mcmi", mcmi), ("label_smoothing", smooth))]
        write_results(out / f"seed_{i}", "08_known_bcpd", {"known_bcpd": [{"teacher": "bayes", "kl_to_bayes": 0.0}],
                                                          "dose_response": rows, "bayes_train_cmi": 0.15})
    md = build_report(out)[0].read_text()
    section = md[md.index("### Dose-response on the known posterior"):]
    assert "The Bayes posterior's own train CMI: 0.150 nats." in section
    (c, cs), (k, ks) = _mean_std(mcmi[0]), _mean_std(mcmi[1])
    # the means table
    assert f"| MCMI (CMI target) | 0.1 | {c:.3f} ± {cs:.3f} | {k:.3f} ± {ks:.3f} | — |" in section
    slopes = [_ls_slope([ctrl[0][i], mcmi[0][i]], [ctrl[1][i], mcmi[1][i]]) for i in SEEDS]
    m, low, high = _ci(slopes, [0, 0, 0])
    assert high < 0 and (f"| MCMI (CMI target) | KL(P\\* ‖ teacher) on test (nats per nat) | {m:+.2f} [{low:+.2f}, "
                         f"{high:+.2f}] |") in section and "| falls |" in section
    m, low, high = _ci(mcmi[1], smooth[1])
    assert high < 0 and f"| {m:+.3f} [{low:+.3f}, {high:+.3f}] | held | — | — |" in section
    claims = md.split("## Which claims held on this data")[1].split("\n## ")[0]
    assert "- known BCPD, dose 0.1: MCMI − label smoothing, KL(P* ‖ teacher) on test (nats)" in claims
    assert (out / "figures" / "known_posterior_dose_response.png").stat().st_size > 10_000


# ---- one run folder, one configuration ----------------------------------------------------------------------------

def _recording_execute(calls):
    """A stand-in for execute_notebook that leaves results recorded with the parameters it was given."""
    def execute(name, run_dir, parameters, kernel_name="python3"):
        calls.append((name, parameters["seed"], parameters["lam"]))
        declared = {k: parameters[k] for k in ("seed", "lam", "train_size", "interactive")}
        write_results(run_dir, name, {"done": True}, {**declared, "run_dir": str(run_dir)})
        return Path(run_dir) / "notebooks" / f"{name}.ipynb"
    return execute


def test_a_run_folder_holds_one_configuration(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "execute_notebook", _recording_execute(calls))
    out, quiet = tmp_path / "run", dict(seeds=[0], jobs=1, echo=lambda line: None)
    cli.run_pipeline("smoke", out, {"lam": 0.5}, notebooks=["01_teachers", "03_distill"], **quiet)
    assert calls == [("01_teachers", 0, 0.5), ("03_distill", 0, 0.5)]
    # a partial rerun with another λ would put λ 0.9 teachers under λ 0.5 students: refused, nothing run
    with pytest.raises(ValueError, match=r"run folder .* holds a run with other settings \(lam 0.5 -> 0.9\): use "
                                         r"another --out, or --force"):
        cli.run_pipeline("smoke", out, {"lam": 0.9}, notebooks=["01_teachers"], **quiet)
    with pytest.raises(ValueError, match=r"other settings \(pipeline 'smoke' -> 'demo'"):
        cli.run_pipeline("demo", out, {"lam": 0.5}, notebooks=["01_teachers"], **quiet)
    assert len(calls) == 2
    # the same parameters resume: finished notebooks are kept, a new seed runs
    lines = []
    cli.run_pipeline("smoke", out, {"lam": 0.5}, seeds=[0, 1], notebooks=["01_teachers", "03_distill"], jobs=1,
                     echo=lines.append)
    assert calls[2:] == [("01_teachers", 1, 0.5), ("03_distill", 1, 0.5)]
    assert sum("done before with these parameters, kept" in line for line in lines) == 2
    assert json.loads((out / "run.json").read_text())["seeds"] == [0, 1]
    # --force replaces the earlier run
    cli.run_pipeline("smoke", out, {"lam": 0.9}, notebooks=["01_teachers"], force=True, **quiet)
    assert calls[4:] == [("01_teachers", 0, 0.9)] and not (out / "seed_1").exists()


def test_one_writer_per_run_folder(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(cli, "execute_notebook", _recording_execute(calls))
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.lock").write_text(f"{os.getppid()} 2026-01-01T00:00:00\n")  # a live process holds it
    with pytest.raises(ValueError, match=rf"run folder .* is being written by another mcmi-lab run \(pid "
                                         rf"{os.getppid()}\): wait for it"):
        cli.run_pipeline("smoke", out, notebooks=["01_teachers"], seeds=[0], jobs=1, echo=lambda line: None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".run.lock").write_text(f"{int(dead.stdout)} 2026-01-01T00:00:00\n")  # killed: a stale lock is taken over
    cli.run_pipeline("smoke", out, notebooks=["01_teachers"], seeds=[0], jobs=1, echo=lambda line: None)
    assert calls == [("01_teachers", 0, 0.5)] and not (out / ".run.lock").exists()


def test_the_report_flags_results_made_with_other_parameters(tmp_path):
    out = tmp_path / "mixed"
    write_run_info(out, {"pipeline": "demo", "notebooks": ["01_teachers"], "seeds": [0], "parameters": {"lam": 0.5},
                         "status": "finished"})
    write_results(out / "seed_0", "01_teachers", {"teachers": []}, {"lam": 0.9, "seed": 0, "run_dir": "x"})
    md = build_report(out)[0].read_text()
    assert "**Warning: some results were made with other parameters than this run records**" in md
    assert "seed_0/01_teachers (lam 0.5 -> 0.9)" in md  # a notebook name: "_" inside a word stays as it is


def test_a_smoke_report_says_its_numbers_mean_nothing_before_any_number(tmp_path):
    for pipeline in ("smoke", "demo"):
        out = tmp_path / pipeline
        write_run_info(out, {"pipeline": pipeline, "notebooks": ["01_teachers"], "seeds": [0], "parameters": {}})
        write_results(out / "seed_0", "01_teachers", {"teachers": []})
        head = build_report(out)[0].read_text().split("## What was run")[0]
        assert ("**⚠ A smoke run: a plumbing check" in head) == (pipeline == "smoke")


def test_the_report_names_the_data_set_and_its_classes(tmp_path):
    out = tmp_path / "own"
    write_run_info(out, {"pipeline": "demo", "notebooks": ["01_teachers"], "seeds": [0],
                         "parameters": {"dataset": "/data/digits.npz"}})
    write_results(out / "seed_0", "01_teachers", {"teachers": [], "data": {
        "name": "digits", "classes": [str(i) for i in range(10)], "train_size": 1437, "test_size": 360,
        "image": [1, 8, 8]}})
    md = build_report(out)[0].read_text()
    assert ("- data: digits (`/data/digits.npz`), 1,437 training / 360 test images of 1×8×8, 10 classes: 0, 1, 2, 3, "
            "4, 5, 6, 7, 8, 9") in md


def test_headless_widgets_draw_into_the_cell_without_a_front_end_imitation(tmp_path, monkeypatch):
    """nbclient imitates the Output widget's front end by sending on the shell channel while it awaits the cell's
    reply there, a race that hung 00_quickstart's explorer cell on an idle kernel (jupyter/nbclient#312). Our
    engine has no imitation: what an Output widget draws reaches the cell's own outputs, and nothing is sent."""
    import json

    books = tmp_path / "books"
    books.mkdir()
    _tiny_notebook(books / "w.ipynb", "import ipywidgets as w\nfrom IPython.display import display\n"
                   "out = w.Output()\ndisplay(out)\nfor i in range(50):\n    with out:\n        print('drawn', i)")
    monkeypatch.setenv(cli.NOTEBOOKS_ENV, str(books))
    executed = cli.execute_notebook("w", tmp_path / "run", {})
    cell = json.loads(executed.read_text())["cells"][-1]
    text = "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")
    assert text == "".join(f"drawn {i}\n" for i in range(50))  # nbclient's imitation kept them in the widget


# ---- issue 31: changed data, stray seed folders, odd run.json, a reused pid ---------------------------------------

def _write_ten_class_npz(path, value):
    import numpy as np
    np.savez(path, x_train=np.full((20, 4, 4), value, np.uint8), y_train=np.arange(20) % 10,
             x_test=np.full((10, 4, 4), value, np.uint8), y_test=np.arange(10))


def test_a_data_file_changed_under_the_same_path_is_refused_like_a_parameter(tmp_path, monkeypatch):
    from mcmi_lab.data.registry import data_fingerprint
    from mcmi_lab.study.runs import completed
    calls = []

    def execute(name, run_dir, parameters, kernel_name="python3"):
        calls.append(name)
        declared = {k: parameters[k] for k in ("seed", "lam", "dataset")}
        write_results(run_dir, name, {"done": True}, {**declared, "run_dir": str(run_dir)})

    monkeypatch.setattr(cli, "execute_notebook", execute)
    data, out, quiet = tmp_path / "m.npz", tmp_path / "run", dict(seeds=[0], jobs=1, echo=lambda line: None)
    _write_ten_class_npz(data, 1)
    before = data_fingerprint(str(data))
    cli.run_pipeline("smoke", out, {"dataset": str(data)}, notebooks=["01_teachers"], **quiet)
    assert json.loads((out / "run.json").read_text())["data"] == before
    meta = json.loads((out / "seed_0" / "results" / "01_teachers.json").read_text())["meta"]
    assert meta["data"] == before and before["bytes"] == data.stat().st_size and len(before["blake2b"]) == 32
    _write_ten_class_npz(data, 2)  # the same path, the same size, other images
    after = data_fingerprint(str(data))
    assert after["bytes"] == before["bytes"] and after["blake2b"] != before["blake2b"]
    assert not completed(out / "seed_0", "01_teachers", {**meta["parameters"], "seed": 0}, after)
    with pytest.raises(ValueError) as err:  # was: 01 "done before, kept" and 02 measuring it on the new images
        cli.run_pipeline("smoke", out, {"dataset": str(data)}, notebooks=["01_teachers", "02_concentration"], **quiet)
    assert str(err.value).count("\n") == 0 and f"the data at {data} changed ({before['bytes']:,} -> " in str(err.value)
    assert f"blake2b {before['blake2b'][:8]} -> {after['blake2b'][:8]})" in str(err.value)
    assert "--force" in str(err.value)
    assert calls == ["01_teachers"]
    cli.run_pipeline("smoke", out, {"dataset": str(data)}, notebooks=["01_teachers"], force=True, **quiet)
    assert calls == ["01_teachers"] * 2 and json.loads((out / "run.json").read_text())["data"] == after
    assert data_fingerprint("fashion-mnist") == {"dataset": "fashion-mnist"}  # a built-in set: by its name


def test_only_the_seeds_run_json_names_are_merged(tmp_path):
    from mcmi_lab.study.runs import collect_results, seed_dirs
    out = tmp_path / "run"
    for folder in ("seed_0", "seed_00", "seed_7"):
        write_results(out / folder, "01_teachers", {"teachers": [{"name": folder}]}, {"seed": 0})
    assert list(seed_dirs(out)) == [0, 7] and seed_dirs(out)[0].name == "seed_0"  # no run.json: exact names only
    write_run_info(out, {"pipeline": "demo", "seeds": [0], "parameters": {}})
    merged = collect_results(out)["seeds"]
    assert list(merged) == ["0"] and merged["0"]["01_teachers"]["teachers"] == [{"name": "seed_0"}]


@pytest.mark.parametrize("entry, fragment", [
    ({"seeds": "0 1"}, "'seeds' holds a str that is not accepted: expected a list of integers >= 0"),
    ({"parameters": [1]}, "'parameters' holds a list that is not accepted"),
    ({"notebooks": 3}, "'notebooks' holds a int that is not accepted"),
    ({"timings_s": []}, "'timings_s' holds a list"),
])
def test_a_run_json_with_wrong_types_is_one_line(tmp_path, capsys, monkeypatch, entry, fragment):
    out = tmp_path / "run"
    write_run_info(out, {"pipeline": "smoke", "seeds": [0], "parameters": {"lam": 0.5}, **entry})
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run.json" in err and fragment in err
    monkeypatch.setattr(cli, "execute_notebook", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ValueError, match="run.json"):
        cli.run_pipeline("smoke", out, notebooks=["01_teachers"], seeds=[0], jobs=1, echo=lambda line: None)


def test_a_lock_holding_a_reused_pid_is_taken_over_and_a_refusal_says_how_to_clear(tmp_path, monkeypatch):
    import os
    import platform
    from mcmi_lab.study.runs import _process_start
    calls = []
    monkeypatch.setattr(cli, "execute_notebook", _recording_execute(calls))
    out, quiet = tmp_path / "run", dict(notebooks=["01_teachers"], seeds=[0], jobs=1, echo=lambda line: None)
    out.mkdir()
    live, start = os.getppid(), _process_start(os.getppid())
    if start is None:
        pytest.skip("no /proc: process start times are not known here")
    (out / ".run.lock").write_text(f"{live} start={start} host={platform.node()} 2026-01-01T00:00:00\n")
    with pytest.raises(ValueError) as err:  # the writer itself still runs: refused, saying how to clear it
        cli.run_pipeline("smoke", out, **quiet)
    assert f"(pid {live}): wait for it to finish" in str(err.value)
    assert f"if no mcmi-lab run is writing it, remove {out / '.run.lock'}" in str(err.value)
    (out / ".run.lock").write_text(f"{live} start={int(start) + 1} host={platform.node()} 2026-01-01T00:00:00\n")
    cli.run_pipeline("smoke", out, **quiet)  # the pid now belongs to a process started at another time: stale
    assert calls == [("01_teachers", 0, 0.5)] and not (out / ".run.lock").exists()


def test_a_kernel_that_died_before_answering_is_started_again(monkeypatch):
    """jupyter_client's free-port race ("Address already in use" when another process starts a kernel at the same
    moment) kills a kernel before any cell runs: the notebook is started again, at most KERNEL_STARTS times in all;
    any other error, or a cell's error, is not retried."""
    calls = []

    def dies(times, error=RuntimeError("Kernel died before replying to kernel_info")):
        def execute():
            calls.append(1)
            if len(calls) <= times:
                raise error
            return "ran"
        return execute

    assert cli._start_again_if_the_kernel_never_answered(dies(cli.KERNEL_STARTS - 1)) == "ran"
    assert len(calls) == cli.KERNEL_STARTS
    calls.clear()
    with pytest.raises(RuntimeError, match="kernel_info"):
        cli._start_again_if_the_kernel_never_answered(dies(cli.KERNEL_STARTS))
    assert len(calls) == cli.KERNEL_STARTS
    calls.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        cli._start_again_if_the_kernel_never_answered(dies(1, RuntimeError("out of memory")))
    assert len(calls) == 1
