"""`mcmi-lab train` runs every recipe: each KD method, its hyper-parameters, and the MCMI dose (--target-cmi)."""
import json
import re

import pytest

from mcmi_lab.cli import commands as cli
from mcmi_lab.training.checkpoint import load_model, save_model
from mcmi_lab.kd import KD_METHODS
from mcmi_lab.models import build_model
from mcmi_lab.utils import set_seed

TINY = ["--data", "synthetic", "--subset", "40", "--eval-subset", "20", "--epochs", "1", "--batch-size", "20",
        "--precision", "fp32"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    set_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    save_model(path, build_model("cnn_tiny", 10, 1, width=4))
    return path


@pytest.mark.parametrize("method", sorted(KD_METHODS))
def test_every_kd_method_trains_through_the_command_line(method, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--objective", "kd", "--method", method, "--teacher", str(teacher), "--model", "cnn_tiny",
            "--width", "4", *TINY, "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["objective"] == "kd"
    assert len(results["history"]) == 1 and results["config"]["epochs"] == 1 and results["config"]["batch_size"] == 20
    assert load_model(out / "model.pt").spec["name"] == "cnn_tiny"


def test_hparam_reaches_the_method_and_an_unknown_one_is_one_line(teacher, tmp_path, capsys):
    argv = ["train", "--objective", "kd", "--method", "at", "--hparam", "beta", "250", "--hparam", "p", "4",
            "--teacher", str(teacher), "--model", "cnn_tiny", "--width", "4", *TINY]
    assert cli.main([*argv, "--out", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert results["args"]["hparam"] == [["beta", "250"], ["p", "4"]]
    capsys.readouterr()
    assert cli.main([*argv, "--hparam", "gamma", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err == ("mcmi-lab: error: --hparam gamma 1 is not accepted for --method at: expected one of beta, p, "
                   "ce_weight, kd_weight, student_layers, teacher_layers (the temperature is --temperature)"), err


def test_target_cmi_trains_mcmi_by_dose_and_logs_lambda(teacher, tmp_path, capsys):
    out = tmp_path / "dose"
    argv = ["train", "--objective", "mcmi", "--target-cmi", "0.2", "--teacher", str(teacher), *TINY,
            "--epochs", "2", "--out", str(out)]
    with pytest.warns(UserWarning, match=r"did not reach train CMI 0.2 within ±25%: it reached"):
        assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["target_cmi"] == 0.2 and results["args"]["lam"] is None
    assert [len(r) > 0 for r in results["history"]] == [True, True]
    assert all(r["lam"] >= 0 for r in results["history"])  # λ per epoch, in the history
    assert results["config"]["schedule"] == "cosine" and results["config"]["epochs"] == 2  # the recipe's schedule


@pytest.mark.parametrize("extra, match", [
    (["--objective", "mcmi", "--hparam", "temperatures", "[1]"], r"--hparam temperatures \[1\] is not accepted for "
                                                                 r"--objective mcmi: expected one of ema_decay"),
    (["--target-cmi", "0.1"], r"--target-cmi is not accepted with --objective mll: it sets the dose of --objective "
                              r"mcmi"),
    (["--objective", "mcmi", "--target-cmi", "3"], r"target_cmi=3.0 is not accepted: expected a number in \(0, log K\)"),
])
def test_bad_doses_are_one_line(extra, match, teacher, tmp_path, capsys):
    argv = ["train", *TINY, "--out", str(tmp_path / "run"), *extra]
    if "mcmi" in extra:
        argv += ["--teacher", str(teacher)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_lam_and_target_cmi_are_exclusive(teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--objective", "mcmi", "--lam", "0.5", "--target-cmi", "0.1", "--teacher", str(teacher),
                  "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --target-cmi: not allowed with argument --lam" in capsys.readouterr().err
