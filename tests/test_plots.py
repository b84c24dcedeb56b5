"""Figures: each function returns a Figure on tiny inputs without a display, plots the right numbers, saves atomically;
the CAM explorer widget builds and redraws without a frontend."""
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from mcmi_lab.figures import plots
from mcmi_lab.data.core import from_tensors

CLASSES = ["tee", "bag", "boot"]


def test_save_is_atomic_and_only_on_request(tmp_path):
    fig = plots.plot_cmi_bars({"MLL": {"cmi": 0.1, "ncmi": 0.2}})
    assert os.listdir(tmp_path) == []
    plots.plot_cmi_bars({"MLL": {"cmi": 0.1, "ncmi": 0.2}}, path=tmp_path / "sub" / "bars.pdf")
    plots.save_figure(fig, tmp_path / "sub" / "bars.png")
    assert sorted(os.listdir(tmp_path / "sub")) == ["bars.pdf", "bars.png"]  # no temporary file left behind
    assert (tmp_path / "sub" / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sub" / "bars.pdf").read_bytes()[:4] == b"%PDF"


def test_cmi_bars_mean_and_std_over_seeds():
    fig = plots.plot_cmi_bars({"MLL": {"cmi": [0.1, 0.3], "ncmi": torch.tensor(0.5)},
                               "MCMI": {"cmi": 0.4}})
    cmi_ax, ncmi_ax = fig.axes
    assert [round(p.get_height(), 12) for p in cmi_ax.patches] == [0.2, 0.4]
    assert [p.get_height() for p in ncmi_ax.patches] == [0.5]  # MCMI has no NCMI: no bar
    caps = [line for line in cmi_ax.lines if len(line.get_ydata()) == 2 and line.get_xdata()[0] == 0]
    ys = sorted(float(y) for line in caps for y in line.get_ydata())
    assert ys[0] == pytest.approx(0.1) and ys[-1] == pytest.approx(0.3)  # the seed dots
    assert [ax.get_title() for ax in fig.axes] == ["CMI", "NCMI (CMI / Γ)"]  # words and units, not keys
    assert cmi_ax.get_ylabel() == "nats" and ncmi_ax.get_ylabel() == "ratio, no unit"


def test_per_class_cmi_bars():
    fig = plots.plot_per_class_cmi({"MLL": torch.tensor([0.1, 0.2, 0.3]), "MCMI": [0.3, 0.2, 0.1]}, CLASSES)
    (ax,) = fig.axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.2, 0.1])
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_kl_distributions(kind):
    g = torch.Generator().manual_seed(0)
    kl_a, kl_b = torch.rand(30, generator=g), torch.rand(20, generator=g)
    labels_a, labels_b = torch.arange(30) % 3, torch.arange(20) % 2  # teacher B has no sample of class 2
    fig = plots.plot_kl_distributions(kl_a, labels_a, kl_b, labels_b, CLASSES, kind=kind, log=True)
    assert isinstance(fig, Figure) and [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["MLL", "MCMI"]
    assert fig.axes[0].get_ylim()[0] == 0  # KL is never negative: the symlog axis starts at 0
    with pytest.raises(ValueError, match="MCMI"):
        plots.plot_kl_distributions(kl_a, labels_a, kl_b, labels_a, CLASSES)
    with pytest.raises(ValueError, match="kind='bar'"):
        plots.plot_kl_distributions(kl_a, labels_a, kl_b, labels_b, CLASSES, kind="bar")


def test_log_probabilities_detects_probs_and_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.1]])
    expected = torch.log_softmax(logits.double(), dim=1)
    torch.testing.assert_close(plots.log_probabilities(logits), expected)
    torch.testing.assert_close(plots.log_probabilities(expected.exp()), expected)
    torch.testing.assert_close(plots.log_probabilities(expected.exp(), inputs="logits"),
                               torch.log_softmax(expected.exp(), dim=1))


def test_pca_projection_matches_covariance_eigenvectors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    coords, labels = plots.project_2d(x)
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    for j, col in enumerate((3, 2)):
        v = evecs[:, col] * torch.sign(evecs[evecs[:, col].abs().argmax(), col])
        torch.testing.assert_close(coords[:, j], xc @ v)
    assert labels[0] == f"PC1 ({100 * float(evals[3] / evals.sum()):.0f}%)"
    coords, _ = plots.project_2d(x[:, :1])  # one feature: second coordinate is zero
    assert coords.shape == (40, 2) and bool((coords[:, 1] == 0).all())


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_output_projection(method):
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(24) % 3
    outputs = {"MLL": torch.randn(24, 3, generator=g), "MCMI": torch.softmax(torch.randn(24, 3, generator=g), 1)}
    fig = plots.plot_output_projection(outputs, labels, CLASSES, method=method, max_points=20)
    assert [ax.get_title() for ax in fig.axes] == ["MLL", "MCMI"]
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 20
    widths = {round(float(ax.get_xlim()[1] - ax.get_xlim()[0]), 9) for ax in fig.axes[:2]}
    heights = {round(float(ax.get_ylim()[1] - ax.get_ylim()[0]), 9) for ax in fig.axes[:2]}
    assert len(widths) == 1 and widths == heights  # one scale in every panel, so spreads compare by eye


def test_student_vs_teacher_cmi():
    points = [{"teacher": "MLL", "teacher_cmi": 0.1, "student_acc": 0.8, "method": "kd"},
              {"teacher": "MCMI", "teacher_cmi": 0.3, "student_acc": 0.82, "method": "kd"},
              {"teacher": "MCMI", "teacher_cmi": 0.3, "student_acc": 0.81, "method": "dkd"},
              {"teacher": "MCMI", "teacher_cmi": 0.31, "student_acc": 0.815, "method": "kd"}]
    (ax,) = plots.plot_student_vs_teacher_cmi(points).axes
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [
        pytest.approx((p["teacher_cmi"], 100 * p["student_acc"])) for p in points]  # accuracy in %, as in tables
    assert ax.get_ylabel() == "student test accuracy (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MLL · kd", "MCMI · kd", "MCMI · dkd"]


def test_confusion_rows_normalised():
    cm = torch.tensor([[8, 2, 0], [0, 5, 5], [0, 0, 0]])
    fig = plots.plot_confusion(cm, CLASSES)
    image = fig.axes[0].images[0].get_array()
    torch.testing.assert_close(torch.as_tensor(image), torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]],
                                                                    dtype=torch.float64))
    raw = plots.plot_confusion(cm, normalize=False).axes[0].images[0].get_array()
    assert raw.tolist() == cm.tolist()
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion(torch.ones(2, 3))


def test_history_panels_follow_the_keys():
    history = [{"epoch": 1, "lr": 0.05, "time": 3.2, "loss": 0.6, "ce": 0.6, "train_acc": 0.8, "eval_acc": 0.85,
                "eval_cmi": 0.2, "note": "warm-up"},
               {"epoch": 2, "lr": 0.005, "time": 3.0, "loss": 0.4, "ce": 0.5, "kl": -0.1, "train_acc": 0.9}]
    fig = plots.plot_history(history)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss", "accuracy", "CMI", "learning rate", "seconds"]
    loss_ax, acc_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.lines] == ["loss", "ce", "kl"]
    assert list(acc_ax.lines[1].get_xdata()) == [1]  # eval_acc only in epoch 1
    assert list(acc_ax.lines[0].get_ydata()) == pytest.approx([80.0, 90.0]) and acc_ax.get_ylabel() == "%"
    assert fig.axes[3].get_yscale() == "log"
    only_loss = plots.plot_history([{"loss": 1.0}, {"loss": 0.5}])
    assert list(only_loss.axes[0].lines[0].get_xdata()) == [1, 2]


def test_fraction_curve_averages_seeds():
    rows = [{"teacher": t, "fraction": f, "student_acc": (acc + s) / 100, "seed": s}
            for t, acc in (("MLL", 70), ("MCMI", 72)) for f in (0.05, 0.25) for s in (0, 2)]
    (ax,) = plots.plot_fraction_curve(rows, logx=True).axes
    means = [list(line.get_ydata()) for line in ax.lines if len(line.get_xdata()) == 2 and line.get_linestyle() == "-"]
    assert means == [pytest.approx([71.0, 71.0]), pytest.approx([73.0, 73.0])]  # in %, mean over the two seeds
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5%", "25%"]  # the fractions, not 5×10⁻²
    assert ax.get_ylabel() == "KD student test accuracy (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MLL", "MCMI"]


def _means(ax, marker):
    """y data of the errorbar mean lines drawn with `marker` (no line style: the line joining them is separate)."""
    return [list(line.get_ydata()) for line in ax.lines if line.get_marker() == marker
            and line.get_linestyle() == "None" and len(line.get_xdata()) and line.get_alpha() is None
            and line.get_markersize() >= 6]


def test_dose_response_lines_intervals_and_reference():
    rows = [{"method": "control", "dose": 0.0, "seed": s, "train_cmi": 0.01, "kl_to_bayes": 0.10 + s / 100}
            for s in (0, 1)]
    rows += [{"method": "mcmi", "dose": 0.1, "seed": s, "train_cmi": 0.1, "kl_to_bayes": 0.05 + s / 100,
              "matched": True} for s in (0, 1)]
    rows += [{"method": "label_smoothing", "dose": 0.1, "seed": 0, "train_cmi": 0.03, "kl_to_bayes": 9.0,
              "matched": False}]  # not matched: in no mean, drawn hollow at its own value
    fig = plots.plot_dose_response(rows, ("kl_to_bayes",), reference={"P*": 0.2})
    (ax,) = fig.axes
    assert _means(ax, "*") == [pytest.approx([0.105])] and _means(ax, "s") == [pytest.approx([0.055])]
    joined = [line for line in ax.lines if line.get_linestyle() == "-" and line.get_color() == "#d62728"]
    assert [list(line.get_ydata()) for line in joined] == [pytest.approx([0.105, 0.055])]  # the line starts at control
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none"]
    assert [list(line.get_ydata()) for line in hollow] == [[9.0]]
    assert [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "--"] == [[0.2, 0.2]]
    assert "2 seeds" in fig._suptitle.get_text() and ax.get_ylabel() == "KL(P* ‖ teacher) on test (nats)"
    one = plots.plot_dose_response([r for r in rows if r["seed"] == 0], ("kl_to_bayes",))
    assert "one seed: no intervals" in one._suptitle.get_text()
    # two seeds at 0% and 90%: the t interval (±572 points) is clipped to what a percentage can be
    split = [{"method": "mcmi", "dose": 0.2, "seed": s, "train_cmi": 0.2, "zero_shot_omitted_acc": a, "matched": True}
             for s, a in ((0, 0.0), (1, 0.9))]
    (point,) = plots.dose_points(split, "zero_shot_omitted_acc")["mcmi"]
    assert point["y"] == pytest.approx(45.0) and point["low"] == 0.0 and point["high"] == 100.0
    assert point["raw_high"] > 100.0 and point["raw_low"] < 0.0


def test_dose_response_axis_from_the_data_cut_intervals_and_dropped_teachers():
    rows = [{"method": "control", "dose": 0.0, "seed": s, "train_cmi": 0.003, "test_acc": a, "matched": True}
            for s, a in ((0, 0.95), (1, 0.97))]  # t interval of two seeds: 96 ± 12.7 points, past the axis
    rows += [{"method": "mcmi", "dose": 0.1, "seed": s, "train_cmi": 0.1, "test_acc": a, "matched": True}
             for s, a in ((0, 0.956), (1, 0.956))]
    rows += [{"method": "mcmi", "dose": 0.3, "seed": 1, "train_cmi": 0.31, "collapsed": True, "matched": False},
             {"method": "label_smoothing", "dose": 0.1, "seed": 0, "train_cmi": 0.04, "matched": False}]
    fig = plots.plot_dose_response(rows, ("test_acc", "student_acc"))
    (ax,) = [a for a in fig.axes if a.get_visible()]
    low, high = ax.get_ylim()
    assert 94.0 < low < 95.0 and 97.0 < high < 98.0  # the 94-98% band, not 0-100 (nor the interval's ±12.7)
    carets = [line for line in ax.lines if line.get_marker() in ("^", "v") and not line.get_clip_on()
              and line.get_markerfacecolor() != "none"]
    assert sorted(line.get_marker() for line in carets) == ["^", "v"]  # the control's interval, cut both sides
    assert "cut" in fig._suptitle.get_text()
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert [float(line.get_xdata()[0]) for line in crosses] == [0.31] and crosses[0].get_color() == "#d62728"
    floor = [line for line in ax.lines if line.get_markerfacecolor() == "none"]  # LS has no accuracy: on the floor
    assert [(line.get_marker(), line.get_markeredgecolor()) for line in floor] == [("^", "#2ca02c")]
    assert ax.get_xlim()[1] > 0.31  # the collapsed teacher is inside the x range
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("collapsed") for t in legend) and any(t.startswith("unmatched") for t in legend)


def test_one_colour_and_marker_per_method_in_every_figure():
    """Every figure draws a method in its METHOD_STYLES colour, whatever order the methods come in."""
    styles = plots.METHOD_STYLES
    color = lambda key: styles[key]["color"]  # noqa: E731
    from matplotlib.colors import to_hex

    hexes = lambda artists: {to_hex(a) for a in artists}  # noqa: E731
    # bars: one per teacher, named by key or by label
    for order in (["MCMI", "MLL", "label smoothing"], ["label smoothing", "MLL", "MCMI"]):
        bars = plots.plot_cmi_bars({n: {"cmi": 0.1} for n in order}, ("cmi",)).axes[0].patches
        assert [to_hex(p.get_facecolor()) for p in bars] == [color(plots.method_key(n)) for n in order]
    per_class = plots.plot_per_class_cmi({"temperature": [0.1, 0.2], "mcmi": [0.2, 0.1]}).axes[0].patches
    assert [to_hex(p.get_facecolor()) for p in per_class] == [color("temperature")] * 2 + [color("mcmi")] * 2
    kl = plots.plot_kl_distributions(torch.rand(6), torch.arange(6) % 2, torch.rand(6), torch.arange(6) % 2,
                                     names=("control", "MCMI"))
    assert [to_hex(p.get_facecolor()) for p in kl.axes[0].get_legend().get_patches()] == [color("control"),
                                                                                         color("mcmi")]
    points = [{"teacher": t, "teacher_cmi": 0.1, "student_acc": 0.8} for t in ("mcmi", "mll", "label_smoothing")]
    scatter = plots.plot_student_vs_teacher_cmi(points).axes[0].collections
    assert [to_hex(c.get_facecolor()[0]) for c in scatter] == [color("mcmi"), color("mll"), color("label_smoothing")]
    curves = plots.plot_training_curves({"MCMI": [[{"epoch": 1, "ce": 1.0}]], "MLL": [[{"epoch": 1, "ce": 2.0}]]})
    assert [(to_hex(line.get_color()), line.get_marker()) for line in curves.axes[0].lines] == [
        (color("mcmi"), styles["mcmi"]["marker"]), (color("mll"), styles["mll"]["marker"])]
    fraction = plots.plot_fraction_curve([{"teacher": t, "fraction": 0.1, "student_acc": 0.5}
                                          for t in ("temperature", "control")])
    assert [to_hex(line.get_color()) for line in fraction.axes[0].lines if line.get_linestyle() == "-"] == [
        color("temperature"), color("control")]
    rows = [{"method": m, "dose": d, "seed": 0, "train_cmi": d + 0.01, "test_acc": 0.9, "matched": True}
            for m, d in (("temperature", 0.05), ("mcmi", 0.1), ("label_smoothing", 0.05), ("control", 0.0))]
    (ax,) = [a for a in plots.plot_dose_response(rows, ("test_acc",)).axes if a.get_visible()]
    for key in ("control", "mcmi", "label_smoothing", "temperature"):
        marks = [line for line in ax.lines if line.get_marker() == styles[key]["marker"]]
        assert marks and hexes(line.get_color() for line in marks) == {color(key)}, key
    # names outside the dict keep one colour whatever the order; a dose suffix keeps the method's
    assert plots.method_style("my_teacher") == plots.method_style("my_teacher")
    assert plots.method_style("mcmi_0.1") == styles["mcmi"]
    assert plots.method_style("MCMI (CMI target)") == styles["mcmi"]
    assert plots.method_key("mllx") is None and plots.method_key("label smoothing") == "label_smoothing"


def test_cmi_bars_say_what_the_bars_are_and_how_far_train_is_below_test():
    fig = plots.plot_cmi_bars({"MLL": {"train_cmi": [0.003, 0.003], "test_cmi": [0.09, 0.09]}},
                              ("train_cmi", "test_cmi"))
    text = fig._suptitle.get_text()
    assert "standard deviation" in text and "30× below test CMI" in text and "train data" in text
    alike = plots.plot_cmi_bars({"MLL": {"train_cmi": 0.05, "test_cmi": 0.06}}, ("train_cmi", "test_cmi"))
    assert alike._suptitle is None  # one seed, train and test alike: nothing to say


def test_nothing_goes_through_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_confusion(torch.eye(2))
    assert plt.get_fignums() == before


# ---- widget -----------------------------------------------------------------------------------------------------

def tiny_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_cam_explorer_builds_and_redraws():
    pytest.importorskip("ipywidgets")
    from mcmi_lab.explorers.widgets import cam_explorer

    images = torch.randint(0, 255, (9, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = from_tensors(images, torch.arange(9) % 3, CLASSES)
    models = {"MLL": tiny_cnn(0), "MCMI": tiny_cnn(1), "control": tiny_cnn(2)}
    box = cam_explorer(models, data, max_images=4)
    panels = lambda: [ax for ax in box.figure.axes if ax.get_label() != "<colorbar>"]  # noqa: E731
    assert isinstance(box.figure, Figure) and len(panels()) == 4 * 3  # 4 images x (input + 2 teachers)
    (label, count, offset), (first, second) = box.children[0].children, box.children[1].children
    label.value = 1  # class "bag": images 1, 4, 7
    assert offset.max == 2
    assert [ax.get_title() for ax in panels()[::3]] == ["bag"] * 3
    second.value = "control"
    count.value = 1
    assert [ax.get_title().split(" → ")[0] for ax in panels()[1:]] == ["MLL", "control (λ = 0)"]
    first.value = "control"  # the same teacher twice is drawn once
    assert len(panels()) == 2


def test_training_curves_join_fine_tunes_to_the_teacher_and_average_seeds():
    mll = [[{"epoch": e, "ce": 1.0 / e + s, "train_acc": 0.5 + 0.1 * e} for e in (1, 2)] for s in (0, 1)]
    mcmi = [[{"epoch": 1, "ce": 0.2 + s, "kl": 0.3, "train_acc": 0.8}] for s in (0, 1)]
    fig = plots.plot_training_curves({"MLL": mll, "MCMI": mcmi}, starts={"MCMI": 2})
    ce_ax, acc_ax, kl_ax, ce_tune, acc_tune, kl_tune = [ax for ax in fig.axes if ax.get_visible()]
    means = [(list(line.get_xdata()), list(line.get_ydata())) for line in ce_ax.lines if line.get_lw() > 1]
    assert means == [([1, 2], [pytest.approx(1.5), pytest.approx(1.0)]), ([3], [pytest.approx(0.7)])]
    assert acc_ax.get_ylabel() == "%" and list(acc_ax.lines[-1].get_ydata()) == [pytest.approx(80.0)]
    assert [line.get_label() for line in kl_ax.lines if line.get_lw() > 1] == ["MCMI"]  # only MCMI has kl
    assert "2 seeds" in fig._suptitle.get_text()
    # the fine-tune on its own axis: its epochs from 1, the MLL teacher's mean at epoch 2 as its start (x = 0)
    tune = [(list(line.get_xdata()), list(line.get_ydata())) for line in ce_tune.lines if line.get_label() == "MCMI"]
    assert tune == [([1], [pytest.approx(0.7)])]
    start = [line for line in ce_tune.lines if line.get_label().startswith("start")]
    assert [list(line.get_ydata()) for line in start] == [[pytest.approx(1.0)]] and list(start[0].get_xdata()) == [0]
    assert "fine-tunes alone" in ce_tune.get_title()
    plain = plots.plot_training_curves({"MLL": mll})  # no fine-tune: one row
    assert len([ax for ax in plain.axes if ax.get_visible()]) == 2
