import copy

import pytest
import torch
import torch.nn.functional as F

from mcmi_lab.metrics.cmi import CMIMeter, class_centroids, conditional_mutual_information
from mcmi_lab.losses.teacher import kd_loss, kl_to_centroids_loss, mcmi_loss


def test_kd_loss_zero_on_identical_logits_and_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert kd_loss(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 3.0
    pt, ps = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    ref = T**2 * (pt * (pt.log() - ps.log())).sum(1).mean()
    assert kd_loss(s, t, T).item() == pytest.approx(ref.item(), rel=1e-5)


def test_mcmi_loss_formula_and_constant_centroids():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    q = torch.softmax(torch.randn(4, 4, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    p = torch.softmax(logits, 1)
    kl = (p * (p.log() - q.detach()[labels].log())).sum(1).mean()
    ref = F.cross_entropy(logits, labels) - 0.3 * kl
    out = mcmi_loss(logits, labels, q, 0.3)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    out.backward()
    assert q.grad is None  # centroids are constants
    assert logits.grad is not None


def test_mcmi_loss_gradcheck():
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1, 2, 1])
    q = torch.softmax(torch.randn(3, 3, generator=g, dtype=torch.float64), 1)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mcmi_loss(x.double(), labels, q, 0.25).double(), (logits,))
    assert torch.autograd.gradcheck(lambda x: kl_to_centroids_loss(x, labels, q).double(), (logits,))


def test_sign_mcmi_step_raises_cmi_relative_to_lambda_zero():
    """The sign pin: from the same weights and batch, a step of CE − λ·KL (λ > 0) leaves a higher CMI than λ = 0."""
    torch.manual_seed(0)
    k = 4
    model = torch.nn.Linear(6, k)
    x = torch.randn(64, 6)
    labels = torch.arange(64) % k
    with torch.no_grad():
        centroids = class_centroids(torch.softmax(model(x), 1), labels, k)

    def after_step(lam):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        logits = m(x)
        if lam >= 0:
            loss = mcmi_loss(logits, labels, centroids, lam)
        else:  # the flipped sign, written out: mcmi_loss itself refuses a negative λ
            loss = F.cross_entropy(logits, labels) - lam * kl_to_centroids_loss(logits, labels, centroids)
        loss.backward()
        opt.step()
        with torch.no_grad():
            return conditional_mutual_information(torch.softmax(m(x), 1), labels, k).item()

    cmi_mcmi, cmi_mll = after_step(0.5), after_step(0.0)
    assert cmi_mcmi > cmi_mll
    # and the flipped sign (the third-party bug) lowers it
    assert after_step(-0.5) < cmi_mll
    assert CMIMeter(k).update(model(x).detach(), labels).compute()["cmi"] > 0


@pytest.mark.parametrize("lam", [-0.5, float("nan"), float("inf"), "0.5", True])
def test_mcmi_loss_refuses_a_negative_or_non_finite_lambda(lam):
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"lam=.* is not accepted: expected a finite number >= 0"):
        mcmi_loss(logits, labels, torch.full((3, 3), 1 / 3), lam)
