"""KD methods: each loss against a plainly written formula, identities, gradients; every method through fit."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmi_lab.losses import feature as L
from mcmi_lab.losses.logit import dkd_loss
from mcmi_lab.data.core import from_tensors
from mcmi_lab.kd import KD_METHODS, CRDObjective, distill, build_objective, method_hparams
from mcmi_lab.models import build_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def approx(x, **kw):
    return pytest.approx(float(x), rel=kw.get("rel", 1e-9), abs=kw.get("abs", 1e-12))


def pool_to(x, h, w):
    """Plain average pooling by integer factors."""
    b, c, hh, ww = x.shape
    fy, fx = hh // h, ww // w
    out = torch.zeros(b, c, h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = x[:, :, i * fy:(i + 1) * fy, j * fx:(j + 1) * fx].mean(dim=(2, 3))
    return out


def attention_plain(f):
    b, c, h, w = f.shape
    out = []
    for n in range(b):
        q = [sum(float(f[n, k, i, j]) ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


# ---- each loss: the plainly written formula, the identity, the gradient ----------------------------------------

def test_hint_loss():
    s, t = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    plain = sum(float(a - b) ** 2 for a, b in zip(s.flatten(), t.flatten())) / s.numel()
    assert L.hint_loss(s, t).item() == approx(plain)
    assert L.hint_loss(t, t).item() == 0.0


@pytest.mark.parametrize("loss, power", [(L.at_loss, 2), (L.factor_loss, 1)])
def test_attention_and_factor_loss(loss, power):
    s, t = rand(2, 3, 4, 4), rand(2, 5, 2, 2, seed=1)  # the student map is pooled to 2x2
    qs, qt = attention_plain(pool_to(s, 2, 2)), attention_plain(t)
    diffs = [abs(a - b) ** power for rs, rt in zip(qs, qt) for a, b in zip(rs, rt)]
    assert loss(s, t).item() == approx(sum(diffs) / len(diffs))
    assert loss(t, t).item() == approx(0.0, abs=1e-15)


def test_similarity_loss():
    s, t = rand(3, 2, 2, 2), rand(3, 4, 2, 2, seed=1)  # channels may differ: Gram matrices are B x B

    def gram(f):
        rows = [[float((f[i].flatten() * f[j].flatten()).sum()) for j in range(3)] for i in range(3)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]

    gs, gt = gram(s), gram(t)
    plain = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert L.similarity_loss(s, t).item() == approx(plain)
    assert L.similarity_loss(2 * t, t).item() == approx(0.0, abs=1e-15)  # scale-free per row


def test_correlation_loss():
    s, t = rand(4, 3), rand(4, 3, seed=1)
    d = (s - t).abs()
    plain = sum(float(d[i, k] * d[i + 1, k]) for i in range(3) for k in range(3)) / 3
    assert L.correlation_loss(s, t).item() == approx(plain)
    assert L.correlation_loss(t, t).item() == 0.0


def test_vid_loss_and_minimum_at_the_target():
    mu, t, ls = rand(2, 3, 2, 2), rand(2, 3, 2, 2, seed=1), rand(3, seed=2)
    var = [math.log1p(math.exp(float(v))) + 1e-5 for v in ls]
    terms = [0.5 * (float(mu[b, c, i, j] - t[b, c, i, j]) ** 2 / var[c] + math.log(var[c]))
             for b in range(2) for c in range(3) for i in range(2) for j in range(2)]
    assert L.vid_loss(mu, t, ls).item() == approx(sum(terms) / len(terms))
    at_target = t.clone().requires_grad_(True)
    L.vid_loss(at_target, t, ls).backward()
    assert at_target.grad.abs().max().item() == 0.0
    assert L.vid_loss(t + 0.1, t, ls).item() > L.vid_loss(t, t, ls).item()


def test_rkd_loss():
    s, t = rand(4, 3), rand(4, 5, seed=1)

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    def parts(x):
        n = len(x)
        dist = [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]
        mean = sum(dist[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
        dist = [[v / mean for v in row] for row in dist]
        ang = []
        for i in range(n):
            units = []
            for j in range(n):
                e = x[j] - x[i]
                units.append(e / max(float(e.norm()), 1e-12))
            ang += [float((units[j] * units[k]).sum()) for j in range(n) for k in range(n)]
        return [v for row in dist for v in row], ang

    (ds, as_), (dt, at) = parts(s), parts(t)
    plain = (25 * sum(huber(a, b) for a, b in zip(ds, dt)) / len(ds)
             + 50 * sum(huber(a, b) for a, b in zip(as_, at)) / len(as_))
    assert L.rkd_loss(s, t).item() == approx(plain, rel=1e-7)
    assert L.rkd_loss(3 * t, t).item() == approx(0.0, abs=1e-10)  # distances are relative, angles scale-free


def test_pkt_loss():
    s, t = rand(4, 3), rand(4, 6, seed=1)
    eps = 1e-7

    def cond(f):
        f = [row / (float(row.norm()) + eps) for row in f]
        k = [[(float((a * b).sum()) + 1) / 2 for b in f] for a in f]
        return [[v / sum(row) for v in row] for row in k]

    p, q = cond(s), cond(t)
    plain = sum(q[i][j] * math.log((q[i][j] + eps) / (p[i][j] + eps)) for i in range(4) for j in range(4)) / 16
    assert L.pkt_loss(s, t).item() == approx(plain)
    assert L.pkt_loss(t, t).item() == approx(0.0, abs=1e-15)


def test_ab_loss_and_zero_beyond_the_margin():
    s = [rand(2, 2, 2, 2), rand(2, 3, 1, 1, seed=1)]
    t = [rand(2, 2, 2, 2, seed=2), rand(2, 3, 1, 1, seed=3)]
    plain = 0.0
    for i, (a, b) in enumerate(zip(s, t)):
        layer = 0.0
        for x, y in zip(a.flatten().tolist(), b.flatten().tolist()):
            if y <= 0 and x > -1:
                layer += (x + 1) ** 2
            elif y > 0 and x <= 1:
                layer += (x - 1) ** 2
        plain += 2.0 ** (i - 1) * layer / 2 * 3 / 1000
    assert L.ab_loss(s, t).item() == approx(plain)
    beyond = [torch.where(b > 0, 1.5, -1.5).to(b) for b in t]  # every neuron on the teacher's side, past the margin
    assert L.ab_loss(beyond, t).item() == 0.0


def test_fsp_loss():
    s = [rand(2, 2, 4, 4), rand(2, 3, 2, 2, seed=1), rand(2, 2, 2, 2, seed=2)]
    t = [rand(2, 2, 4, 4, seed=3), rand(2, 3, 2, 2, seed=4), rand(2, 2, 2, 2, seed=5)]

    def fsp(a, b):  # the larger map pooled to the smaller
        if a.shape[2] > b.shape[2]:
            a = pool_to(a, *b.shape[2:])
        hw = a.shape[2] * a.shape[3]
        return [[[float((a[n, i] * b[n, j]).sum()) / hw for j in range(b.shape[1])] for i in range(a.shape[1])]
                for n in range(a.shape[0])]

    plain = 0.0
    for k in range(2):
        gs, gt = fsp(s[k], s[k + 1]), fsp(t[k], t[k + 1])
        diffs = [(x - y) ** 2 for ms, mt in zip(gs, gt) for rs, rt in zip(ms, mt) for x, y in zip(rs, rt)]
        plain += sum(diffs) / len(diffs)
    assert L.fsp_loss(s, t).item() == approx(plain)
    assert L.fsp_loss(t, t).item() == 0.0


def test_nst_loss():
    s, t = rand(2, 2, 3, 3), rand(2, 3, 3, 3, seed=1)

    def unit(f):
        return [[f[n, c].flatten() / float(f[n, c].norm()) for c in range(f.shape[1])] for n in range(f.shape[0])]

    us, ut = unit(s), unit(t)

    def mean_k(a, b):
        vals = [float((x * y).sum()) ** 2 for n in range(2) for x in a[n] for y in b[n]]
        return sum(vals) / len(vals)

    plain = mean_k(ut, ut) + mean_k(us, us) - 2 * mean_k(us, ut)
    assert L.nst_loss(s, t).item() == approx(plain)
    assert L.nst_loss(t, t).item() == approx(0.0, abs=1e-12)


def test_crd_scores_and_nce_loss():
    n, d, k, temp = 10, 3, 4, 0.5
    memory = F.normalize(rand(n, d), dim=1)
    anchor = F.normalize(rand(2, d, seed=1), dim=1)
    idx = torch.tensor([[0, 3, 5, 7, 9], [1, 2, 2, 4, 8]])
    scores = L.contrast_scores(anchor, memory, idx, temp)
    for b in range(2):
        for j in range(k + 1):
            assert scores[b, j].item() == approx(math.exp(float(memory[idx[b, j]] @ anchor[b]) / temp))
    z = float(scores.mean()) * n
    probs = scores / z
    noise, eps = k / n, 1e-7
    plain = 0.0
    for b in range(2):
        p0 = float(probs[b, 0])
        plain += math.log(p0 / (p0 + noise + eps))
        plain += sum(math.log(noise / (float(probs[b, j]) + noise + eps)) for j in range(1, k + 1))
    assert L.crd_nce_loss(probs, n).item() == approx(-plain / 2)


def test_dkd_loss_formula_and_kd_decomposition():
    zs, zt = rand(3, 4) * 2, rand(3, 4, seed=1) * 2
    labels = torch.tensor([0, 2, 3])
    temp, alpha, beta = 2.0, 0.7, 3.0
    plain, kd_parts, kd_plain = 0.0, 0.0, 0.0
    for i in range(3):
        ps, pt = torch.softmax(zs[i] / temp, 0).tolist(), torch.softmax(zt[i] / temp, 0).tolist()
        g = int(labels[i])
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd = sum(b * math.log(b / a) for a, b in zip(bs, bt))
        rs = [p / (1 - ps[g]) for j, p in enumerate(ps) if j != g]
        rt = [p / (1 - pt[g]) for j, p in enumerate(pt) if j != g]
        nckd = sum(b * math.log(b / a) for a, b in zip(rs, rt))
        plain += alpha * tckd + beta * nckd
        kd_parts += tckd + (1 - pt[g]) * nckd  # the paper's eq. (the KD loss decomposed)
        kd_plain += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    out = dkd_loss(zs, zt, labels, alpha, beta, temp)
    assert out.item() == approx(plain / 3 * temp**2)
    assert kd_parts == pytest.approx(kd_plain, rel=1e-9)
    assert dkd_loss(zt, zt, labels).item() == approx(0.0, abs=1e-12)


GRAD_CASES = {
    "hint": lambda s: L.hint_loss(s, rand(2, 3, 4, 4, seed=9)),
    "at": lambda s: L.at_loss(s, rand(2, 5, 2, 2, seed=9)),
    "sp": lambda s: L.similarity_loss(s, rand(2, 5, 2, 2, seed=9)),
    "cc": lambda s: L.correlation_loss(s.flatten(1), rand(2, 48, seed=9)),
    "vid": lambda s: L.vid_loss(s, rand(2, 3, 4, 4, seed=9), torch.zeros(3, dtype=torch.float64)),
    "rkd": lambda s: L.rkd_loss(s.reshape(4, -1), rand(4, 7, seed=9)),  # 3+ points: relative distances vary
    "pkt": lambda s: L.pkt_loss(s, rand(2, 7, seed=9)),
    "ab": lambda s: L.ab_loss([s], [rand(2, 3, 4, 4, seed=9)]),
    "ft": lambda s: L.factor_loss(s, rand(2, 2, 4, 4, seed=9)),
    "fsp": lambda s: L.fsp_loss([s, s[:, :2] * 2], [rand(2, 3, 4, 4, seed=9), rand(2, 2, 4, 4, seed=8)]),
    "nst": lambda s: L.nst_loss(s, rand(2, 2, 4, 4, seed=9)),
    "dkd": lambda s: dkd_loss(s.flatten(1)[:, :5], rand(2, 5, seed=9), torch.tensor([1, 4])),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_reach_the_student(name):
    s = rand(2, 3, 4, 4, seed=3).requires_grad_(True)
    loss = GRAD_CASES[name](s)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum().item() > 0


def test_losses_in_float32_under_autocast():
    s = rand(4, 6).float().bfloat16()
    t = rand(4, 6, seed=1).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.similarity_loss(s, t)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(L.similarity_loss(s.float(), t).item(), rel=1e-6)


# ---- the objectives through fit ---------------------------------------------------------------------------------

def tiny_data(n=256, k=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    for c in range(k):
        images[labels == c, :, c * 3:c * 3 + 4, 2:6] = 255
    return from_tensors(images, labels, k)


def pair(student_width=4, teacher_width=8, k=4):
    torch.manual_seed(0)
    teacher = build_model("cnn_tiny", k, 1, width=teacher_width)
    student = build_model("cnn_tiny", k, 1, width=student_width)
    return student, teacher


FAST = dict(batch_size=32, progress="off", log=False, precision="fp32", schedule="constant", augment=False)
# Only the method's own term is optimised (ce_weight 0), so its decrease is the method's doing.
OWN_TERM = {
    "ce": ("ce", {}),
    "kd": ("kd", dict(ce_weight=0.0, kd_weight=1.0)),
    "dkd": ("dkd", dict(ce_weight=0.0, warmup=1)),
    "crd": ("crd", dict(ce_weight=0.0, nce_k=64, feat_dim=16)),
    "reviewkd": ("reviewkd", dict(ce_weight=0.0, warmup=1)),
    "ctkd": ("kd", dict(ce_weight=0.0, kd_weight=1.0)),
}


@pytest.mark.parametrize("method", list(KD_METHODS))
def test_every_method_trains_its_term_down_and_leaves_the_teacher_alone(method):
    student, teacher = pair(student_width=8 if method == "fsp" else 4)
    term, hparams = OWN_TERM.get(method, (method, dict(ce_weight=0.0)))
    before = copy.deepcopy(teacher.state_dict())
    history = distill(student, teacher, tiny_data(128), method, epochs=2, **{**FAST, "batch_size": 16}, **hparams)
    assert history[-1][term] < history[0][term]
    if method != "ce":  # the no-KD baseline never touches the teacher, not even its mode
        assert not teacher.training and not any(m.training for m in teacher.modules())
        assert all(not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)  # weights and BN running statistics


def test_loss_is_the_weighted_sum_of_the_terms():
    student, teacher = pair()
    history = distill(student, teacher, tiny_data(128), "at", epochs=1, kd_weight=0.5, beta=300.0, **FAST)
    r = history[0]
    assert r["loss"] == pytest.approx(r["ce"] + 0.5 * r["kd"] + 300.0 * r["at"], rel=1e-5)


def test_dkd_warmup_ramp():
    student, teacher = pair()
    history = distill(student, teacher, tiny_data(128), "dkd", epochs=2, warmup=4, **FAST)
    for epoch, r in enumerate(history, 1):
        assert r["loss"] == pytest.approx(r["ce"] + epoch / 4 * r["dkd"], rel=1e-5)


def test_kd_and_ce_defaults():
    kd = build_objective("KD", nn.Linear(1, 1))
    assert (kd.temperature, kd.kd_weight, kd.ce_weight) == (4.0, 0.9, 0.1)
    dkd = build_objective("dkd", None)
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup, dkd.ce_weight) == (1.0, 8.0, 4.0, 20, 1.0)
    betas = {m: build_objective(m, None).beta for m in ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab",
                                                             "ft", "fsp", "nst", "crd")}
    assert betas == dict(fitnet=100, at=1000, sp=3000, cc=0.02, vid=1, rkd=1, pkt=30000, ab=1, ft=200, fsp=50,
                         nst=50, crd=0.8)
    at = build_objective("at", None)
    assert (at.ce_weight, at.kd_weight) == (1.0, 0.0)
    assert method_hparams("crd")["nce_k"] == 16384 and method_hparams("crd")["ce_weight"] == 1.0
    assert method_hparams("ab")["init_epochs"] == 0 and "init_epochs" not in method_hparams("at")


@pytest.mark.parametrize("method", ["ab", "fsp", "ft"])
def test_init_stage_leaves_the_classifier_untouched(method):
    student, teacher = pair(student_width=8 if method == "fsp" else 4)
    fc = student.fc.weight.detach().clone()
    stage1 = student.stage1[0].weight.detach().clone()
    history = distill(student, teacher, tiny_data(128), method, epochs=1, init_epochs=1, **FAST)
    assert torch.equal(student.fc.weight.cpu(), fc)  # no CE in the init stage: the classifier gets no gradient
    changed = not torch.equal(student.stage1[0].weight.cpu(), stage1)
    assert changed == (method != "ft")  # FT's init stage trains the paraphraser only
    assert ("ft_rec" if method == "ft" else method) in history[0]


def test_crd_objective_against_plain_nce_and_memory_update():
    student, teacher = pair()
    data = tiny_data(64)
    obj = CRDObjective(teacher, nce_k=5, feat_dim=4, nce_t=0.5, nce_m=0.3)
    obj.prepare(student, data)
    # negatives come from other classes only, and cover them
    labels = torch.tensor([0, 1, 2, 3] * 50)
    neg = obj.sample_negatives(labels)
    assert (data.labels[neg] != labels[:, None]).all()
    assert set(neg[labels == 0].flatten().tolist()) == set((data.labels != 0).nonzero().flatten().tolist())
    # the loss of one batch, with fixed negatives, against the formula written out
    fixed = torch.tensor([[1, 2, 3, 5, 6], [0, 2, 3, 4, 6]])
    obj.sample_negatives = lambda lab: fixed
    index = torch.tensor([4, 9])
    images = data.normalize(data.images[index])
    mem_s, mem_t = obj.memory_s.clone(), obj.memory_t.clone()
    student.train()
    _, terms = obj(student, images, data.labels[index], index)
    with torch.no_grad():
        feats = {}
        student.fc.register_forward_pre_hook(lambda m, i: feats.__setitem__("s", i[0]))
        teacher.fc.register_forward_pre_hook(lambda m, i: feats.__setitem__("t", i[0]))
        student(images), teacher(images)
        v_s, v_t = obj.embed_s(feats["s"]), obj.embed_t(feats["t"])
    idx = torch.cat([index[:, None], fixed], 1)
    n, m = 64, 5

    def nce(anchor, memory):
        scores = [[math.exp(float(memory[idx[b, j]] @ anchor[b]) / 0.5) for j in range(6)] for b in range(2)]
        z = sum(map(sum, scores)) / 12 * n
        total = 0.0
        for b in range(2):
            p = [v / z for v in scores[b]]
            total += math.log(p[0] / (p[0] + m / n + 1e-7))
            total += sum(math.log((m / n) / (q + m / n + 1e-7)) for q in p[1:])
        return -total / 2

    assert terms["crd"].item() == pytest.approx(nce(v_s, mem_t) + nce(v_t, mem_s), rel=1e-4)
    mixed = F.normalize(0.3 * mem_s[index] + 0.7 * v_s, dim=1)
    assert torch.allclose(obj.memory_s[index], mixed, atol=1e-5)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(obj.memory_s[untouched], mem_s[untouched])


def crd_prepared(labels, nce_k):
    """A CRD objective prepared for data with `labels` (4 classes)."""
    student, teacher = pair()
    images = torch.zeros(len(labels), 1, 16, 16, dtype=torch.uint8)
    data = from_tensors(images, torch.as_tensor(labels), 4)
    obj = CRDObjective(teacher, nce_k=nce_k, feat_dim=4)
    obj.prepare(student, data)
    return obj, data.labels


def other_classes(all_labels, label):
    return set((all_labels != label).nonzero().flatten().tolist())


def test_crd_negatives_are_distinct_when_the_other_classes_suffice():
    """RepDistiller's CIFAR100InstanceSample: np.random.choice(cls_negative[target], k, replace=k > len(...))."""
    obj, all_labels = crd_prepared(torch.arange(64) % 4, nce_k=20)  # 48 negatives per class
    labels = torch.tensor([0, 1, 2, 3] * 25)
    torch.manual_seed(0)
    neg = obj.sample_negatives(labels)
    assert neg.shape == (100, 20) and neg.dtype == torch.long
    for row, label in zip(neg.tolist(), labels.tolist()):
        assert len(set(row)) == 20  # without replacement
        assert set(row) <= other_classes(all_labels, label)  # never the anchor, never its class
    assert set(neg[labels == 0].flatten().tolist()) == other_classes(all_labels, 0)
    torch.manual_seed(0)
    assert torch.equal(obj.sample_negatives(labels), neg)  # the global seed fixes the draw
    # nce_k equal to the negatives available: every row is a permutation of exactly the other classes' samples
    obj, all_labels = crd_prepared(torch.arange(64) % 4, nce_k=48)
    for row, label in zip(obj.sample_negatives(labels).tolist(), labels.tolist()):
        assert sorted(row) == sorted(other_classes(all_labels, label))


def test_crd_negatives_are_uniform_subsets():
    obj, all_labels = crd_prepared(torch.arange(64) % 4, nce_k=24)
    torch.manual_seed(0)
    neg = obj.sample_negatives(torch.zeros(2000, dtype=torch.long))
    hits = torch.bincount(neg.flatten(), minlength=64)
    allowed = sorted(other_classes(all_labels, 0))
    assert hits[all_labels == 0].sum() == 0
    assert (hits[allowed] - 1000).abs().max() < 100  # 2000 rows · 24/48 each; binomial std 22


def test_crd_negatives_with_replacement_when_the_other_classes_are_fewer():
    obj, all_labels = crd_prepared(torch.arange(64) % 4, nce_k=100)  # 48 negatives per class < 100
    labels = torch.tensor([0, 1, 2, 3] * 10)
    torch.manual_seed(0)
    neg = obj.sample_negatives(labels)
    assert neg.shape == (40, 100)
    for row, label in zip(neg.tolist(), labels.tolist()):
        assert set(row) <= other_classes(all_labels, label)
    for label in range(4):  # 1000 draws over 48 samples: every one drawn
        assert set(neg[labels == label].flatten().tolist()) == other_classes(all_labels, label)


def test_crd_negatives_per_row_when_only_some_classes_suffice():
    """Class 0 holds 40 of 64 samples: its rows have 24 negatives (< nce_k 30, with replacement), the others 56."""
    obj, all_labels = crd_prepared(torch.tensor([0] * 40 + [1, 2, 3] * 8), nce_k=30)
    labels = torch.tensor([0, 1, 2, 3] * 25)
    torch.manual_seed(0)
    neg = obj.sample_negatives(labels)
    assert neg.shape == (100, 30)
    for row, label in zip(neg.tolist(), labels.tolist()):
        assert set(row) <= other_classes(all_labels, label)
        if label == 0:
            assert len(set(row)) < 30  # 30 draws from 24 samples
        else:
            assert len(set(row)) == 30
    assert set(neg[labels == 0].flatten().tolist()) == other_classes(all_labels, 0)


def test_crd_memory_resumes_exactly(tmp_path):
    data = tiny_data(64)
    kw = dict(nce_k=8, feat_dim=4, epochs=2, device="cpu", **FAST)  # CUDA kernels need not be deterministic
    student, teacher = pair()
    distill(student, teacher, data, "crd", checkpoint=tmp_path / "a.pt", **kw)
    full = copy.deepcopy(student.state_dict())
    student, teacher = pair()
    distill(student, teacher, data, "crd", checkpoint=tmp_path / "b.pt", **{**kw, "epochs": 1})
    student, teacher = pair()
    distill(student, teacher, data, "crd", checkpoint=tmp_path / "b.pt", resume=True, **kw)
    assert all(torch.equal(full[k], student.state_dict()[k]) for k in full)
    a, b = (torch.load(tmp_path / n, weights_only=True)["objective"] for n in ("a.pt", "b.pt"))
    assert torch.equal(a["memory_s"], b["memory_s"]) and "teacher" not in str(list(a))


def test_ft_stays_finite_with_a_deep_random_teacher():
    """Raw resnet56 maps made the jointly trained paraphraser diverge at lr 0.05 (non-finite by step 3)."""
    torch.manual_seed(0)
    teacher, student = build_model("resnet56", 4, 1), build_model("resnet8", 4, 1)
    history = distill(student, teacher, tiny_data(64, size=8), "ft", epochs=1, **{**FAST, "batch_size": 16})
    assert math.isfinite(history[0]["ft_rec"]) and math.isfinite(history[0]["ft"])


def test_zoo_resnets_wire_every_method():
    """Stem, stages, pre-ReLU features and the pooled vector of the CIFAR ResNets, on 8x8 inputs."""
    data = tiny_data(8, size=8)
    torch.manual_seed(0)
    teacher, student = build_model("resnet14", 4, 1), build_model("resnet8", 4, 1)
    images, labels = data.normalize(data.images), data.labels
    for method in KD_METHODS:
        obj = build_objective(method, teacher, **({"nce_k": 4} if method == "crd" else {}))
        obj.prepare(student, data)
        loss, terms = obj(student, images, labels, torch.arange(8))
        loss.backward()
        assert torch.isfinite(loss) and student.conv1.weight.grad.abs().sum() > 0, method
        student.zero_grad()
    at = build_objective("ab", teacher)
    at.prepare(student, data)
    assert [n for n, _ in at._points[0]] == ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact"]


def test_custom_models_through_explicit_layers_and_a_wrapped_teacher():
    from mcmi_lab.models.wrappers import TemperatureScaled

    student, teacher = pair()
    custom = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    history = distill(custom, TemperatureScaled(teacher, 2.0), tiny_data(64), "at", epochs=1,
                      student_layers=["1", "4"], **FAST)
    assert history[0]["at"] > 0
    with pytest.raises(ValueError, match="student_layers"):
        distill(custom, teacher, tiny_data(64), "at", epochs=1, **FAST)


# ---- errors -----------------------------------------------------------------------------------------------------

def test_unknown_method_and_hparam():
    student, teacher = pair()
    with pytest.raises(ValueError, match="method='hint' is not accepted: expected one of ce, kd, fitnet"):
        distill(student, teacher, tiny_data(64), "hint")
    with pytest.raises(ValueError, match="alpha=1 is not accepted for method .at..*kd_weight"):
        distill(student, teacher, tiny_data(64), "at", alpha=1)  # RepDistiller's -a is kd_weight here


def test_incompatible_pairs_name_layers_and_shapes():
    student, teacher = pair(student_width=4, teacher_width=8)
    before = copy.deepcopy(student.state_dict())
    data = tiny_data(64)
    with pytest.raises(ValueError, match=r"FSP needs equal channels.*'stage1' \(2, 4, 16, 16\).*'stage1' \(2, 8, 16"):
        distill(student, teacher, data, "fsp", **FAST)
    with pytest.raises(ValueError, match=r"FitNet cannot connect student 'stage3' \(2, 16, 4, 4\) to teacher "
                                         r"'stage1' \(2, 8, 16, 16\)"):
        distill(student, teacher, data, "fitnet", student_layers=["stage3"], teacher_layers=["stage1"], **FAST)
    with pytest.raises(ValueError, match=r"student \['stage2', 'stage3'\] and teacher \['stage3'\] differ"):
        distill(student, teacher, data, "nst", teacher_layers=["stage3"], **FAST)
    with pytest.raises(ValueError, match="equal logits"):
        distill(student, build_model("cnn_tiny", 3, 1, width=4), data, "at", kd_weight=1.0, **FAST)
    assert all(torch.equal(v, student.state_dict()[k].cpu()) for k, v in before.items())  # nothing trained
