import math

import pytest
import torch

from mcmi_lab.metrics.stats import (derive_seeds, expected_calibration_error, format_mean_std, mean_std,
                            paired_difference, summarize)

T_0975_3 = 3.182446305284263  # Student-t quantile t_{0.975, 3}, from tables
T_095_3 = 2.353363434801823  # t_{0.95, 3}


# ---- seeds ----------------------------------------------------------------------------------------------------

def test_derive_seeds_values_determinism_and_distinctness():
    assert derive_seeds(0) == {"teacher": 0, "finetune": 1, "student": 2}
    assert derive_seeds(2) == {"teacher": 6, "finetune": 7, "student": 8}
    assert derive_seeds(5) == derive_seeds(5)
    seen = [s for r in range(100) for s in derive_seeds(r).values()]
    assert len(set(seen)) == len(seen)  # distinct within a run and across runs


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_derive_seeds_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="run_seed"):
        derive_seeds(bad)


# ---- mean / std -----------------------------------------------------------------------------------------------

def test_mean_std_sample_std():
    mean, std = mean_std([1, 2, 3, 4])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3), abs=1e-15)  # squares 2.25+0.25+0.25+2.25 = 5, ddof 1
    assert mean_std(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert mean_std([84.2]) == (84.2, 0.0)


def test_mean_std_rejects_empty():
    with pytest.raises(ValueError, match="values"):
        mean_std([])


# ---- paired difference ----------------------------------------------------------------------------------------

def test_paired_difference_hand_computed():
    out = paired_difference([2, 4, 6, 8], [1, 2, 3, 4])  # differences 1, 2, 3, 4
    half = T_0975_3 * math.sqrt(5 / 3) / 2
    assert out["n"] == 4 and out["mean"] == 2.5
    assert out["std"] == pytest.approx(math.sqrt(5 / 3), abs=1e-15)
    assert out["low"] == pytest.approx(2.5 - half, abs=1e-12)
    assert out["high"] == pytest.approx(2.5 + half, abs=1e-12)
    assert out["high"] - out["mean"] == pytest.approx(2.0542, abs=1e-4)
    out90 = paired_difference([2, 4, 6, 8], [1, 2, 3, 4], confidence=0.9)
    assert out90["high"] == pytest.approx(2.5 + T_095_3 * math.sqrt(5 / 3) / 2, abs=1e-12)


def test_paired_difference_sign_and_zero_variance():
    out = paired_difference([1, 2, 3], [2, 3, 4])
    assert (out["mean"], out["low"], out["high"], out["std"]) == (-1.0, -1.0, -1.0, 0.0)


def test_paired_difference_one_pair_has_no_interval():
    out = paired_difference([3.0], [1.0])
    assert out["mean"] == 2.0 and out["n"] == 1 and out["std"] == 0.0
    assert math.isnan(out["low"]) and math.isnan(out["high"])


def test_paired_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="b of length 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1, 2], [0, 0], confidence=1.0)


# ---- summaries ------------------------------------------------------------------------------------------------

def test_summarize_keys_nested_and_missing():
    results = [{"acc": 80.0, "teacher": {"acc": 90.0}, "name": "a", "extra": 1.0},
               {"acc": 82.0, "teacher": {"acc": 91.0}, "name": "b"},
               {"acc": 84.0, "teacher": {"acc": 92.0}, "name": "c", "extra": None}]
    out = summarize(results, ["acc", "teacher.acc", "extra", "absent"])
    assert out["acc"] == {"mean": 82.0, "std": 2.0, "n": 3}
    assert out["teacher.acc"] == {"mean": 91.0, "std": 1.0, "n": 3}
    assert out["extra"] == {"mean": 1.0, "std": 0.0, "n": 1}
    assert out["absent"]["n"] == 0 and math.isnan(out["absent"]["mean"])
    assert list(summarize(results)) == ["acc", "extra"]  # numeric top-level keys only, first-seen order


def test_summarize_rejects_a_single_dict():
    with pytest.raises(ValueError, match="list of dicts"):
        summarize({"acc": 1.0}, ["acc"])


def test_format_mean_std():
    assert format_mean_std(84.2, 1.3, 3) == "84.2 ± 1.3 (n=3)"
    assert format_mean_std(0.12345, 0.01, 5, digits=3) == "0.123 ± 0.010 (n=5)"


# ---- expected calibration error -------------------------------------------------------------------------------

def _ece_reference(probs, labels, bins):
    """Plain loop: bin (lo, hi] by top-label confidence, weight |acc - conf| by the bin's share."""
    total, n = 0.0, len(labels)
    conf, pred = probs.double().max(1)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if lo < conf[i] <= hi]
        if members:
            acc = sum(float(pred[i] == labels[i]) for i in members) / len(members)
            mean_conf = sum(float(conf[i]) for i in members) / len(members)
            total += len(members) / n * abs(acc - mean_conf)
    return total


def test_ece_perfectly_calibrated_toy_is_zero():
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)  # 8 of 10 right at confidence 0.8
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-15)


def test_ece_miscalibrated_by_hand():
    # 4 samples at confidence 0.95 with 2 right (gap 0.45), 2 samples at 0.65 both right (gap 0.35):
    # ECE = 4/6 * 0.45 + 2/6 * 0.35 = 0.4166...
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.35, 0.65]] * 2)
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(4 / 6 * 0.45 + 2 / 6 * 0.35)
    # one bin: |acc - mean confidence| = |4/6 - (4*0.95 + 2*0.65)/6|
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(4 / 6 - 5.1 / 6))


def test_ece_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(300, 5, generator=gen), 1)
    labels = torch.randint(0, 5, (300,), generator=gen)
    for bins in (1, 7, 15):
        assert expected_calibration_error(probs, labels, bins) == pytest.approx(_ece_reference(probs, labels, bins),
                                                                                 abs=1e-12)


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(torch.full((3, 2), 0.5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long), bins=0)
