import math

import pytest
import torch

from mcmi_lab.metrics.cmi import (CMIMeter, class_centroids, conditional_mutual_information, kl_to_centroids, ncmi,
                          per_class_cmi, probabilities, separation)


def brute_cmi(probs, labels, k):
    """Σ_y π_y mean_{x∈y} Σ_k P_x(k) log(P_x(k)/Q_y(k)), written with loops."""
    n = len(labels)
    probs, labels = probs.tolist(), labels.tolist()
    total = 0.0
    for c in range(k):
        members = [i for i in range(n) if labels[i] == c]
        if not members:
            continue
        q = [sum(probs[i][j] for i in members) / len(members) for j in range(len(probs[0]))]
        kl = 0.0
        for i in members:
            kl += sum(p * math.log(p / qj) for p, qj in zip(probs[i], q) if p > 0)
        total += (len(members) / n) * (kl / len(members))
    return total


def brute_separation(probs, labels, pairs="all"):
    """Σ over ordered pairs with different labels of CE(P_i, P_j), divided by N² or by the number of such pairs."""
    n = len(labels)
    probs, labels = probs.tolist(), labels.tolist()
    s, different = 0.0, 0
    for i in range(n):
        for j in range(n):
            if labels[i] != labels[j]:
                s += -sum(probs[i][k] * math.log(probs[j][k]) for k in range(len(probs[0])))
                different += 1
    return s / (n**2 if pairs == "all" else different)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_meter_equals_two_pass_equals_brute_force(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(120, k, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (120,), generator=g)
    probs = probabilities(logits)
    meter = CMIMeter(k)
    for i in range(0, 120, 17):
        meter.update(logits[i:i + 17], labels[i:i + 17])
    out = meter.compute()
    two_pass = conditional_mutual_information(probs, labels, k)
    assert out["cmi"].item() == pytest.approx(two_pass.item(), rel=1e-12, abs=1e-14)
    assert two_pass.item() == pytest.approx(brute_cmi(probs, labels, k), rel=1e-10)
    assert torch.allclose(out["per_class_cmi"], per_class_cmi(probs, labels, k), atol=1e-12)
    assert torch.allclose(out["centroids"], class_centroids(probs, labels, k), atol=1e-14)
    assert out["separation"].item() == pytest.approx(brute_separation(probs, labels), rel=1e-10)
    assert separation(probs, labels, k).item() == pytest.approx(brute_separation(probs, labels), rel=1e-10)
    assert out["ncmi"].item() == pytest.approx(ncmi(probs, labels, k).item(), rel=1e-10)


@pytest.mark.parametrize("pairs", ["all", "different"])
def test_separation_pairs_equal_brute_force_pairs(pairs):
    # Tiny, unbalanced, with an empty class (3 of num_classes=4): both conventions against the double loop.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    probs = probabilities(logits)
    expected = brute_separation(probs, labels, pairs)
    assert separation(probs, labels, 4, pairs=pairs).item() == pytest.approx(expected, rel=1e-12)
    meter = CMIMeter(4, pairs=pairs).update(logits[:3], labels[:3]).update(logits[3:], labels[3:]).compute()
    assert meter["separation"].item() == pytest.approx(expected, rel=1e-12)
    assert meter["ncmi"].item() == pytest.approx(ncmi(probs, labels, 4, pairs=pairs).item(), rel=1e-12)
    assert ncmi(probs, labels, 4, pairs=pairs).item() == pytest.approx(brute_cmi(probs, labels, 4) / expected,
                                                                        rel=1e-10)


def test_separation_conventions_differ_by_the_pair_count():
    g = torch.Generator().manual_seed(4)
    k = 3
    probs = torch.softmax(torch.randn(12, k, generator=g, dtype=torch.float64), 1)
    balanced = torch.arange(12) % k  # D = N² − Σ n_c² = N²(1 − 1/K): the ratio is K/(K−1)
    ratio = separation(probs, balanced, k, pairs="different") / separation(probs, balanced, k)
    assert ratio.item() == pytest.approx(k / (k - 1), rel=1e-13)
    assert torch.equal(separation(probs, balanced, k), separation(probs, balanced, k, pairs="all"))  # the default
    one_class = torch.zeros(12, dtype=torch.long)  # no different-label pair
    assert separation(probs, one_class, k).item() == 0.0
    assert math.isnan(separation(probs, one_class, k, pairs="different").item())


def test_cmi_zero_when_outputs_equal_centroid():
    k = 4
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    per_class = torch.softmax(torch.randn(k, k, dtype=torch.float64), 1)
    probs = per_class[labels]
    assert conditional_mutual_information(probs, labels, k).item() == pytest.approx(0.0, abs=1e-15)
    assert CMIMeter(k).update(torch.log(probs), labels).compute()["cmi"].item() == pytest.approx(0.0, abs=1e-12)


def test_cmi_bounds_and_maximum():
    k = 5
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(torch.randn(200, k, generator=g, dtype=torch.float64) * 5, 1)
        labels = torch.randint(0, k, (200,), generator=g)
        cmi = conditional_mutual_information(probs, labels, k).item()
        assert 0.0 <= cmi <= math.log(k)
    # one-hot outputs spread uniformly over all K classes within one class: CMI = log K exactly
    probs = torch.eye(k, dtype=torch.float64).repeat(3, 1)
    labels = torch.zeros(3 * k, dtype=torch.long)
    assert conditional_mutual_information(probs, labels, k).item() == pytest.approx(math.log(k), rel=1e-12)


def test_invariant_to_sample_order():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(50, 3, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, 3, (50,), generator=g)
    perm = torch.randperm(50, generator=g)
    a = conditional_mutual_information(probs, labels, 3)
    b = conditional_mutual_information(probs[perm], labels[perm], 3)
    assert a.item() == pytest.approx(b.item(), rel=1e-14)
    assert separation(probs, labels, 3).item() == pytest.approx(separation(probs[perm], labels[perm], 3).item(), rel=1e-13)


def test_temperature_raises_cmi_of_confident_outputs():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (300,), generator=g)
    logits = torch.randn(300, 4, generator=g) + 6 * torch.nn.functional.one_hot(labels, 4)
    low = CMIMeter(4, temperature=1.0).update(logits, labels).compute()["cmi"]
    high = CMIMeter(4, temperature=4.0).update(logits, labels).compute()["cmi"]
    assert high > low
    ref = conditional_mutual_information(probabilities(logits, 4.0), labels, 4)
    assert high.item() == pytest.approx(ref.item(), rel=1e-9)


def test_kl_to_centroids_handles_zeros_and_inputs_unchanged():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    before = probs.clone()
    kl = kl_to_centroids(probs, labels, class_centroids(probs, labels, 1))
    q = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert kl[0].item() == pytest.approx(math.log(1 / 0.75))
    assert kl[1].item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert torch.equal(probs, before)
    assert q.sum() == 1


def test_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        CMIMeter(3, temperature=0)
    with pytest.raises(ValueError, match="labels"):
        conditional_mutual_information(torch.full((2, 3), 1 / 3), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="classes"):
        CMIMeter(3).update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pairs='same'.*'all', 'different'"):
        separation(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), 3, pairs="same")
    with pytest.raises(ValueError, match="pairs='diff'"):
        CMIMeter(3, pairs="diff")
