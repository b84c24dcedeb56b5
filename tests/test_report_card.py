"""The teacher report card (mcmi_lab.study.report_card): each metric against a brute-force formula on tiny logits, the
identities (Brier of a perfect predictor, KL to P* of P* itself), `mcmi-lab inspect` and its one-line errors, and the
report's "which teacher metric predicts a good student?" section on hand-made results."""
import dataclasses
import json
import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from mcmi_lab.cli import commands as cli
from mcmi_lab.training.checkpoint import save_checkpoint, save_model
from mcmi_lab.data.core import from_tensors
from mcmi_lab.models import build_model
from mcmi_lab.study.recipes import model_metrics
from mcmi_lab.report.build import build_report
from mcmi_lab.study.report_card import format_card, metric_correlations, report_card, split_card
from mcmi_lab.study.runs import write_results, write_run_info
from mcmi_lab.metrics.stats import brier_score, spearman
from mcmi_lab.data.synthetic import SyntheticTask

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 0.0],
                       [1.5, -0.5, 2.5], [0.3, 2.2, -0.7], [4.0, 0.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2, 1, 1, 2, 0, 0])


# ---- brute-force references: plain loops over samples, classes and pairs -------------------------------------------

def _softmax_rows(logits):
    rows = []
    for row in logits.tolist():
        e = [math.exp(v) for v in row]
        rows.append([v / sum(e) for v in e])
    return rows


def _brute_card(logits, labels, true_probs=None, bins=15):
    p, y, k = _softmax_rows(logits), labels.tolist(), logits.shape[1]
    n = len(y)
    acc = sum(max(range(k), key=lambda j: pi[j]) == yi for pi, yi in zip(p, y)) / n
    nll = sum(-math.log(pi[yi]) for pi, yi in zip(p, y)) / n
    ece = 0.0
    for b in range(bins):
        members = [i for i in range(n) if b / bins < max(p[i]) <= (b + 1) / bins]
        if members:
            conf = sum(max(p[i]) for i in members) / len(members)
            hit = sum(max(range(k), key=lambda j: p[i][j]) == y[i] for i in members) / len(members)
            ece += len(members) / n * abs(hit - conf)
    brier = sum(sum((pi[j] - (j == yi)) ** 2 for j in range(k)) for pi, yi in zip(p, y)) / n
    q = {c: [sum(p[i][j] for i in range(n) if y[i] == c) / y.count(c) for j in range(k)] for c in set(y)}
    kl = [sum(p[i][j] * math.log(p[i][j] / q[y[i]][j]) for j in range(k)) for i in range(n)]
    per_class = [sum(kl[i] for i in range(n) if y[i] == c) / y.count(c) if c in q else 0.0 for c in range(k)]
    gamma = sum(-sum(p[i][j] * math.log(p[m][j]) for j in range(k))
                for i in range(n) for m in range(n) if y[i] != y[m]) / n ** 2
    out = {"n": n, "accuracy": acc, "nll": nll, "ece": ece, "brier": brier, "cmi": sum(kl) / n,
           "separation": gamma, "ncmi": sum(kl) / n / gamma, "per_class_cmi": per_class}
    if true_probs is not None:
        t = true_probs.tolist()
        out["kl_to_posterior"] = sum(sum(t[i][j] * math.log(t[i][j] / p[i][j]) for j in range(k)) for i in range(n)) / n
        out["mse_to_posterior"] = sum(sum((p[i][j] - t[i][j]) ** 2 for j in range(k)) for i in range(n)) / n
    return out


def test_split_card_matches_brute_force_formulas():
    true_probs = torch.softmax(LOGITS.flip(1) * 0.7, 1)
    card, brute = split_card(LOGITS, LABELS, 3, true_probs), _brute_card(LOGITS, LABELS, true_probs)
    assert set(card) == set(brute)
    for key, value in brute.items():
        assert card[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_brier_identities():
    labels = torch.tensor([0, 3, 1, 2, 3])
    assert brier_score(torch.nn.functional.one_hot(labels, 4).double(), labels) == 0.0
    assert brier_score(torch.full((5, 4), 0.25), labels) == pytest.approx(3 / 4)  # (K − 1) / K for the uniform
    worst = torch.nn.functional.one_hot((labels + 1) % 4, 4).double()
    assert brier_score(worst, labels) == 2.0
    with pytest.raises(ValueError, match="targets of shape"):
        brier_score(worst, labels[:3])


def test_spearman_matches_scipy_with_ties_and_monotone_is_one():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 5, (30,), generator=g).tolist(), torch.randint(0, 7, (30,), generator=g).tolist()
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3, 10], [0.1, 0.5, 0.7, 0.9]) == 1.0
    assert spearman([1, 2, 3, 10], [9, 5, 2, -1]) == -1.0
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))


# ---- report_card on a model -----------------------------------------------------------------------------------

class BayesModel(nn.Module):
    """The synthetic task's Bayes logits (float64) of the raw images behind the normalised batches: P = P*."""

    def __init__(self, task: SyntheticTask, data):
        super().__init__()
        self.task, self.dummy = task, nn.Parameter(torch.zeros(()))  # a parameter: predict reads the device from it
        self.mean, self.std = data.mean[0], data.std[0]

    def forward(self, x):
        return self.task.logits(x.double() * self.std + self.mean) + 0 * self.dummy


def test_card_of_the_bayes_posterior_has_zero_kl_and_mse():
    task = SyntheticTask(num_classes=4, size=8)
    train, test = task.sample(120, seed=0), task.sample(60, seed=1)
    test = dataclasses.replace(test, mean=train.mean, std=train.std)  # each sample() has its own statistics
    card = report_card(BayesModel(task, train), train, test, posterior=task.posterior)
    for split in ("train", "test"):  # zero up to the float32 rounding of the normalised batches
        assert card[split]["kl_to_posterior"] == pytest.approx(0.0, abs=1e-9)
        assert card[split]["mse_to_posterior"] == pytest.approx(0.0, abs=1e-9)
    assert card["model"] == {"name": "BayesModel"} and card["train"]["n"] == 120
    assert "KL(P* ‖ P)" in format_card(card)


def test_card_is_one_pass_per_split_and_model_metrics_carry_brier_and_gamma():
    torch.manual_seed(0)
    model = build_model("cnn_tiny", 3, 1, width=4).eval()
    g = torch.Generator().manual_seed(1)
    train = from_tensors(torch.rand(50, 1, 10, 10, generator=g), torch.arange(50) % 3, ["cat", "dog", "owl"])
    test = from_tensors(torch.rand(30, 1, 10, 10, generator=g), torch.arange(30) % 3, ["cat", "dog", "owl"])
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    card = report_card(model, train, test)
    hook.remove()
    assert sum(seen) == 50 + 30  # every sample of each split through the model once
    assert "kl_to_posterior" not in card["test"] and "KL(P*" not in format_card(card)
    row = model_metrics(model, train, test)
    assert row["test_brier"] == pytest.approx(card["test"]["brier"], rel=1e-6)
    assert row["train_separation"] == pytest.approx(card["train"]["separation"], rel=1e-6)
    assert row["test_separation"] == pytest.approx(card["test"]["separation"], rel=1e-6)
    assert row["train_cmi"] == pytest.approx(card["train"]["cmi"], rel=1e-5)
    text = format_card(card)
    for words in ("accuracy", "NLL", "ECE", "Brier score", "CMI I(X; Ŷ | Y)", "separation Γ", "NCMI", "nats",
                  "ratio", "per-class CMI", "\nowl "):
        assert words in text


# ---- mcmi-lab inspect --------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_model(tmp_path / "model.pt", build_model("cnn_tiny", 10, 1, width=4))


def test_inspect_prints_and_writes_the_card(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cards" / "card.json"
    rc = cli.main(["inspect", str(tiny_checkpoint), "--data", "synthetic", "--train-size", "200", "--test-size",
                   "100", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "teacher report card: cnn_tiny" in printed and "200 train and 100 test samples" in printed
    assert "KL(P* ‖ P), Bayes posterior to model" in printed and "squared error to P*" in printed
    card = json.loads(out.read_text())
    assert card["train"]["n"] == 200 and card["test"]["n"] == 100 and card["data"] == "synthetic"
    assert card["test"]["kl_to_posterior"] > 0 and len(card["test"]["per_class_cmi"]) == 10
    assert f"{100 * card['test']['accuracy']:.2f}" in printed


def test_inspect_reads_a_path_data_set(tmp_path, capsys):
    import numpy as np
    torch.manual_seed(0)
    path = save_model(tmp_path / "m.pt", build_model("cnn_tiny", 3, 1, width=4))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x_train=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8),
             y_train=np.arange(30) % 3, x_test=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8),
             y_test=np.arange(12) % 3)
    assert cli.main(["inspect", str(path), "--data", str(tmp_path / "mine.npz")]) == 0
    printed = capsys.readouterr().out
    assert "30 train and 12 test samples" in printed and "KL(P*" not in printed


def _one_error_line(capsys, argv) -> str:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    line = captured.err.strip()
    assert "\n" not in line and line.startswith("mcmi-lab: error: ")
    return line


def test_inspect_bad_inputs_are_one_line(tiny_checkpoint, tmp_path, capsys):
    ok = ["--data", "synthetic", "--train-size", "50", "--test-size", "50"]
    line = _one_error_line(capsys, ["inspect", str(tmp_path / "nope.pt"), *ok])
    assert "does not exist" in line and "model.pt written by `mcmi-lab train`" in line
    not_model = save_checkpoint(tmp_path / "state.pt", step=3)
    line = _one_error_line(capsys, ["inspect", str(not_model), *ok])
    assert "has no model spec" in line and "expected a model.pt" in line
    (tmp_path / "cut.pt").write_bytes(tiny_checkpoint.read_bytes()[:200])  # a truncated file
    assert "could not be read" in _one_error_line(capsys, ["inspect", str(tmp_path / "cut.pt"), *ok])
    line = _one_error_line(capsys, ["inspect", str(tiny_checkpoint), "--data", "mnist-ish"])
    assert "'mnist-ish' is not known" in line and "fashion-mnist" in line and "synthetic" in line
    for name, classes, channels in (("rgb.pt", 10, 3), ("five.pt", 5, 1)):
        path = save_model(tmp_path / name, build_model("cnn_tiny", classes, channels, width=4))
        line = _one_error_line(capsys, ["inspect", str(path), *ok])
        assert f"(cnn_tiny: {channels} channel(s), {classes} classes) does not fit --data synthetic" in line
        assert "(1 channel(s), 10 classes): expected a data set with " \
               f"{channels}-channel images and {classes} classes" in line
    line = _one_error_line(capsys, ["inspect", str(tiny_checkpoint), "--data", "synthetic", "--train-size", "0"])
    assert "--train-size=0 is not accepted" in line


def test_inspect_odd_checkpoints_are_one_line(tiny_checkpoint, tmp_path, capsys):
    """Issue 31: each of these was a traceback (AttributeError, TypeError, a 62-line RuntimeError) or a card of NaN."""
    ok = ["--data", "synthetic", "--train-size", "50", "--test-size", "50"]
    state = torch.load(tiny_checkpoint, weights_only=True)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holds a list, not a dict" in _one_error_line(capsys, ["inspect", str(tmp_path / "list.pt"), *ok])
    assert "holds a Tensor, not a dict" in _one_error_line(capsys, ["inspect", str(tmp_path / "tensor.pt"), *ok])
    torch.save({**state, "spec": {**state["spec"], "name": ["cnn_tiny"]}}, tmp_path / "name.pt")
    line = _one_error_line(capsys, ["inspect", str(tmp_path / "name.pt"), *ok])
    assert "model spec that is not accepted (name ['cnn_tiny']" in line and "expected a model name" in line
    torch.save({**state, "model": {k: v.tolist() for k, v in state["model"].items()}}, tmp_path / "lists.pt")
    line = _one_error_line(capsys, ["inspect", str(tmp_path / "lists.pt"), *ok])
    assert "holds weights that are not tensors" in line and ": list ...): expected a state_dict of tensors" in line
    for temperature in (0.0, float("nan"), -1.0, "2"):
        torch.save({**state, "temperature": temperature}, tmp_path / "t.pt")
        line = _one_error_line(capsys, ["inspect", str(tmp_path / "t.pt"), *ok])
        assert f"holds the temperature {temperature!r}: expected a finite number > 0" in line
    torch.save({**state, "temperature": torch.tensor(2.0)}, tmp_path / "t.pt")
    assert cli.main(["inspect", str(tmp_path / "t.pt"), *ok]) == 0
    assert "temperature-scaled T = 2" in capsys.readouterr().out


def test_inspect_a_truncated_npz_is_one_line(tiny_checkpoint, tmp_path, capsys):
    import numpy as np
    np.savez(tmp_path / "whole.npz", x_train=np.zeros((30, 8, 8), np.uint8), y_train=np.arange(30) % 10,
             x_test=np.zeros((10, 8, 8), np.uint8), y_test=np.arange(10))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) - 100])
    line = _one_error_line(capsys, ["inspect", str(tiny_checkpoint), "--data", str(tmp_path / "cut.npz")])
    assert "cut.npz is not a readable .npz (BadZipFile" in line


# ---- which teacher metric predicts a good student? -------------------------------------------------------------------

def _rows(seed: int) -> list[dict]:
    """Four teachers: test_acc rises with the student, test_nll falls, test_ece has ranks (1, 3, 2, 4) in seed 0."""
    student = [0.70, 0.72, 0.75, 0.80]
    ece = [[0.1, 0.3, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4]][seed]
    rows = [{"method": "control" if i == 0 else "mcmi", "dose": 0.1 * i, "matched": True, "train_cmi": 0.01 + 0.1 * i,
             "test_acc": 0.8 + 0.01 * i + 0.001 * seed, "test_nll": 0.5 - 0.05 * i, "test_ece": ece[i],
             "student_acc": student[i] + 0.01 * seed, "zero_shot_omitted_acc": 0.0 if seed == 2 else 0.1 * i}
            for i in range(4)]
    return rows + [dict(rows[-1])]  # a teacher recorded at two doses: counted once


def test_metric_correlations_by_hand():
    found = {c["teacher"]: c for c in metric_correlations({s: _rows(s) for s in range(3)})
             if c["student"] == "student_acc"}
    assert found["test_acc"]["mean"] == 1.0 and found["test_acc"]["low"] == found["test_acc"]["high"] == 1.0
    assert found["test_nll"]["mean"] == -1.0 and found["test_nll"]["n"] == 3
    assert found["test_acc"]["teachers"] == (4, 4)  # the repeated row counts once
    zero = metric_correlations({s: _rows(s) for s in range(3)}, ["test_acc"], ["zero_shot_omitted_acc"])
    assert zero[0]["per_seed"] == {0: 1.0, 1: 1.0} and zero[0]["n"] == 2  # seed 2 is constant: no ρ
    rhos = [0.8, 1.0, 0.8]  # 1 − 6 Σd² / (n(n² − 1)) with Σd² = 2, n = 4
    assert found["test_ece"]["per_seed"] == pytest.approx(dict(enumerate(rhos)))
    mean = sum(rhos) / 3
    half = T_975_DF2 * math.sqrt(sum((r - mean) ** 2 for r in rhos) / 2) / math.sqrt(3)
    assert found["test_ece"]["mean"] == pytest.approx(mean)
    assert found["test_ece"]["low"] == pytest.approx(mean - half) and found["test_ece"]["high"] == 1.0  # clipped


def test_report_section_on_a_hand_made_run(tmp_path):
    out = tmp_path / "run"
    write_run_info(out, {"pipeline": "demo", "description": "card", "notebooks": ["07_dose_response"],
                         "seeds": [0, 1, 2], "parameters": {}, "device": "cpu (test)", "status": "finished"})
    for s in range(3):
        write_results(out / f"seed_{s}", "07_dose_response", {"dose_response": _rows(s)})
    md = build_report(out)[0].read_text()
    section = md[md.index("## Which teacher metric predicts a good student?"):]
    assert "### Dose-response teachers (07): n = 4 teachers per seed, 3 seed(s)" in section
    # test accuracy and train CMI order the teachers identically in every seed: they share one row
    assert ("| test accuracy = train CMI (same ranks) | +1.00 [+1.00, +1.00] | +1.00 [+1.00, +1.00] (n=2 seeds) |"
            in section)
    assert "| test NLL | -1.00 [-1.00, -1.00] | -1.00 [-1.00, -1.00] (n=2 seeds) |" in section  # seed 2: all at 0%
    assert ("- KD student accuracy: largest |ρ| test accuracy (ρ = +1.00 [+1.00, +1.00]; interval excludes 0)"
            in section)
