"""Doses: the CMI-target controller, the dose-matched controls and the dose-response statistics."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import random_images, tiny_cnn
from mcmi_lab import finetune_mcmi, fit, measure_cmi, subset
from mcmi_lab.metrics.cmi import conditional_mutual_information, probabilities
from mcmi_lab.study.dose import SmoothingSearch, check_target_cmi, cmi_at_temperature, match_temperature, matched
from mcmi_lab.training.objectives import MCMIObjective
from mcmi_lab.data.synthetic import SyntheticTask
from mcmi_lab.metrics.stats import slope, slope_over_seeds


@pytest.fixture(scope="module")
def converged():
    """A tiny teacher trained to ~100% train accuracy on a small learnable set: low CMI, room for a dose."""
    torch.manual_seed(0)
    data = random_images(n=256, k=4, size=12)
    model = tiny_cnn(num_classes=4, width=8)
    fit(model, data, epochs=15, lr=0.05, augment=False, log=False, progress="off", precision="fp32", batch_size=32)
    return model, data


# ---- the controller ---------------------------------------------------------------------------------------------

def _target_run(model, data, target, epochs=6, **control):
    return finetune_mcmi(model, data, target_cmi=target, epochs=epochs, augment=False, log=False, progress="off",
                         precision="fp32", batch_size=32, control={"control_steps": 2, **control})


def test_a_target_at_todays_cmi_leaves_the_teacher_nearly_unchanged(converged):
    model, data = converged
    start = measure_cmi(model, data)
    tuned, hist = _target_run(model, data, float(start["cmi"]), epochs=2)
    after = measure_cmi(tuned, data)
    assert max(r["lam"] for r in hist) < 0.5
    assert after["accuracy"] >= start["accuracy"] - 0.02


@pytest.fixture(scope="module")
def soft():
    """A converged MLP on four overlapping Gaussian classes (Bayes accuracy 0.956): 100% train accuracy, train CMI
    0.005, and outputs that can spread, so a dose is reachable (the bright-square images above saturate instead)."""
    torch.manual_seed(0)
    data = SyntheticTask(num_classes=4, size=8, separation=3.0).sample(256, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    fit(model, data, epochs=30, lr=0.05, augment=False, log=False, progress="off", precision="fp32", batch_size=32)
    return model, data


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
def test_the_controller_brings_the_train_cmi_to_the_target(soft, target):
    """20x-60x the teacher's CMI lands within ±25% (measured: 0.109, 0.166, 0.260), λ never negative, accuracy kept;
    the next test shows a fixed λ does not do this by itself."""
    model, data = soft
    assert float(measure_cmi(model, data)["cmi"]) < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreached target would warn
        tuned, hist = _target_run(model, data, target, epochs=20)
    after = measure_cmi(tuned, data)
    assert matched(float(after["cmi"]), target)
    assert hist[-1]["train_cmi"] == pytest.approx(float(after["cmi"]), rel=1e-4)
    assert min(r["lam"] for r in hist) >= 0.0
    assert after["accuracy"] >= 0.9


def test_a_fixed_lambda_at_the_controllers_ceiling_misses_where_the_target_lands(soft):
    """λ = 3 held for the same 20 epochs overshoots 0.2 (measured 0.340 nats, train accuracy 86%)."""
    model, data = soft
    tuned, _ = finetune_mcmi(model, data, 3.0, epochs=20, augment=False, log=False, progress="off", precision="fp32",
                             batch_size=32, guard=False)
    assert not matched(float(measure_cmi(tuned, data)["cmi"]), 0.2)


def test_the_controller_acts_when_an_epoch_is_shorter_than_its_period(converged):
    """64 images at batch 32 are 2 steps per epoch: with control_steps=5 a per-epoch count never got there and λ
    stayed 0 (seen on the 1,438 digits: 23 steps per epoch against the default 25); the count runs over epochs."""
    model, data = converged
    obj = MCMIObjective(target_cmi=0.3, control_steps=5)
    fit(copy.deepcopy(model), subset(data, 64, seed=0), obj, epochs=6, lr=0.05, augment=False, log=False,
        progress="off", precision="fp32", batch_size=32)
    assert int(obj.updates) == 12 // 5 and int(obj.control_count) == 12 and float(obj.lam_t) > 0


def test_the_controller_step_is_the_pi_formula_with_a_ramped_set_point(monkeypatch):
    """λ_I ← clip(λ_I + g·e, 0, max), λ = clip(λ_I + kp·e, 0, max), e = clip((s − ĉ)/c, −2, 1), the set-point s
    ramping from the first probe's CMI to c over `ramp_updates` updates: checked step by step by hand."""
    measured = iter([0.02, 0.05, 0.12, 0.30, 0.10])
    monkeypatch.setattr("mcmi_lab.training.objectives.measure_cmi",
                        lambda model, data: {"cmi": next(measured), "accuracy": 1.0})
    obj = MCMIObjective(target_cmi=0.2, control_gain=0.1, control_kp=0.5, ramp_updates=4, max_lam=3.0)
    start, c, lam_i, seen = 0.02, 0.2, 0.0, []
    for n, cmi in enumerate([0.02, 0.05, 0.12, 0.30, 0.10]):
        setpoint = start + (c - start) * min(1.0, (n + 1) / 4)
        e = min(1.0, max(-2.0, (setpoint - cmi) / c))
        lam_i = min(3.0, max(0.0, lam_i + 0.1 * e))
        obj._control(None)
        seen.append(float(obj.lam_t))
        assert float(obj.lam_i) == pytest.approx(lam_i, abs=1e-6)
        assert float(obj.lam_t) == pytest.approx(min(3.0, max(0.0, lam_i + 0.5 * e)), abs=1e-6)
    assert seen[3] == 0.0  # the overshoot (0.30 against 0.2) cuts λ to 0 at once, through the proportional part
    assert int(obj.updates) == 5 and float(obj.start_cmi) == pytest.approx(0.02)


def test_an_unreached_target_warns_with_the_cmi_reached(converged):
    model, data = converged
    with pytest.warns(UserWarning, match=r"did not reach train CMI 1 within ±25%: it reached 0\.\d+ nats"):
        _target_run(model, data, 1.0, epochs=1, max_lam=0.01)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=0.5, target_cmi=0.1), "give exactly one"),
    (dict(), "give exactly one"),
    (dict(target_cmi=0.0), "target_cmi=0.0 is not accepted"),
    (dict(target_cmi=-0.1), "target_cmi=-0.1 is not accepted"),
])
def test_bad_targets_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCMIObjective(**kwargs)


def test_a_target_at_or_above_log_k_is_refused(converged):
    model, data = converged
    with pytest.raises(ValueError, match=r"expected a number in \(0, log K\) = \(0, 1\.3863\) nats for 4 classes"):
        _target_run(model, data, math.log(4), epochs=1)
    with pytest.raises(ValueError, match="log K"):
        check_target_cmi(3.0, 10)


def test_fixed_lambda_is_unchanged_by_the_controller(converged):
    """lam= trains exactly as before: the controller's λ buffer stays 0 and is not logged."""
    model, data = converged
    tuned, hist = finetune_mcmi(model, data, 0.3, epochs=1, augment=False, log=False, progress="off",
                                precision="fp32", batch_size=32)
    assert "lam" not in hist[0]


# ---- matched controls -------------------------------------------------------------------------------------------

def test_match_temperature_finds_the_dose_on_the_rising_side(converged):
    model, data = converged
    from mcmi_lab import predict

    logits, labels = predict(model, data)
    peak = max(cmi_at_temperature(logits, labels, 4, math.exp(i / 10)) for i in range(0, 47))
    target = 0.5 * peak
    scaled, reached = match_temperature(model, data, target)
    assert reached == pytest.approx(target, rel=1e-6)
    # the reached value is the CMI of the scaled teacher itself (plain formula on its softmax)
    probs = probabilities(logits, float(scaled.temperature))
    assert float(conditional_mutual_information(probs, labels, 4)) == pytest.approx(reached, rel=1e-6)
    assert float(measure_cmi(scaled, data)["cmi"]) == pytest.approx(reached, rel=1e-3)
    with pytest.warns(UserWarning, match="temperature scaling cannot reach"):
        match_temperature(model, data, 1.3)


def test_smoothing_search_interpolates_between_bracketing_tries():
    search = SmoothingSearch({0.1: (None, 0.02), 0.4: (None, 0.08)})
    eps = search.next_epsilon(0.04, 0.2)
    w = (math.log(0.04) - math.log(0.02)) / (math.log(0.08) - math.log(0.02))
    assert eps == pytest.approx(0.1 + w * 0.3, abs=1e-4)
    assert SmoothingSearch({0.1: (None, 0.01)}).next_epsilon(0.05, 0.2) == 0.2  # all below: smooth more
    assert SmoothingSearch({0.4: (None, 0.2)}).next_epsilon(0.05, 0.2) == 0.2  # all above: halve ε
    assert SmoothingSearch().next_epsilon(0.05, 0.2) == 0.2
    # all below and still rising with ε: smooth more; all below and already falling: the dose is above the peak
    assert SmoothingSearch({0.2: (None, 0.04), 0.4: (None, 0.06)}).next_epsilon(0.1, 0.2) == 0.8
    assert SmoothingSearch({0.2: (None, 0.04), 0.4: (None, 0.06), 0.8: (None, 0.02)}).next_epsilon(0.1, 0.2) is None


# ---- dose-response statistics -----------------------------------------------------------------------------------

def test_slope_and_its_interval_over_seeds_by_hand():
    assert slope([0, 1, 2], [1, 3, 5]) == 2.0
    assert math.isnan(slope([1, 1], [0, 1]))
    # seed slopes 2, 4, 3: mean 3, sd 1, t(0.975, 2) = 4.302652729911275 -> half width 4.3027/sqrt(3)
    points = {0: [(0, 0), (1, 2)], 1: [(0, 1), (0.5, 3)], 2: [(0, 0), (1, 3), (2, 6)]}
    d = slope_over_seeds(points)
    half = 4.302652729911275 / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(3.0)
    assert d["low"] == pytest.approx(3 - half) and d["high"] == pytest.approx(3 + half)
    assert slope_over_seeds({0: [(1, 2)]})["n"] == 0


def test_a_teacher_that_has_taught_a_student_can_still_be_fine_tuned(converged):
    """Distilling freezes a teacher in place (requires_grad off); the fine-tune recipes train a copy with all its
    parameters, and leave the teacher as it was."""
    from mcmi_lab.study.recipes import finetune_control, finetune_label_smoothing, train_student

    model, data = converged
    teacher = copy.deepcopy(model)
    train_student(teacher, data, "kd", model="cnn_tiny", epochs=1, log=False, progress="off", batch_size=32)
    assert not any(p.requires_grad for p in teacher.parameters())
    for tuned, _ in (finetune_control(teacher, data, 1, log=False, progress="off", batch_size=32),
                     finetune_label_smoothing(teacher, data, 0.1, 1, log=False, progress="off", batch_size=32)):
        assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), teacher.parameters()))
    assert not any(p.requires_grad for p in teacher.parameters())


# ---- the collapse floor (issue 34): a teacher that does not work in eval mode is never a dose -----------------

def _break_eval(epochs=None):
    """A fit callback that shifts every BatchNorm's running mean after the given epochs (all: None): the model then
    fails in eval mode while its training batches, normalised by their own statistics, look as fine as before."""
    def corrupt(record, model):
        if epochs is None or record["epoch"] in epochs:
            for layer in getattr(model, "module", model).modules():
                if isinstance(layer, nn.BatchNorm2d):
                    layer.running_mean.add_(50.0)
    return corrupt


def _floor_run(model, data, target=0.05, epochs=3, guard=False, **kw):
    return finetune_mcmi(model, data, target_cmi=target, epochs=epochs, augment=False, log=False, progress="off",
                         precision="fp32", batch_size=32, guard=guard, control={"control_steps": 2}, **kw)


def test_an_epoch_below_the_eval_mode_floor_is_never_selected(converged):
    model, data = converged
    start = measure_cmi(model, data)["accuracy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether the dose is matched is not the question here
        tuned, hist = _floor_run(model, data, callbacks=[_break_eval({3})])
    assert [r["train_acc_eval"] >= 0.5 * start for r in hist] == [True, True, False]
    assert min(r["train_acc"] for r in hist) > 0.9  # the training batches never showed it
    assert hist[-1]["selected_epoch"] == 2 and hist[-1]["collapsed"] is False
    assert hist[-1]["collapse_floor"] == pytest.approx(0.5 * start)
    assert measure_cmi(tuned, data)["accuracy"] == pytest.approx(hist[1]["train_acc_eval"])


def test_a_fine_tune_below_the_floor_at_every_epoch_is_collapsed(converged):
    model, data = converged
    with pytest.warns(UserWarning, match=r"MCMI at train CMI 0.05 collapsed: no epoch kept the eval-mode train"):
        _, hist = _floor_run(model, data, callbacks=[_break_eval()])
    assert hist[-1]["collapsed"] is True and max(r["train_acc_eval"] for r in hist) < 0.5


def test_the_guard_stops_on_the_eval_mode_probe_not_the_training_batches(converged):
    from mcmi_lab.training.objectives import StopTraining

    model, data = converged
    with pytest.raises(StopTraining, match="eval-mode probe accuracy fell"):
        _floor_run(model, data, epochs=12, guard=True, callbacks=[_break_eval()])
    # the probe's accuracy is smoothed over ~50 steps (8 an epoch here), as the batches' was: 2 epochs do not stop
    with pytest.warns(UserWarning, match="collapsed"):
        _, hist = _floor_run(model, data, epochs=2, guard=True, callbacks=[_break_eval()])
    assert hist[-1]["collapsed"] is True


def test_dose_teachers_returns_collapsed_teachers_as_rows():
    """Every fine-tune broken in eval mode: the control and label smoothing are collapsed by their final pass, the
    MCMI dose by its epochs (4 steps: no probe, so no guard); temperature scaling cannot be."""
    from mcmi_lab.study.dose import dose_teachers

    torch.manual_seed(0)
    data = random_images(n=128, k=4, size=12)
    model = tiny_cnn(num_classes=4, width=8)
    fit(model, data, epochs=10, lr=0.05, augment=False, log=False, progress="off", precision="fp32", batch_size=32)
    lines = []
    kw = dict(augment=False, log=False, progress="off", precision="fp32", batch_size=32, callbacks=[_break_eval()])
    rows = dose_teachers(model, data, [0.05], 1, echo=lines.append, **kw)
    got = {r["method"]: (r["collapsed"], m is None) for r, m in rows}
    assert got == {"control": (True, False), "mcmi": (True, False), "label_smoothing": (True, False),
                   "temperature": (False, False)}
    assert any("MCMI at train CMI 0.05 collapsed" in line for line in lines)


@pytest.mark.parametrize("doses, match", [
    ([], r"doses=\[\] is not accepted: expected a non-empty list of train-CMI doses"),
    (0.1, r"doses=0.1 is not accepted: expected a non-empty list of train-CMI doses"),
    ([0.1, -0.2], r"doses=\[0.1, -0.2\] is not accepted"),
])
def test_doses_must_be_a_list(converged, doses, match):
    from mcmi_lab.study.dose import dose_teachers
    from mcmi_lab.study.recipes import finetune_mcmi_doses

    model, data = converged
    with pytest.raises(ValueError, match=match):
        finetune_mcmi_doses(model, data, doses)
    with pytest.raises(ValueError, match=match):
        dose_teachers(model, data, doses, 1)


def test_lam_beside_doses_is_refused_in_one_line(converged):
    from mcmi_lab.study.dose import dose_teachers
    from mcmi_lab.study.recipes import finetune_mcmi_doses

    model, data = converged
    match = r"lam=0.2 is not accepted beside doses: each dose is a CMI target"
    with pytest.raises(ValueError, match=match):
        finetune_mcmi_doses(model, data, [0.1], lam=0.2)
    with pytest.raises(ValueError, match=match):
        dose_teachers(model, data, [0.1], 1, lam=0.2)


# ---- omitted_mass: the zero-shot mechanism as a teacher metric ----------------------------------------------

def test_omitted_mass_against_a_loop():
    from mcmi_lab import omitted_mass

    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(50, 5, generator=g), torch.randint(0, 5, (50,), generator=g)
    for omitted, t in (([3], 4.0), ([0, 3], 1.0), (2, 2.5)):
        classes = omitted if isinstance(omitted, list) else [omitted]
        total, count = 0.0, 0
        for z, y in zip(logits.tolist(), labels.tolist()):
            if y in classes:
                continue
            e = [math.exp(v / t) for v in z]
            total += sum(e[c] for c in classes) / sum(e)
            count += 1
        assert omitted_mass(logits, labels, omitted, t) == pytest.approx(total / count, rel=1e-12)
    for bad in ([], [5], [0, 1, 2, 3, 4], [True]):
        with pytest.raises(ValueError, match=r"omitted=.* is not accepted: expected a non-empty list of class"):
            omitted_mass(logits, labels, bad)
    with pytest.raises(ValueError, match="every sample's label is omitted"):
        omitted_mass(logits[labels == 1], labels[labels == 1], [1])


def test_the_card_carries_the_omitted_mass(converged):
    from mcmi_lab import omitted_mass, predict, report_card
    from mcmi_lab.study.report_card import TEACHER_METRICS, format_card

    model, data = converged
    card = report_card(model, data, data, omitted=[1], temperature=4.0)
    logits, labels = predict(model, data, precision="fp32")
    assert card["train"]["omitted_mass"] == pytest.approx(omitted_mass(logits, labels, [1], 4.0))
    assert card["omitted"] == [1] and "omitted classes' mass" in format_card(card)
    assert "omitted_mass" not in report_card(model, data, data)["train"] and "omitted_mass" in TEACHER_METRICS
