"""The explorers' plain functions (mcmi_lab.explorers.explore, mcmi_lab.explorers.results) on tiny teachers and a hand-written
run folder, and the ipywidgets layer calling them (no browser: tests/test_browser.py drives JupyterLab)."""
import math

import numpy
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from conftest import random_images, tiny_cnn
from mcmi_lab.figures.cam import eigen_cams
from mcmi_lab.metrics.cmi import class_centroids, kl_to_centroids, per_class_cmi
from mcmi_lab.training.evaluate import predict
from mcmi_lab.explorers.explore import (ALL_CLASSES, class_order, concentration_figure, prepare_explore, select_images,
                              teacher_figure)
from mcmi_lab.explorers.results import (available_views, load_run_results, results_figure, results_table,
                                      view_choices, zero_shot_confusions)
from mcmi_lab.figures.plots import METHOD_STYLES, dose_points
from mcmi_lab.study.runs import write_results

K = 4
NAMES = ("mll", "control", "mcmi")
T_975_DF1 = 12.706204736174698  # Student-t 97.5% quantile, 1 degree of freedom


@pytest.fixture(scope="module")
def data():
    return random_images(n=40, k=K, size=12, seed=3)


@pytest.fixture(scope="module")
def teachers():
    out = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(10 + i)
        out[name] = tiny_cnn(num_classes=K, width=4).eval()
    return out


@pytest.fixture(scope="module")
def explore(teachers, data):
    return prepare_explore(teachers, data, temperature=4.0)


def _direct_logits(model, data):
    with torch.no_grad():
        return model.eval()(data.normalize(data.images)).double()


# ---- prepare_explore ------------------------------------------------------------------------------------------------

def test_prepare_keeps_the_softmax_the_centroids_and_the_kl(explore, teachers, data):
    for name, model in teachers.items():
        logits = _direct_logits(model, data)
        torch.testing.assert_close(explore.probs[name], torch.softmax(logits, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(explore.probs_kd[name], torch.softmax(logits / 4.0, 1), rtol=0, atol=1e-6)
        centroids = class_centroids(explore.probs[name], data.labels, K)
        assert torch.equal(explore.centroids[name], centroids)
        assert torch.equal(explore.kl[name], kl_to_centroids(explore.probs[name], data.labels, centroids))
        # the class means of the KL shown are the per-class CMI
        means = torch.stack([explore.kl[name][data.labels == c].mean() for c in range(K)])
        torch.testing.assert_close(means, per_class_cmi(explore.probs[name], data.labels, K), rtol=0, atol=1e-12)
    assert torch.equal(explore.labels, data.labels)


def test_prepare_takes_a_notebooks_own_predict_pass(explore, teachers, data):
    outputs = {name: predict(model, data) for name, model in teachers.items()}
    again = prepare_explore(teachers, data, 4.0, outputs=outputs)
    for name in NAMES:
        assert torch.equal(again.logits[name], outputs[name][0]) and torch.equal(again.kl[name], explore.kl[name])


def test_prepare_refuses_bad_input_in_one_line(teachers, data):
    with pytest.raises(ValueError, match=r"^teachers=\{\} is not accepted: expected a non-empty dict name -> model$"):
        prepare_explore({}, data)
    with pytest.raises(ValueError, match="teacher 'mll' of type str is not accepted: expected a torch model"):
        prepare_explore({"mll": "mll.pt"}, data)
    with pytest.raises(ValueError, match="data of type list is not accepted: expected a non-empty ImageData"):
        prepare_explore(teachers, [1, 2])
    wrong = {"mll": (torch.zeros(3, K), torch.zeros(3, dtype=torch.long))}
    with pytest.raises(ValueError, match=r"outputs\['mll'\] of shape \(3, 4\) is not accepted"):
        prepare_explore(teachers, data, outputs=wrong)


def test_select_images_by_class_disagreement_and_error(explore, data):
    preds = {n: explore.logits[n].argmax(1).tolist() for n in NAMES}
    labels = data.labels.tolist()
    disagree = [i for i in range(len(labels)) if len({preds[n][i] for n in NAMES}) > 1]
    wrong = [i for i in range(len(labels)) if any(preds[n][i] != labels[i] for n in NAMES)]
    assert select_images(explore).tolist() == list(range(len(labels)))
    assert select_images(explore, 2).tolist() == [i for i in range(len(labels)) if labels[i] == 2]
    assert select_images(explore, among="disagree").tolist() == disagree
    assert select_images(explore, 1, "misclassified").tolist() == [i for i in wrong if labels[i] == 1]
    with pytest.raises(ValueError, match="among='wrong' is not accepted: expected one of 'all', 'disagree'"):
        select_images(explore, among="wrong")
    with pytest.raises(ValueError, match="label"):
        select_images(explore, K)


# ---- teacher_figure -------------------------------------------------------------------------------------------------

def _panel(fig, row, col, ncols):
    return fig.axes[row * ncols + col]


@pytest.mark.parametrize("log", [False, True])
def test_teacher_figure_draws_the_softmax_the_centroid_and_the_kl(explore, teachers, data, log):
    index, names = 5, ["mll", "mcmi"]
    fig = teacher_figure(explore, index, names, log=log, cam=False)
    assert isinstance(fig, Figure)
    true = int(data.labels[index])
    for j, name in enumerate(names, start=1):
        logits = _direct_logits(teachers[name], data)[index]
        for row, probs in ((1, torch.softmax(logits, 0)), (2, torch.softmax(logits / 4.0, 0))):
            bars = _panel(fig, row, j, 1 + len(names)).patches
            ends = torch.tensor([b.get_x() + b.get_width() for b in bars], dtype=torch.float64)
            torch.testing.assert_close(ends, probs, rtol=0, atol=1e-6)  # a bar ends at the model's softmax
            assert bars[true].get_facecolor()[:3] == (0.0, 0.0, 0.0)  # the true class in black
            other = next(b for c, b in enumerate(bars) if c != true)  # the others in the teacher's own colour
            assert to_hex(other.get_facecolor()) == METHOD_STYLES[name]["color"]
        ticks = _panel(fig, 1, j, 1 + len(names)).lines[0].get_xdata()
        expected = explore.centroids[name][true].clamp_min(_panel(fig, 1, 1, 3).get_xlim()[0] if log else 0.0)
        torch.testing.assert_close(torch.as_tensor(ticks, dtype=torch.float64), expected, rtol=0, atol=0)
        kl = float(kl_to_centroids(explore.probs[name], data.labels, explore.centroids[name])[index])
        assert f"KL(P_x ‖ Q_y) = {kl:.3g} nats" in _panel(fig, 0, j, 1 + len(names)).texts[0].get_text()
    shared = _panel(fig, 1, 1, 3)
    assert all(shared.get_shared_x_axes().joined(shared, _panel(fig, r, c, 3)) for r in (1, 2) for c in (1, 2))
    assert shared.get_xscale() == ("log" if log else "linear")


def test_teacher_figure_overlays_each_teachers_eigen_cam_once(explore, teachers, data):
    fig = teacher_figure(explore, 7, list(NAMES))
    for j, name in enumerate(NAMES, start=1):
        drawn = torch.as_tensor(numpy.asarray(_panel(fig, 0, j, 4).images[1].get_array()))
        expected = eigen_cams(teachers[name], data.normalize(data.images[7:8]))[0]
        torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
        assert explore.cams[name, 7] is not None
    cached = explore.cams["mll", 7]
    teacher_figure(explore, 7, ["mll"])
    assert explore.cams["mll", 7] is cached  # an image's maps are computed once


def test_teacher_figure_refuses_unknown_teachers_and_indices(explore):
    with pytest.raises(ValueError, match="^teacher 'nope' is not accepted: expected one of mll, control, mcmi$"):
        teacher_figure(explore, 0, ["mll", "nope"])
    with pytest.raises(ValueError, match=r"^teachers=\[\] is not accepted"):
        teacher_figure(explore, 0, [])
    with pytest.raises(ValueError, match="index=40 is not accepted"):
        teacher_figure(explore, 40)


# ---- concentration_figure -------------------------------------------------------------------------------------------

def test_concentration_figure_shows_the_class_kl_centroid_and_one_projection(explore, data):
    label = 1
    members = (data.labels == label).nonzero().flatten()
    point = int(members[2])
    fig = concentration_figure(explore, label, point=point)
    assert isinstance(fig, Figure)
    ncols = 1 + len(NAMES)
    for j, name in enumerate(NAMES, start=1):
        hist = _panel(fig, 0, j, ncols)
        assert sum(p.get_height() for p in hist.patches) == len(members)
        mean_line, point_line = hist.lines[0], hist.lines[1]
        assert mean_line.get_xdata()[0] == pytest.approx(float(per_class_cmi(explore.probs[name], data.labels,
                                                                               K)[label]), abs=1e-12)
        assert point_line.get_xdata()[0] == float(explore.kl[name][point])
        bars = _panel(fig, 1, j, ncols)
        heights = torch.tensor([p.get_height() for p in bars.patches], dtype=torch.float64)
        assert torch.equal(heights, explore.centroids[name][label])
        assert torch.equal(torch.as_tensor(bars.lines[0].get_ydata()), explore.probs[name][point])
        scatter = _panel(fig, 2, j, ncols)
        assert len(scatter.collections[0].get_offsets()) == len(members)
    first = _panel(fig, 2, 1, ncols)
    assert all(first.get_shared_x_axes().joined(first, _panel(fig, 2, j, ncols)) for j in (2, 3))
    assert first.get_xlim() == _panel(fig, 2, 3, ncols).get_xlim()
    other = int((data.labels != label).nonzero()[0])
    with pytest.raises(ValueError, match=f"^point={other} is not accepted: image {other} is of class"):
        concentration_figure(explore, label, point=other)
    logged = concentration_figure(explore, label, ["control"], log=True)
    assert sum(p.get_height() for p in logged.axes[1].patches) == len(members)  # a KL below the axis still counts
    assert logged.axes[1].get_xscale() == "log"


def test_class_order_by_kl(explore, data):
    order = class_order(explore, 2, "mcmi")
    kl = explore.kl["mcmi"][order]
    assert set(order.tolist()) == set((data.labels == 2).nonzero().flatten().tolist())
    assert bool((kl[:-1] >= kl[1:]).all())
    with pytest.raises(ValueError, match="label=-1 is not accepted here"):
        class_order(explore, ALL_CLASSES)


# ---- a finished run's results -----------------------------------------------------------------------------------------

CLASSES = ["a", "b", "c", "d"]
STUDENT = {"0": {"mll": 0.70, "mcmi": 0.74}, "1": {"mll": 0.72, "mcmi": 0.73}}


def _confusion(seed: int, teacher: str) -> list[list[int]]:
    cm = [[0] * K for _ in range(K)]
    for c in range(K):
        right = 5 if c != 3 else (seed + 1 + (teacher == "mcmi"))
        cm[c][c] = right
        cm[c][(c + 1) % K] = 10 - right
    return cm


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as mcmi-lab run leaves it: seed_0 and seed_1 with the results files of 01, 03, 06 and 07."""
    out = tmp_path_factory.mktemp("run")
    for seed in (0, 1):
        run_dir = out / f"seed_{seed}"
        params = {"seed": seed}
        write_results(run_dir, "01_teachers", {"teachers": [
            {"teacher": t, "test_acc": 0.8 + 0.01 * i + 0.02 * seed, "train_cmi": 0.1 * i + seed / 100,
             "test_cmi": 0.2, "test_ncmi": 0.05, "test_ece": 0.03} for i, t in enumerate(("mll", "control", "mcmi"))]},
                      params)
        write_results(run_dir, "03_distill", {"students": [
            {"teacher": t, "method": m, "student_acc": STUDENT[str(seed)][t] + (0.01 if m == "dkd" else 0.0)}
            for t in ("mll", "mcmi") for m in ("kd", "dkd")]}, params)
        write_results(run_dir, "06_zero_shot", {"classes": CLASSES, "zero_shot": [
            {"teacher": t, "omitted": [3], "student_acc": 0.6, "omitted_acc": {"3": _confusion(seed, t)[3][3] / 10},
             "confusion": _confusion(seed, t)} for t in ("control", "mcmi")]}, params)
        write_results(run_dir, "07_dose_response", {"dose_response": [
            {"method": "control", "dose": 0.0, "seed": seed, "train_cmi": 0.01, "test_acc": 0.9, "student_acc": 0.7,
             "matched": True},
            {"method": "mcmi", "dose": 0.1, "seed": seed, "train_cmi": 0.1 + seed / 100, "test_acc": 0.88,
             "student_acc": 0.72 + seed / 100, "matched": True},
            {"method": "label_smoothing", "dose": 0.1, "seed": seed, "train_cmi": 0.3, "test_acc": 0.85,
             "matched": False}]}, params)
    return out


def test_load_run_results_reads_a_run_and_a_single_run_dir(run):
    results = load_run_results(run)
    assert sorted(results["seeds"]) == ["0", "1"]
    single = load_run_results(run / "seed_1")
    assert list(single["seeds"]) == ["1"] and set(single["seeds"]["1"]) == {"01_teachers", "03_distill",
                                                                           "06_zero_shot", "07_dose_response"}
    assert available_views(results) == ["teacher_test_acc", "teacher_train_cmi", "teacher_test_cmi",
                                        "teacher_test_ncmi", "teacher_test_ece", "student_acc", "zero_shot_acc",
                                        "zero_shot_omitted_acc", "dose_response", "zero_shot_confusion"]


def test_load_run_results_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(ValueError, match=r"^run_dir='.*' is not accepted: it holds no results; expected "
                                         r"seed_<n>/results/\*\.json"):
        load_run_results(tmp_path)
    with pytest.raises(ValueError, match="is not accepted: no such folder"):
        load_run_results(tmp_path / "missing")


def test_results_table_gives_seeds_means_and_t_intervals(run):
    rows = results_table(run, "student_acc", teachers=["mcmi"], methods=["kd"])
    assert len(rows) == 1 and rows[0]["teacher"] == "mcmi" and rows[0]["method"] == "kd"
    a, b = 74.0, 73.0
    assert rows[0]["values"] == pytest.approx({"0": a, "1": b}, abs=1e-9)
    half = T_975_DF1 * (abs(a - b) / math.sqrt(2)) / math.sqrt(2)
    assert (rows[0]["mean"], rows[0]["low"], rows[0]["high"], rows[0]["n"]) == pytest.approx(
        ((a + b) / 2, (a + b) / 2 - half, (a + b) / 2 + half, 2), abs=1e-9)
    every = results_table(run, "student_acc")
    assert [(r["method"], r["teacher"]) for r in every] == [("kd", "mll"), ("kd", "mcmi"), ("dkd", "mll"),
                                                           ("dkd", "mcmi")]
    cmi = results_table(run, "teacher_train_cmi")
    assert [r["mean"] for r in cmi] == pytest.approx([0.005, 0.105, 0.205], abs=1e-12)
    omitted = results_table(run, "zero_shot_omitted_acc", teachers=["mcmi"])
    assert omitted[0]["values"] == pytest.approx({"0": 20.0, "1": 30.0}) and omitted[0]["omitted"] == [3]


def test_zero_shot_confusions_are_pooled_over_seeds(run):
    pooled = zero_shot_confusions(run, [3])
    for t in ("control", "mcmi"):
        assert pooled[t].tolist() == (torch.tensor(_confusion(0, t)) + torch.tensor(_confusion(1, t))).tolist()
    rows = {r["teacher"]: r for r in results_table(run, "zero_shot_confusion")}
    assert rows["mcmi"]["omitted_acc"] == pytest.approx(100 * (2 + 3) / 20) and rows["mcmi"]["n"] == 2
    with pytest.raises(ValueError, match=r"omitted=\[1\] is not accepted: the run's zero-shot sets are \[\(3,\)\]"):
        zero_shot_confusions(run, [1])


def test_dose_view_uses_dose_points_and_leaves_unmatched_doses_out(run):
    rows = results_table(run, "dose_response")
    flat = [r for s in load_run_results(run)["seeds"].values() for r in s["07_dose_response"]["dose_response"]
            if r["matched"]]
    mcmi = dose_points(flat, "student_acc")["mcmi"][0]
    row = next(r for r in rows if r["metric"] == "student_acc" and r["method"] == "mcmi")
    assert (row["mean"], row["train_cmi"], row["n"]) == (mcmi["y"], mcmi["x"], 2)
    assert not any(r["method"] == "label_smoothing" for r in rows)
    assert view_choices(run, "dose_response") == {"teachers": [], "methods": ["control", "mcmi", "label_smoothing"]}


def test_results_figure_of_every_view_draws_the_seeds_and_means(run):
    for view in available_views(run):
        assert isinstance(results_figure(run, view), Figure), view
    fig = results_figure(run, "student_acc", teachers=["mll"], methods=["dkd"])
    ax = fig.axes[0]
    dots = [line for line in ax.lines if line.get_linestyle() == "None" and line.get_marker() == "."]
    assert sorted(dots[0].get_ydata()) == pytest.approx([71.0, 73.0])
    assert "95% interval over 2 seeds" in ax.get_title()
    means = [line for line in ax.lines if line.get_marker() == METHOD_STYLES["mll"]["marker"]]  # its own marker
    assert means and {to_hex(line.get_color()) for line in means} == {METHOD_STYLES["mll"]["color"]}
    confusion = results_figure(run, "zero_shot_confusion", teachers=["mcmi"])
    assert "omitted classes: 25.0% correct" in confusion.axes[0].get_title()
    red = [t.get_text() for t in confusion.axes[0].get_yticklabels() if t.get_color() == "red"]
    assert red == ["d"]


def test_results_refuse_unknown_views_teachers_and_methods(run):
    with pytest.raises(ValueError, match="^view 'ece' is not accepted: expected one of teacher_test_acc"):
        results_figure(run, "ece")
    with pytest.raises(ValueError, match="^teacher 'lsr' is not accepted for view 'student_acc': expected one of "
                                         "mll, mcmi$"):
        results_figure(run, "student_acc", teachers=["lsr"])
    with pytest.raises(ValueError, match="methods=.* is not accepted for view 'teacher_test_acc'"):
        results_table(run, "teacher_test_acc", methods=["kd"])
    with pytest.raises(ValueError, match="view 'few_shot_acc' is not accepted for this run: it holds no "
                                         "05_few_shot results"):
        results_table(run, "few_shot_acc")


# ---- the widgets call the same functions --------------------------------------------------------------------------------

def test_explorers_redraw_through_the_plain_functions(explore, run):
    pytest.importorskip("ipywidgets")
    from mcmi_lab.explorers.widgets import concentration_explorer, results_explorer, teacher_explorer

    box = teacher_explorer(explore)
    label, among, pick = box.children[0].children
    index = box.children[1].children[0]
    index.value = 9  # a data index: that image among all images
    assert (label.value, among.value, pick.value) == (-1, "all", 9)
    bars = _panel(box.figure, 1, 1, 4).patches
    assert [b.get_x() + b.get_width() for b in bars] == pytest.approx(explore.probs["mll"][9].tolist(), abs=1e-12)
    label.value = 2
    assert index.value == int(select_images(explore, 2)[0])

    box = concentration_explorer(explore)
    box.children[0].children[0].value = 3  # class
    first = int(class_order(explore, 3, "mcmi")[0])  # ordered by the MCMI teacher's KL, largest first
    assert box.children[1].children[2].value == f"data index {first}"
    assert _panel(box.figure, 0, 1, 4).lines[1].get_xdata()[0] == float(explore.kl["mll"][first])

    box = results_explorer(run)
    view, (teachers, methods, omitted) = box.children[0], box.children[1].children
    view.value = "student_acc"
    assert teachers.value == ("mll", "mcmi") and methods.value == ("kd", "dkd")
    methods.value = ("dkd",)
    assert [t.get_text() for t in box.figure.axes[0].get_xticklabels()] == ["dkd"]
    view.value = "zero_shot_confusion"
    assert omitted.value == (3,) and methods.disabled
    assert results_explorer(run, view="dose_response").children[0].value == "dose_response"
    with pytest.raises(ValueError, match="^view='few_shot_acc' is not accepted for this run: expected one of "):
        results_explorer(run, view="few_shot_acc")
