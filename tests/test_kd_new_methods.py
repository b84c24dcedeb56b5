"""Issue 17's KD methods — KDSVD, DIST, ReviewKD, CTKD, MLKD and logit standardisation — each loss against its
formula written plainly; the objectives through fit are in tests/test_kd.py (every method of KD_METHODS)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mcmi_lab.data.core import from_tensors
from mcmi_lab.kd import KD_METHODS, CTKDObjective, ReviewKDObjective, build_objective
from mcmi_lab.kd.logit import ctkd_lambda
from mcmi_lab.losses.feature import hcl_loss, kdsvd_loss
from mcmi_lab.losses.logit import ctkd_temperature, dist_loss, gradient_reversal, mlkd_loss, standardize_logits
from mcmi_lab.losses.teacher import kd_loss
from mcmi_lab.models import build_model, classifier_layer, feature_layers
from mcmi_lab.training.loop import fit


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax_rows(z, t=1.0):
    out = []
    for row in z.tolist():
        e = [math.exp(v / t) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)) + 1e-8)


S, T = rand(5, 4) * 2, rand(5, 4, seed=1) * 2


# ---- logit standardisation --------------------------------------------------------------------------------------

def test_standardize_logits_is_the_z_score_and_makes_kd_scale_free():
    z = S.tolist()
    for row, out in zip(z, standardize_logits(S).tolist()):
        mean = sum(row) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / 3)  # unbiased, as the authors' torch.std
        assert out == pytest.approx([(v - mean) / (std + 1e-7) for v in row], rel=1e-12)
    a = kd_loss(standardize_logits(S), standardize_logits(T), 2.0)
    b = kd_loss(standardize_logits(3 * S + 5), standardize_logits(0.5 * T - 1), 2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)  # the range of the logits no longer matters
    assert kd_loss(S, T, 2.0).item() != pytest.approx(kd_loss(3 * S, T, 2.0).item(), rel=1e-3)


@pytest.mark.parametrize("method", ["kd", "dkd", "mlkd", "ctkd"])
def test_logit_standardization_reaches_the_loss(method):
    torch.manual_seed(0)
    student, teacher = build_model("cnn_tiny", 4, 1, width=4), build_model("cnn_tiny", 4, 1, width=8)
    images = torch.randn(8, 1, 16, 16)
    labels = torch.arange(8) % 4
    data = from_tensors(torch.zeros(8, 1, 16, 16, dtype=torch.uint8), labels, 4)
    terms = {}
    for flag in (False, True):
        obj = build_objective(method, teacher, logit_standardization=flag)
        obj.prepare(student, data)
        student.eval()
        _, terms[flag] = obj(student, images, labels)
    term = {"kd": "kd", "dkd": "dkd", "mlkd": "mlkd", "ctkd": "kd"}[method]
    with torch.no_grad():
        s, t = standardize_logits(student(images)), standardize_logits(teacher(images))
    if method == "kd":
        assert terms[True]["kd"].item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-5)
    if method == "mlkd":  # the instance level on Z-scored logits, the class and batch levels on the raw ones
        with torch.no_grad():
            raw = mlkd_loss(student(images), teacher(images), (4.0, 3.0, 5.0, 2.0, 6.0), standardize_instance=True)
        assert terms[True]["mlkd"].item() == pytest.approx(raw.item(), rel=1e-5)
    assert terms[True][term].item() != pytest.approx(terms[False][term].item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"^logit_standardization='yes' is not accepted: expected True or False$"):
        build_objective(method, teacher, logit_standardization="yes")


# ---- DIST and MLKD ----------------------------------------------------------------------------------------------

def test_dist_loss_formula():
    tau, beta, gamma = 2.0, 0.7, 1.3
    ys, yt = softmax_rows(S, tau), softmax_rows(T, tau)
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / 5
    cols = lambda y: [[row[k] for row in y] for k in range(4)]  # noqa: E731
    intra = 1 - sum(pearson(a, b) for a, b in zip(cols(ys), cols(yt))) / 4
    assert dist_loss(S, T, beta, gamma, tau).item() == pytest.approx(tau**2 * (beta * inter + gamma * intra),
                                                           rel=1e-9)
    assert dist_loss(T, T).item() == pytest.approx(0.0, abs=1e-6)  # DIST's eps 1e-8 in the cosine


def test_mlkd_loss_formula():
    temps = (2.0, 4.0)
    total = 0.0
    for t in temps:
        ps, pt = softmax_rows(S, t), softmax_rows(T, t)
        total += t**2 * sum(sum(b * math.log(b / a) for a, b in zip(rs, rt)) for rs, rt in zip(ps, pt)) / 5
        for gram, n in ((lambda p, i, j: sum(p[b][i] * p[b][j] for b in range(5)), 4),   # class level: PᵀP, K x K
                        (lambda p, i, j: sum(p[i][k] * p[j][k] for k in range(4)), 5)):  # batch level: PPᵀ, B x B
            total += sum((gram(pt, i, j) - gram(ps, i, j)) ** 2 for i in range(n) for j in range(n)) / n
    assert mlkd_loss(S, T, temps).item() == pytest.approx(total, rel=1e-9)
    assert mlkd_loss(T, T).item() == pytest.approx(0.0, abs=1e-12)


def _mlkd_plainly(s, t, temps, standardize_instance):
    """MLKD as Sun et al.'s MLKD.py computes it (no masks, one view): Σ_T T²·KL at the instance level, on Z-scored
    logits when `standardize_instance`, plus the class (PᵀP) and batch (PPᵀ) levels on the raw logits."""
    def zscore(z):
        out = []
        for row in z.tolist():
            mean = sum(row) / len(row)
            std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
            out.append([(v - mean) / (1e-7 + std) for v in row])
        return torch.tensor(out, dtype=torch.float64)

    b, k = s.shape
    zs, zt = (zscore(s), zscore(t)) if standardize_instance else (s, t)
    total = 0.0
    for temp in temps:
        qs, qt = softmax_rows(zs, temp), softmax_rows(zt, temp)
        total += temp**2 * sum(sum(y * math.log(y / x) for x, y in zip(rs, rt)) for rs, rt in zip(qs, qt)) / b
        ps, pt = softmax_rows(s, temp), softmax_rows(t, temp)
        for gram, n in ((lambda p, i, j: sum(p[r][i] * p[r][j] for r in range(b)), k),
                        (lambda p, i, j: sum(p[i][c] * p[j][c] for c in range(k)), b)):
            total += sum((gram(pt, i, j) - gram(ps, i, j)) ** 2 for i in range(n) for j in range(n)) / n
    return total


def test_mlkd_with_logit_standardization_z_scores_only_the_instance_level():
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    s, t = S * 3 + 1, T * 0.5 - 2  # logits of different ranges: the Z-score matters
    got = mlkd_loss(s, t, temps, standardize_instance=True).item()
    assert got == pytest.approx(_mlkd_plainly(s, t, temps, True), rel=1e-9)
    assert mlkd_loss(s, t, temps).item() == pytest.approx(_mlkd_plainly(s, t, temps, False), rel=1e-9)
    both = mlkd_loss(standardize_logits(s), standardize_logits(t), temps).item()  # what mcmi_lab computed before
    assert got != pytest.approx(both, rel=1e-3)
    teacher = torch.nn.Linear(3, 4).double()
    student = torch.nn.Linear(3, 4).double()
    x, y = rand(5, 3, seed=2), torch.arange(5) % 4
    obj = build_objective("mlkd", teacher, logit_standardization=True, kd_weight=9.0, ce_weight=0.0)
    loss, terms = obj(student, x.float().double(), y)
    with torch.no_grad():
        expected = 9.0 * _mlkd_plainly(student(x), teacher(x), temps, True)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---- CTKD: gradient reversal, the temperature, the curriculum ---------------------------------------------------

def test_gradient_reversal_and_ctkd_temperature():
    x = torch.tensor([0.3, -1.0], requires_grad=True)
    y = gradient_reversal(x, 0.25)
    assert torch.equal(y.detach(), x.detach())
    (y * torch.tensor([2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [-0.5, -0.75]
    theta = torch.tensor(1.0)
    assert ctkd_temperature(theta, 0.5).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert [ctkd_lambda(e) for e in (0, 1, 5, 10, 30)] == pytest.approx(
        [0.0, (1 - math.cos(math.pi / 10)) / 2, 0.5, 1.0, 1.0])


def test_sign_ctkd_step_raises_the_distillation_loss_in_the_temperature():
    """The reversal: an SGD step on θ moves T to where the KD loss is larger (the student's step lowers it)."""
    def after_step(lam):
        theta = torch.tensor(0.0, requires_grad=True)
        kd_loss(S, T, ctkd_temperature(theta, lam)).backward()
        with torch.no_grad():
            new = theta - 0.5 * theta.grad
            return kd_loss(S, T, ctkd_temperature(new, lam)).item()

    start = kd_loss(S, T, ctkd_temperature(torch.tensor(0.0), 0.0)).item()
    assert after_step(1.0) > start
    assert after_step(0.0) == pytest.approx(start)


def test_ctkd_temperature_is_trained_by_fit():
    torch.manual_seed(0)
    student, teacher = build_model("cnn_tiny", 4, 1, width=4), build_model("cnn_tiny", 4, 1, width=8)
    labels = torch.arange(64) % 4
    data = from_tensors(torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8), labels, 4)
    obj = CTKDObjective(teacher, decay_epochs=1)
    start = obj.global_t.item()
    history = fit(student, data, obj, epochs=1, batch_size=16, progress="off", log=False, precision="fp32",
                  augment=False, schedule="constant")
    assert obj.global_t.item() != start and "temperature" in history[0]


# ---- KDSVD and ReviewKD -----------------------------------------------------------------------------------------

def right_singular_plain(f, n):
    """Per sample: the SVD of the (C·H, W) matrix, its first n right singular vectors and normalised values."""
    b, c, h, w = f.shape
    vs, ss = [], []
    for i in range(b):
        _, s, vh = torch.linalg.svd(f[i].reshape(c * h, w), full_matrices=False)
        v = vh.t()[:, :n].tolist()  # W x n
        cols = [[v[r][j] for r in range(w)] for j in range(len(v[0]))]
        cols = [[x / math.sqrt(sum(y * y for y in col)) for x in col] for col in cols]
        sv = s[:n].tolist()
        ss.append([x / math.sqrt(sum(y * y for y in sv)) for x in sv])
        vs.append(cols)  # n columns of length W
    return vs, ss


def test_kdsvd_loss_formula():
    fs = [rand(2, 3, 4, 5, seed=1), rand(2, 2, 3, 6, seed=2)]
    ft = [rand(2, 6, 4, 5, seed=3), rand(2, 5, 3, 6, seed=4)]
    per_layer = []
    for a, t in zip(fs, ft):
        vt, st = right_singular_plain(t, 1)
        vs, _ = right_singular_plain(a, 4)
        layer = []
        for b in range(2):
            cos = [sum(x * y for x, y in zip(col, vt[b][0])) for col in vs[b]]
            best = max(range(len(cos)), key=lambda j: abs(cos[j]))
            sign = 1.0 if cos[best] > 0 else -1.0
            layer.append(([sign * x * st[b][0] for x in vs[b][best]], [x * st[b][0] for x in vt[b][0]]))
        per_layer.append(layer)
    plain = 0.0
    for b in range(2):
        (s1, t1), (s0, t0) = per_layer[1][b], per_layer[0][b]
        for p in range(len(s1)):
            for q in range(len(s0)):
                g_s, g_t = math.exp(-(s1[p] - s0[q]) ** 2 / 8), math.exp(-(t1[p] - t0[q]) ** 2 / 8)
                plain += (g_s - g_t) ** 2
    assert kdsvd_loss(fs, ft).item() == pytest.approx(plain / 2, rel=1e-9)
    assert kdsvd_loss(ft, ft).item() == pytest.approx(0.0, abs=1e-20)


def test_hcl_loss_formula():
    fs, ft = [rand(2, 3, 4, 4), rand(2, 3, 1, 1, seed=2)], [rand(2, 3, 4, 4, seed=1), rand(2, 3, 1, 1, seed=3)]

    def mse(a, b):
        return float((a - b).pow(2).mean())

    pool = lambda x, n: F.adaptive_avg_pool2d(x, n)  # noqa: E731
    level_4x4 = (mse(fs[0], ft[0]) + 0.5 * mse(pool(fs[0], 2), pool(ft[0], 2)) + 0.25 * mse(pool(fs[0], 1),
                                                                                            pool(ft[0], 1))) / 1.75
    assert hcl_loss(fs, ft).item() == pytest.approx(level_4x4 + mse(fs[1], ft[1]), rel=1e-12)


def test_reviewkd_fuses_the_student_levels_into_the_teacher_shapes():
    torch.manual_seed(0)
    student, teacher = build_model("cnn_tiny", 4, 1, width=4), build_model("cnn_tiny", 4, 1, width=8)
    data = from_tensors(torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.arange(8) % 4, 4)
    obj = ReviewKDObjective(teacher)
    obj.prepare(student, data)
    s_points, t_points = obj._points
    assert s_points == [(n, "out") for n in feature_layers(student)[1:]] + [(classifier_layer(student), "in")]
    assert t_points == [(n, "out") for n in feature_layers(teacher, preact=True)[1:]] + [(classifier_layer(teacher),
                                                                                          "in")]
    feats = [torch.randn(2, *shape[1:]) for _, shape in obj._built_for[0]]
    outs = obj.review(feats)
    assert [tuple(o.shape[1:]) for o in outs] == [tuple(shape[1:]) + (1, 1) * (len(shape) == 2)
                                                 for _, shape in obj._built_for[1]]
    assert obj.method_weight() == pytest.approx(5.0 / 20)  # warm-up: epoch 1 of 20
    assert sum(p.numel() for p in obj.parameters()) > 0


def test_new_methods_are_registered_with_the_authors_defaults():
    assert {"kdsvd", "dist", "reviewkd", "ctkd", "mlkd"} <= set(KD_METHODS)
    d = build_objective("dist", None)
    assert (d.beta, d.gamma, d.temperature, d.kd_weight, d.ce_weight) == (1.0, 1.0, 4.0, 2.0, 1.0)
    m = build_objective("mlkd", None)
    assert (m.temperatures, m.kd_weight, m.ce_weight) == ((4.0, 3.0, 5.0, 2.0, 6.0), 0.9, 0.1)
    c = build_objective("ctkd", None)
    assert (c.t_start, c.t_end, c.decay_epochs, c.kd_weight, c.ce_weight, c.global_t.item()) == (1, 20, 10, .9, .1, 1)
    r = build_objective("reviewkd", None)
    assert (r.beta, r.warmup, r.ce_weight) == (5.0, 20, 1.0)
    k = build_objective("kdsvd", None)
    assert (k.beta, k.k, k.ce_weight) == (1.0, 1, 1.0)
    with pytest.raises(ValueError, match=r"^temperature=2 is not accepted for method 'ctkd': expected a TrainConfig "
                                         r"field or one of t_start"):
        build_objective("ctkd", None, temperature=2)
    with pytest.raises(ValueError, match=r"^gamma=1 is not accepted for method 'kdsvd'"):
        build_objective("kdsvd", None, gamma=1)
