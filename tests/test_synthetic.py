import math

import pytest
import torch
from torch.distributions import Normal

from mcmi_lab.data.registry import load_dataset
from mcmi_lab.data.synthetic import SyntheticTask, bayes_accuracy, kl_to_posterior, load_synthetic

SMALL = dict(num_classes=5, size=8, channels=3, separation=2.0, sigma=0.3, seed=1)


@pytest.fixture(scope="module")
def big_sample():
    """20000 samples of the default task and their posteriors (shared: sampling is the slow part)."""
    task = SyntheticTask()
    data = task.sample(20_000, seed=3)
    return task, data, task.posterior(data.images)


def _brute_force_posterior(task, images):
    """Bayes rule on Gaussian likelihoods: log N(x; offset + mu_k, sigma^2 I) + log(1/K), normalised."""
    means = (task.templates + task.offset).flatten(1)  # (K, D)
    x = images.double().flatten(1)[:, None, :]  # (N, 1, D)
    log_joint = Normal(means, task.sigma).log_prob(x).sum(-1) + math.log(1 / task.num_classes)
    return torch.exp(log_joint - torch.logsumexp(log_joint, 1, keepdim=True))


# ---- templates ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, SMALL, dict(num_classes=100, size=16)])
def test_templates_orthogonal_equal_norm_zero_mean(kwargs):
    task = SyntheticTask(**kwargs)
    mu = task.templates
    assert mu.shape == (task.num_classes, task.channels, task.size, task.size) and mu.dtype == torch.float64
    gram = mu.flatten(1) @ mu.flatten(1).T
    assert torch.allclose(gram, task.norm ** 2 * torch.eye(task.num_classes, dtype=torch.float64), atol=1e-12)
    assert task.norm == pytest.approx(task.separation * task.sigma)
    assert mu.mean(dim=(2, 3)).abs().max() < 1e-12  # zero-mean per channel: orthogonal to the offset


def test_templates_are_smooth():
    mu = SyntheticTask().templates[:, 0]
    # neighbouring pixels of a smooth field nearly agree: lag-1 correlation near 1 (white noise would give ~0)
    a, b = mu[:, :, :-1].flatten(), mu[:, :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_templates_copy_is_safe_to_mutate():
    task = SyntheticTask(**SMALL)
    task.templates.zero_()
    assert task.templates.abs().sum() > 0


# ---- posterior ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, SMALL])
def test_posterior_equals_brute_force_bayes_rule(kwargs):
    task = SyntheticTask(**kwargs)
    data = task.sample(200, seed=0)
    probs = task.posterior(data.images)
    assert probs.shape == (200, task.num_classes) and probs.dtype == torch.float64
    assert torch.allclose(probs, _brute_force_posterior(task, data.images), atol=1e-10, rtol=0)


def test_posterior_is_the_linear_softmax_without_offset():
    # zero-mean templates make mu_k . offset = 0, so P* = softmax(mu_k . x / sigma^2) on the raw image
    task = SyntheticTask(**SMALL)
    x = task.sample(50).images
    linear = torch.softmax(x.double().flatten(1) @ task.templates.flatten(1).T / task.sigma ** 2, 1)
    assert torch.allclose(task.posterior(x), linear, atol=1e-12)


def test_sampled_labels_agree_with_posterior_in_frequency(big_sample):
    task, data, probs = big_sample
    labels = data.labels

    def worst_z(p):
        """Reliability check: per bin of max posterior, (hits - expected hits) / sampling sd; the largest |z|."""
        conf, pred = p.max(1)
        hit = (pred == labels).double()
        edges = torch.tensor([0.0, 0.4, 0.6, 0.8, 0.9, 0.97, 1.0], dtype=torch.float64)
        zs = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.sum() >= 50:
                sd = torch.sqrt((conf[m] * (1 - conf[m])).sum())
                zs.append(float((hit[m].sum() - conf[m].sum()).abs() / sd))
        return max(zs)

    assert worst_z(probs) < 4.0
    # the same check catches a posterior at the wrong temperature, so it can fail
    assert worst_z(torch.softmax(task.logits(data.images) * 1.2, 1)) > 5.0
    assert worst_z(torch.softmax(task.logits(data.images) / 1.2, 1)) > 5.0
    # identity E[P*(y|x)] = E[Σ_k P*(k|x)^2], within 4 standard errors
    own = probs[torch.arange(len(labels)), labels]
    diff = own - (probs ** 2).sum(1)
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff))


# ---- Bayes accuracy -------------------------------------------------------------------------------------------

def test_bayes_accuracy_exact_cases():
    for k in (2, 10, 100):
        assert bayes_accuracy(0.0, k) == pytest.approx(1 / k, abs=1e-10)
    for s in (0.5, 1.0, 3.0):  # K = 2: P(z1 - z0 < s) = Φ(s / sqrt 2)
        assert bayes_accuracy(s, 2) == pytest.approx(0.5 * math.erfc(-s / 2), abs=1e-10)
    assert bayes_accuracy(12.0, 10) == pytest.approx(1.0, abs=1e-10)


def test_bayes_classifier_accuracy_matches_closed_form(big_sample):
    task, data, probs = big_sample
    acc = float((probs.argmax(1) == data.labels).double().mean())
    expected = task.bayes_accuracy()
    assert abs(acc - expected) < 3 * math.sqrt(expected * (1 - expected) / len(data))
    low = SyntheticTask(separation=1.5)
    low_data = low.sample(20_000, seed=4)
    low_acc = float((low.posterior(low_data.images).argmax(1) == low_data.labels).double().mean())
    expected = low.bayes_accuracy()
    assert abs(low_acc - expected) < 3 * math.sqrt(expected * (1 - expected) / len(low_data))
    assert low_acc < acc  # more overlap, lower accuracy


def test_overlap_knob_is_monotone():
    accs = [SyntheticTask(separation=s).bayes_accuracy() for s in (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)]
    assert all(a < b for a, b in zip(accs, accs[1:]))
    assert accs[0] == pytest.approx(0.1) and accs[-1] > 0.999
    assert SyntheticTask(num_classes=100, size=16).bayes_accuracy() < SyntheticTask().bayes_accuracy()


# ---- sampling and loading -------------------------------------------------------------------------------------

def test_sample_is_seeded_and_balanced():
    task = SyntheticTask(**SMALL)
    a, b = task.sample(103, seed=7), task.sample(103, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(SyntheticTask(**SMALL).templates, task.templates)
    assert not torch.equal(task.sample(103, seed=8).images, a.images)
    assert not torch.equal(SyntheticTask(**{**SMALL, "seed": 2}).templates, task.templates)
    counts = a.class_counts()
    assert counts.sum() == 103 and counts.min() == 20 and counts.max() == 21  # 103 = 5 * 20 + 3
    assert a.images.dtype == torch.float32 and a.images.shape == (103, 3, 8, 8)
    assert a.classes == tuple(f"class {i}" for i in range(5))
    assert a.pad == 0 and a.flip is False and a.name == "synthetic"
    assert (a.mean, a.std) == task.pixel_stats  # the task's statistics, not the sample's


def test_every_split_is_normalised_by_the_task_statistics():
    """Train and test of one task share one normalisation (a split's own statistics would shift the test inputs
    against the train ones), and the closed form matches the statistics of a large sample."""
    task = SyntheticTask(**SMALL)
    train, test = load_synthetic("train", n=50, **SMALL), load_synthetic("test", n=70, **SMALL)
    assert (train.mean, train.std) == (test.mean, test.std) == task.pixel_stats
    big = task.sample(20000, seed=3).images.double()
    mean, std = task.pixel_stats
    assert mean == pytest.approx(tuple(big.mean(dim=(0, 2, 3)).tolist()), abs=2e-3)
    assert std == pytest.approx(tuple(big.std(dim=(0, 2, 3)).tolist()), rel=5e-3)


def test_load_synthetic_splits_and_dispatch():
    train = load_synthetic("train", n=30, **SMALL)
    test = load_synthetic("test", n=30, **SMALL)
    assert len(train) == 30 and not torch.equal(train.images, test.images)
    assert len(load_synthetic("test")) == 2000
    via_data = load_dataset("synthetic", "train", n=30, **SMALL)
    assert torch.equal(via_data.images, train.images)
    with pytest.raises(ValueError, match="split"):
        load_synthetic("val")


@pytest.mark.parametrize("kwargs, name", [(dict(sigma=0.0), "sigma"), (dict(num_classes=1), "num_classes"),
                                          (dict(separation=-1.0), "separation"),
                                          (dict(size=2, num_classes=5), "num_classes")])
def test_task_rejects_bad_knobs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticTask(**kwargs)


def test_posterior_rejects_wrong_shape():
    with pytest.raises(ValueError, match="images"):
        SyntheticTask(**SMALL).posterior(torch.zeros(2, 1, 8, 8))


# ---- KL to the posterior --------------------------------------------------------------------------------------

def test_kl_to_posterior_exact_values():
    p = torch.softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), 1)
    assert kl_to_posterior(p, p) == pytest.approx(0.0, abs=1e-12)
    hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_to_posterior(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])) == pytest.approx(hand)
    # P* = 0 terms vanish: KL([1, 0] || [1/2, 1/2]) = log 2; rows are averaged
    true = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    model = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert kl_to_posterior(true, model) == pytest.approx(math.log(2) / 2)


def test_kl_to_posterior_underflowed_model_prob_is_finite():
    true = torch.tensor([[1.0 - 1e-60, 1e-60]], dtype=torch.float64)
    model = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    kl = kl_to_posterior(true, model)
    assert math.isfinite(kl) and kl == pytest.approx(0.0, abs=1e-50)


def test_kl_to_posterior_rejects_bad_input():
    with pytest.raises(ValueError, match="model_probs of shape"):
        kl_to_posterior(torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="not logits"):
        kl_to_posterior(torch.full((2, 3), 1 / 3), torch.randn(2, 3))
