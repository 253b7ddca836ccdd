"""DP-Net's maths (dpnet.train.model, dpnet.train.losses) against slow references that live here, in the tests.

Loop references (plain Python over lists) check each term's value; a plain-autograd composition
checks the fused op's hand-written backward, dense and sparse, and float64 gradcheck checks both.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpnet.train.losses import class_specific, orthogonality, part_classes
from dpnet.train.model import DPNetModule


# ------------------------------------------------------------------------- loop references
def ref_orth(u):
    p = len(u)
    un = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in u.tolist()]
    s = 0.0
    for i in range(p):
        for j in range(p):
            if i != j:
                s += sum(a * b for a, b in zip(un[i], un[j])) ** 2
    return s / p**2


def ref_assign(u, x):
    """Mean over images and regions of the entropy of softmax over parts of u^_p . x_r."""
    un = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in u.tolist()]
    total = 0.0
    for img in x.tolist():
        h_img = 0.0
        for reg in img:
            z = [sum(a * b for a, b in zip(up, reg)) for up in un]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            a = [v / sum(e) for v in e]
            h_img += -sum(v * math.log(v) for v in a)
        total += h_img / len(img)
    return total / len(x)


def ref_cs(v, q):
    c, p = v.shape
    s = 0.0
    for ci in range(c):
        for pi in range(p):
            if pi // q != ci:
                s += abs(float(v[ci, pi].detach()))
    return s / (p * (c - 1))


def ref_logits(m, raw):
    """Loop reference of the forward: standardise, score, max over regions, normalise, V b."""
    x = ((raw - m.mean) / m.std).tolist()
    u, v = m.parts.tolist(), m.classifier.tolist()
    out = []
    for img in x:
        best = [max(sum(a * b for a, b in zip(up, reg)) for reg in img) for up in u]
        norm = math.sqrt(sum(t * t for t in best))
        b = [t / norm for t in best]
        out.append([sum(vc[p] * b[p] for p in range(len(b))) for vc in v])
    return out


def plain_loss(m, raw, y, rows=None):
    """The whole training loss as plain autograd ops (the fused op's reference)."""
    s = ((raw - m.mean) / m.std) @ m.parts.T  # (N, R, P)
    logits = m.logits(F.normalize(s.max(1).values, dim=1))
    terms = {"ce": F.cross_entropy(logits, y)}
    if "assign" in m.constraints:
        s_e = s if rows is None else s.gather(1, rows.unsqueeze(-1).expand(-1, -1, s.shape[2]))
        logp = (s_e / m.parts.norm(dim=1)).log_softmax(-1)
        terms["assign"] = -(logp.exp() * logp).sum(-1).mean()
    if "orth" in m.constraints:
        terms["orth"] = orthogonality(m.parts)
    if "cs" in m.constraints:
        terms["cs"] = class_specific(m.classifier, m.part_classes())
    return terms["ce"] + sum(m.lambdas[k] * v for k, v in terms.items() if k != "ce"), terms


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def random_module(gen, d=6, p=4, c=2, q=2, constraints=("orth", "assign", "cs"), dtype=torch.float64):
    m = DPNetModule(d, p, c, q, constraints, {"orth": 0.3, "assign": 0.7, "cs": 0.2, "clst": 0.5}).to(dtype)
    with torch.no_grad():
        m.parts.copy_(torch.randn(p, d, generator=gen))
        m.classifier.copy_(torch.randn(c, p, generator=gen))
        m.mean.copy_(torch.randn(d, generator=gen))
        m.std.copy_(torch.rand(d, generator=gen) + 0.5)
    return m


# ------------------------------------------------------------------------------- the terms
def test_orthogonality_matches_loop(gen):
    u = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert orthogonality(u).item() == pytest.approx(ref_orth(u), rel=1e-10)
    assert orthogonality(torch.eye(4, dtype=torch.float64)).item() == 0.0
    same = torch.ones(3, 4, dtype=torch.float64)
    assert orthogonality(same).item() == pytest.approx(6 / 9)  # plus sign: coinciding parts cost


def test_orthogonality_with_more_parts_than_dimensions_takes_the_small_gram(gen):
    """P > D (1,000 parts in a PCA 256 space): C_orth and its gradient equal the loop's, and no (P, P)
    matrix is formed: ||U U^T||_F = ||U^T U||_F, so the D x D Gram gives the same sum at D / P of the work."""
    from torch.profiler import ProfilerActivity, profile

    p, d = 40, 7
    u = torch.randn(p, d, generator=gen, dtype=torch.float64)
    assert orthogonality(u).item() == pytest.approx(ref_orth(u), rel=1e-10)
    u[3] = 0.0  # a dead part: normalised to zero (F.normalize), so it adds nothing, on the diagonal too
    u.requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        value = orthogonality(u)
        value.backward()
    v = u.detach().clone().requires_grad_(True)
    un = torch.nn.functional.normalize(v, dim=1)
    gram = un @ un.T
    slow = (gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / p**2  # the P x P way
    slow.backward()
    assert value.item() == pytest.approx(slow.item(), rel=1e-10)
    torch.testing.assert_close(u.grad, v.grad, rtol=1e-9, atol=1e-12)
    assert not [e.name for e in prof.events() if any(tuple(s) == (p, p) for s in e.input_shapes if s)]
    few = torch.randn(5, 9, generator=gen, dtype=torch.float64)  # P < D: the parts' Gram, as before
    assert orthogonality(few).item() == pytest.approx(ref_orth(few), rel=1e-10)


def test_class_specific_matches_loop(gen):
    v = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    assert class_specific(v, part_classes(v.shape[1], 2)).item() == pytest.approx(ref_cs(v, 2), rel=1e-12)
    own_only = torch.zeros(3, 6, dtype=torch.float64)
    own_only[0, :2] = own_only[1, 2:4] = own_only[2, 4:] = -5.0
    assert class_specific(own_only, part_classes(own_only.shape[1], 2)).item() == 0.0  # a class's own parts are free
    assert class_specific(-v.abs(), part_classes(v.shape[1], 2)).item() > 0  # L1: negative weights cost too


@pytest.mark.parametrize("term", ["orth", "cs"])
def test_gradcheck_of_the_weight_terms(term, gen):
    u = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, generator=gen, dtype=torch.float64).add(0.3).requires_grad_()
    fn = {"orth": lambda: torch.autograd.gradcheck(orthogonality, (u,)),
          "cs": lambda: torch.autograd.gradcheck(lambda b: class_specific(b, part_classes(b.shape[1], 2)), (v,))}[term]
    assert fn()


# ------------------------------------------------------------------------------ the module
def test_forward_and_contributions_match_the_loop(gen):
    m = random_module(gen, d=3, p=4, c=2)
    raw = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(raw), torch.tensor(ref_logits(m, raw), dtype=torch.float64))
        pooled = m.pool(m.scores(raw))
        s = m.scores(raw)
        for n in range(5):
            for p in range(4):
                assert s[n, pooled.where[n, p], p] == pooled.raw[n, p] == s[n, :, p].max()
        torch.testing.assert_close(m.contributions(pooled.b).sum(-1), m(raw))


def test_pool_with_a_mask_leaves_regions_out(gen):
    m = random_module(gen)
    s = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, s[0].argmax(0)] = False  # drop every part's best region of image 0
    out = m.pool(s, keep)
    for p in range(4):
        want = max(float(s[0, r, p]) for r in range(5) if keep[0, r])
        assert out.raw[0, p].item() == pytest.approx(want)
    torch.testing.assert_close(out.raw[1], s[1].max(0).values)


def test_the_loss_matches_the_loop_references(gen):
    m = random_module(gen)
    raw = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    loss, terms = m.loss(raw, y, gemm_dtype=torch.float64)
    x = (raw - m.mean) / m.std
    ce = F.cross_entropy(torch.tensor(ref_logits(m, raw), dtype=torch.float64), y).item()
    want = {"ce": ce, "assign": ref_assign(m.parts, x), "orth": ref_orth(m.parts), "cs": ref_cs(m.classifier, 2)}
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-10)
    assert loss.item() == pytest.approx(ce + 0.7 * want["assign"] + 0.3 * want["orth"] + 0.2 * want["cs"], rel=1e-10)
    # a mean over regions, not a sum: repeating every region leaves C_assign unchanged
    assert m.loss(raw.repeat(1, 3, 1), y, gemm_dtype=torch.float64)[1]["assign"].item() == pytest.approx(
        want["assign"], rel=1e-10)


@pytest.mark.parametrize("constraints", [(), ("orth", "cs"), ("orth", "assign", "cs")])
def test_the_loss_switches_its_terms(gen, constraints):
    m = random_module(gen, constraints=constraints)
    _, terms = m.loss(torch.randn(2, 5, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 1]),
                      gemm_dtype=torch.float64)
    assert set(terms) == {"ce", *constraints}


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("subset", [False, True])
def test_the_fused_loss_gradient_equals_plain_autograd(gen, sparse, subset):
    """The fused op's hand-written backward (dense, or the argmax gather) against plain autograd."""
    m = random_module(gen)
    raw = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    rows = torch.stack([torch.randperm(7, generator=gen)[:3] for _ in range(3)]) if subset else None
    got = torch.autograd.grad(m.loss(raw, y, gemm_dtype=torch.float64, rows=rows, sparse=sparse)[0],
                              (m.parts, m.classifier))
    want = torch.autograd.grad(plain_loss(m, raw, y, rows)[0], (m.parts, m.classifier))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_argmax_gather_gives_the_dense_gradient_exactly(gen):
    """No entropy term: the sparse backward is the dense one's sum over its non-zero rows."""
    m = random_module(gen, constraints=())
    raw = torch.randn(4, 9, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    dense = torch.autograd.grad(m.loss(raw, y, gemm_dtype=torch.float64)[0], m.parts)[0]
    sparse = torch.autograd.grad(m.loss(raw, y, gemm_dtype=torch.float64, sparse=True)[0], m.parts)[0]
    torch.testing.assert_close(sparse, dense, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_sparse_backward_runs_as_many_ops_whatever_the_number_of_parts(gen, dtype):
    """Issue 18: the max-pool's dW is one batched gather and one reduction, with the entropy rows picked
    alike: no loop over parts or images, in Python or inside an op (a batched matmul with a batch per
    part runs a copy per part on the CPU), so a step's op count does not grow with P."""
    from torch.profiler import ProfilerActivity, profile

    def ops(p, d=256):  # below a few hundred dimensions the batched matmul takes another path
        m = random_module(gen, d=d, p=p, q=p // 2, dtype=dtype)
        raw = torch.randn(3, 9, d, generator=gen, dtype=dtype)
        rows = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(3)])
        loss = m.loss(raw, torch.tensor([0, 1, 1]), gemm_dtype=dtype, rows=rows, sparse=True)[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss.backward()
        return sum(e.count for e in prof.key_averages())

    assert ops(4) == ops(100)


def test_the_subsampled_entropy_gradient_is_unbiased(gen):
    """Over every draw of k of the R regions (each image independently), the mean gradient is the exact one."""
    m = random_module(gen, constraints=("assign",))
    m.lambdas["assign"] = 1.0
    raw = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1])
    exact = torch.autograd.grad(m.loss(raw, y, gemm_dtype=torch.float64, sparse=True)[0], m.parts)[0]
    draws = 4000
    total = torch.zeros_like(exact)
    rng = torch.Generator().manual_seed(1)
    for _ in range(draws):
        rows = torch.stack([torch.randperm(6, generator=rng)[:2] for _ in range(2)])
        total += torch.autograd.grad(m.loss(raw, y, gemm_dtype=torch.float64, rows=rows, sparse=True)[0], m.parts)[0]
    mean = total / draws
    # the CE part is identical in every draw; the entropy part averages to the exact one
    err = (mean - exact).norm() / exact.norm()
    assert err < 0.02
    one = torch.autograd.grad(m.loss(raw, y, gemm_dtype=torch.float64, rows=rows, sparse=True)[0], m.parts)[0]
    assert (one - exact).norm() / exact.norm() > 5 * err  # a single draw is far off: the average did the work


@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_of_the_fused_op(gen, sparse):
    m = random_module(gen)
    raw = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 0])
    rows = torch.tensor([[0, 3], [4, 1]])
    u0, v0 = m.parts.detach().clone(), m.classifier.detach().clone()

    def loss(u, v):
        del m.parts, m.classifier
        m.parts, m.classifier = u, v  # plain tensors, so gradcheck can vary them
        return m.loss(raw, y, gemm_dtype=torch.float64, rows=rows, sparse=sparse)[0]

    assert torch.autograd.gradcheck(loss, (u0.requires_grad_(), v0.requires_grad_()))


def test_fused_training_forward_runs_its_gemms_in_bfloat16(gen):
    """The CUDA path (GEMMs in bfloat16, the rest in float32) checked on CPU: close to float32."""
    n, r, d, p, c = 4, 9, 16, 6, 3
    m = DPNetModule(d, p, c)
    torch.nn.init.normal_(m.parts, generator=gen)
    torch.nn.init.normal_(m.classifier, generator=gen)
    x = torch.randn(n, r, d, generator=gen)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        m.zero_grad()
        logits, ent, _ = m.forward_train(x, True, dtype)
        assert logits.dtype == torch.float32 and ent.dtype == torch.float32
        (logits.sum() + ent).backward()
        grads.append((logits.detach(), m.parts.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0.05, atol=0.05)
    cos = torch.nn.functional.cosine_similarity(grads[1][1].flatten(), grads[0][1].flatten(), dim=0)
    assert cos > 0.98


# ------------------------------------------------------------------ cosine, owned class layer
def test_cosine_scores_against_a_loop(gen):
    m = random_module(gen, d=5, p=4, c=2)
    m.similarity = "cosine"
    raw = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    x = ((raw - m.mean) / m.std).tolist()
    u = m.parts.tolist()

    def cos(a, b):
        return sum(i * j for i, j in zip(a, b)) / math.sqrt(sum(i * i for i in a) * sum(j * j for j in b))

    want = torch.tensor([[[cos(up, reg) for up in u] for reg in img] for img in x], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m.scores(raw), want)
        assert m.pool(m.scores(raw)).raw.abs().max() <= 1.0


@pytest.mark.parametrize("sparse", [False, True])
def test_cosine_training_gradient_equals_plain_autograd(gen, sparse):
    """Prepared (standardised, normalised) regions through the fused op, against plain cosine ops."""
    from dpnet.train.model import COSINE_ASSIGN_SCALE

    m = random_module(gen, constraints=("orth", "assign", "cs", "clst"))
    m.similarity = "cosine"
    raw = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():
        z = m.prepare(raw)
    got = torch.autograd.grad(m.loss(z, y, gemm_dtype=torch.float64, prepared=True, sparse=sparse)[0],
                              (m.parts, m.classifier))
    zr = F.normalize((raw - m.mean) / m.std, dim=-1)
    s = zr @ F.normalize(m.parts, dim=1).T  # (N, R, P) cosines
    best = s.max(1).values
    logits = m.logits(best)  # the cosine bag is not renormalised
    logp = (s * COSINE_ASSIGN_SCALE).log_softmax(-1)
    clst = torch.stack([1 - best[n, 2 * y[n]:2 * y[n] + 2].mean() for n in range(3)]).mean()
    loss = (F.cross_entropy(logits, y) + m.lambdas["assign"] * -(logp.exp() * logp).sum(-1).mean()
            + m.lambdas["orth"] * orthogonality(m.parts) + m.lambdas["cs"] * class_specific(m.classifier, part_classes(m.classifier.shape[1], 2))
            + m.lambdas["clst"] * clst)
    want = torch.autograd.grad(loss, (m.parts, m.classifier))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_owned_class_layer_weighs_only_each_classs_own_parts(gen):
    m = random_module(gen, d=6, p=6, c=3, q=2)
    m.class_layer = "owned"
    raw = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        b = m.pool(m.scores(raw)).b
        contrib = m.contributions(b)  # (N, C, P)
        for c in range(3):
            for p in range(6):
                if p // 2 != c:
                    assert (contrib[:, c, p] == 0).all()
        torch.testing.assert_close(contrib.sum(-1), m(raw))
        want = torch.stack([sum(m.classifier[c, p] * b[:, p] for p in (2 * c, 2 * c + 1)) for c in range(3)], 1)
        torch.testing.assert_close(m(raw), want)
    _, terms = m.weight_loss()
    assert "cs" not in terms  # foreign weights are zero by construction


# ------------------------------------------------------------------ projection, last-layer refit
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_projection_puts_each_part_on_its_best_region_of_its_own_class(gen, similarity):
    from dpnet.train.finish import project_parts

    m = random_module(gen, d=5, p=6, c=3, q=2)
    m.similarity = similarity
    z = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)  # prepared regions of 6 images
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    if similarity == "cosine":
        z = F.normalize(z, dim=-1)
    before = m.unit_parts().detach().clone()
    lengths = m.parts.detach().norm(dim=1)
    project_parts(m, [(z[:3], labels[:3]), (z[3:], labels[3:])])
    for p in range(6):
        cands = [(float(before[p] @ z[i, r]), i, r) for i in range(6) if labels[i] == p // 2 for r in range(4)]
        _, i, r = max(cands)
        want = z[i, r] if similarity == "cosine" else F.normalize(z[i, r], dim=0) * lengths[p]
        torch.testing.assert_close(m.parts[p].detach(), want)


def test_the_last_layer_refit_lowers_the_loss_and_keeps_ownership(gen):
    from dpnet.train.finish import refit_class_layer

    m = random_module(gen, d=5, p=6, c=3, q=2)
    m.class_layer = "owned"
    bags = F.normalize(torch.rand(20, 6, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.arange(20) % 3
    bags[torch.arange(20), labels * 2] += 1.0  # each class's first part fires on its images
    before = float(F.cross_entropy(m.logits(bags), labels).detach())
    after = refit_class_layer(m, bags, labels, steps=200, lr=0.1)
    assert after < before / 2
    v = m.class_weights().detach()
    assert all(v[c, p] == 0 for c in range(3) for p in range(6) if p // 2 != c)


def test_the_cluster_cost_against_a_loop(gen):
    from dpnet.train.model import cluster_cost

    best = torch.rand(5, 6, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 2, 1, 1, 0])
    want = sum(1 - sum(float(best[n, p]) for p in range(6) if p // 2 == labels[n]) / 2 for n in range(5)) / 5
    assert float(cluster_cost(best, labels, part_classes(6, 2))) == pytest.approx(want)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_centred_scores_against_a_loop(gen, similarity):
    """centre: each image's standardised regions minus their mean over the image, then scored."""
    m = random_module(gen, d=5, p=4, c=2)
    m.similarity, m.centre = similarity, True
    raw = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    x = ((raw - m.mean) / m.std).tolist()
    u = m.parts.tolist()
    want = []
    for img in x:
        mean = [sum(reg[k] for reg in img) / len(img) for k in range(5)]
        rows = []
        for reg in img:
            c = [a - b for a, b in zip(reg, mean)]
            if similarity == "cosine":
                c = [a / math.sqrt(sum(b * b for b in c)) for a in c]
            rows.append([sum(a * b for a, b in zip(c, up)) / (math.sqrt(sum(b * b for b in up))
                                                             if similarity == "cosine" else 1.0) for up in u])
        want.append(rows)
    with torch.no_grad():
        torch.testing.assert_close(m.scores(raw), torch.tensor(want, dtype=torch.float64))


def test_a_positive_class_layer_weighs_no_part_against_a_class():
    """class_layer="positive": V as used is ReLU(V); logits and contributions agree with a loop."""
    from dpnet.train.model import DPNetModule

    torch.manual_seed(0)
    m = DPNetModule(6, 6, 3, 2, (), {}, similarity="cosine", class_layer="positive")
    m.classifier.data.normal_()
    b = torch.rand(4, 6)
    v = m.class_weights()
    assert (v >= 0).all() and torch.equal(v, m.classifier.clamp_min(0))
    want = torch.tensor([[sum(b[n, p] * max(float(m.classifier[c, p].detach()), 0.0) for p in range(6)) for c in range(3)]
                         for n in range(4)])
    assert torch.allclose(m.logits(b), want, atol=1e-6)
    assert torch.allclose(m.contributions(b).sum(-1), want, atol=1e-6)


@pytest.mark.parametrize("class_layer", ["free", "positive"])
def test_a_top_k_class_layer_sums_each_class_k_weightiest_contributions(class_layer):
    """class_top_k=K: a class's logit is the sum of its K contributions v_cp b_p of largest size (for
    and against), against a loop; contributions are 0 elsewhere and sum to the logits; the gradient
    reaches only the chosen parts."""
    from dpnet.train.model import DPNetModule

    torch.manual_seed(0)
    m = DPNetModule(6, 8, 3, 2, (), {}, similarity="cosine", class_layer=class_layer, class_top_k=3)
    m.classifier.data.normal_()
    b = torch.randn(4, 8, requires_grad=True)
    v = m.class_weights().detach()
    want = []
    for n in range(4):
        row = []
        for c in range(3):
            points = sorted((float(v[c, p]) * float(b[n, p].detach()) for p in range(8)), key=abs, reverse=True)
            row.append(sum(points[:3]))
        want.append(row)
    logits = m.logits(b)
    assert torch.allclose(logits, torch.tensor(want), atol=1e-6)
    contrib = m.contributions(b)
    assert torch.allclose(contrib.sum(-1), logits, atol=1e-6)
    assert ((contrib != 0).sum(-1) <= 3).all()
    logits[0, 1].backward()
    chosen = contrib[0, 1].detach() != 0
    assert torch.equal(b.grad[0] != 0, chosen & (v[1] != 0)) and (b.grad[1:] == 0).all()
    full = DPNetModule(6, 8, 3, 2, (), {}, similarity="cosine", class_layer=class_layer)
    full.classifier.data.copy_(m.classifier.data)
    assert torch.allclose(full.logits(b), b @ full.class_weights().T)  # 0: every part counts


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_the_refit_meets_the_bags_the_model_predicts_with(similarity):
    """dpnet.train.finish.pooled_bags (the last-layer refit's input) equals the model's own bag, for both
    similarities (it once L2-normalised every bag, which the cosine model does not)."""
    from dpnet.train.finish import pooled_bags
    from dpnet.train.model import DPNetModule

    torch.manual_seed(0)
    m = DPNetModule(8, 6, 3, 2, (), {}, basis_dim=5, similarity=similarity)
    m.parts.data.normal_()
    m.basis.copy_(torch.linalg.qr(torch.randn(8, 5))[0])
    x, y = torch.randn(4, 7, 8), torch.tensor([0, 1, 2, 0])
    bags, labels = pooled_bags(m, [(m.prepare(x), y)])
    assert torch.allclose(bags, m.pool(m.scores(x)).b, atol=1e-6) and torch.equal(labels, y)


def test_a_presence_bag_counts_a_part_only_past_its_threshold():
    from dpnet.train.model import DPNetModule

    m = DPNetModule(4, 3, 3, 1, (), {}, similarity="cosine", presence=0.3)
    best = torch.tensor([[0.1, 0.3, 0.75], [-0.2, 0.31, 0.0]])
    want = torch.tensor([[max(v - 0.3, 0.0) for v in row] for row in best.tolist()])
    assert torch.allclose(m.bag(best), want, atol=1e-6)
    assert torch.equal(DPNetModule(4, 3, 3, 1, (), {}, similarity="cosine").bag(best), best)


@pytest.mark.parametrize("similarity,presence", [("dot", 0.0), ("cosine", 0.0), ("cosine", 0.2)])
def test_pooling_with_regions_removed_equals_the_masked_max(similarity, presence):
    """One image's bag with a few regions left out, from each part's best few: the masked pool's bag."""
    from dpnet.train.model import DPNetModule

    gen = torch.Generator().manual_seed(4)
    m = DPNetModule(6, 7, 3, 1, (), {}, similarity=similarity, presence=presence)
    s = torch.randn(30, 7, generator=gen)
    s[3, :] = s[4, :]  # a tie between two regions
    removed = torch.rand(9, 30, generator=gen) < 0.2
    removed[0] = False
    removed[1, s.argmax(0)] = True  # every part's best region
    removed[2] = True  # nothing left: a part with no region scores 0
    want = m.pool(s.expand(9, -1, -1), ~removed).b
    torch.testing.assert_close(m.pool_removed(s, removed), want)


@pytest.mark.parametrize("class_layer", ["free", "owned", "positive"])
def test_pruning_silences_parts_whose_best_images_are_of_other_classes(class_layer):
    """ProtoPNet's pruning: a part whose k best training images hold fewer than tau of its own class
    belongs to no class afterwards and weighs nothing in any logit, whatever the class layer."""
    from dpnet.train.finish import prune_parts
    from dpnet.train.model import DPNetModule

    gen = torch.Generator().manual_seed(5)
    m = DPNetModule(4, 6, 3, 2, (), {}, class_layer=class_layer)  # C = 3, q = 2: part p is class p // 2's
    m.classifier.data = torch.randn(3, 6, generator=gen)
    labels = torch.arange(12) % 3
    bags = torch.rand(12, 6, generator=gen) * 0.1
    bags[labels == 1, 0] += 1.0  # part 0 (class 0's) scores best on class 1's images
    bags[labels == 0, 1] += 1.0  # part 1 (class 0's) on its own class's
    pruned = prune_parts(m, bags, labels, k=4, tau=3)
    slow = [p for p in range(6) if sum(int(labels[i]) == p // 2 for i in torch.argsort(-bags[:, p])[:4]) < 3]
    assert pruned.tolist() == slow and 0 in slow and 1 not in slow
    assert (m.owner[slow] == -1).all() and (m.class_weights()[:, slow] == 0).all()
    b2 = bags.clone()
    b2[:, slow] = 5.0
    torch.testing.assert_close(m.logits(b2), m.logits(bags))
    assert not m.own_mask()[:, slow].any()


def test_a_pruned_model_is_saved_and_read_with_its_pruned_parts(tmp_path):
    """owner travels with the model (pruning changes it); a model saved before pruning existed reads as p // q."""
    from dpnet.train.model import DPNetModule

    m = DPNetModule(4, 6, 3, 2, (), {})
    m.owner[[1, 4]] = -1
    state = m.state_dict()
    fresh = DPNetModule(4, 6, 3, 2, (), {})
    fresh.load_state_dict(state)
    assert fresh.owner.tolist() == [0, -1, 1, 1, -1, 2]
    old = {k: v for k, v in state.items() if k != "owner"}
    fresh = DPNetModule(4, 6, 3, 2, (), {})
    fresh.load_state_dict(old)
    assert fresh.owner.tolist() == [0, 0, 1, 1, 2, 2]


def test_the_last_layer_l1_sends_wrong_class_weights_to_zero():
    """ProtoPNet's last-layer step: with an L1 cost on the weights that link a part to another class,
    the refit leaves those weights near 0 while the class's own stay."""
    from dpnet.train.estimator import DPNetClassifier
    from dpnet.train.finish import refit_class_layer
    from dpnet.train.model import DPNetModule

    gen = torch.Generator().manual_seed(8)
    bags = torch.rand(30, 6, generator=gen)
    labels = torch.arange(30) % 3
    bags[torch.arange(30), labels * 2] += 1.0
    foreign = {}
    for l1 in (0.0, 0.05):
        m = DPNetModule(4, 6, 3, 2, (), {}, class_layer="positive")
        m.classifier.data.fill_(0.3)
        refit_class_layer(m, bags, labels, steps=300, lr=0.05, l1=l1)
        v = m.class_weights().detach()
        foreign[l1] = float((v * ~m.own_mask()).abs().sum())
    assert foreign[0.05] < 0.1 * foreign[0.0]
    assert DPNetClassifier(last_layer_l1=0.05).last_layer_l1 == 0.05  # a hyper-parameter like any other


def test_the_occurrence_prior_against_a_loop(gen):
    """C_occur (issue 16 lever 6): per part, the sorted occurrences against k_p ones after N - k_p zeros,
    k_p the images of its class; mean absolute difference over images and parts."""
    from dpnet.train.losses import occurrence_cost

    tau = torch.rand(7, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 1, 2])
    owner = torch.tensor([0, 0, 1, 1, 2, -1])  # the last part pruned: it should occur nowhere
    total = 0.0
    for p in range(6):
        col = sorted(float(tau[n, p]) for n in range(7))
        k = sum(1 for n in range(7) if int(labels[n]) == int(owner[p]))
        prior = [0.0] * (7 - k) + [1.0] * k
        total += sum(abs(a - b) for a, b in zip(col, prior)) / 7
    assert float(occurrence_cost(tau, labels, owner)) == pytest.approx(total / 6)
    exact = (labels[:, None] == owner[None, :]).to(torch.float64)  # each part on in its class's images only
    assert float(occurrence_cost(exact, labels, owner)) == 0.0


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_the_occurrence_is_the_most_any_region_is_assigned_to_a_part(gen, similarity):
    """tau_np = max_r softmax_p(s_pr a_p) over the regions ``rows`` picks (a loop over the picked regions)."""
    m = random_module(gen, d=5, p=4, c=2, q=2, constraints=("orth", "assign", "cs", "occur"))
    m.similarity = similarity
    x = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    rows = torch.tensor([[0, 2], [5, 1], [3, 4]])
    s = m.scores(x).detach()
    a = m.training_fold()[2].detach()
    tau = m.occurrence(x, rows).detach()
    for n in range(3):
        for p in range(4):
            probs = [math.exp(float(s[n, r, p] * a[p])) / sum(math.exp(float(s[n, r, j] * a[j])) for j in range(4))
                     for r in rows[n].tolist()]
            assert float(tau[n, p]) == pytest.approx(max(probs))
    loss, terms = m.loss(x, torch.tensor([0, 1, 1]), rows=rows, gemm_dtype=torch.float64)
    assert "occur" in terms and terms["occur"] > 0
    loss.backward()
    assert m.parts.grad is not None and torch.isfinite(m.parts.grad).all()


def test_every_constraint_weight_reaches_the_module():
    """A new constraint needs its lambda field and its term only: the estimator hands every known
    constraint's weight to the module."""
    from dpnet.train.estimator import DPNetClassifier
    from dpnet.train.losses import KNOWN_CONSTRAINTS

    est = DPNetClassifier(lambda_occur=0.37, lambda_clst=0.11, constraints=("orth", "occur"))
    m = est.make_module(8, 3)
    assert m.lambdas["occur"] == 0.37 and m.lambdas["clst"] == 0.11
    assert set(KNOWN_CONSTRAINTS) <= set(m.lambdas) and m.constraints == ("orth", "occur")


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def ref_assign_agreement(s, s_view, scale):
    """-mean over images and regions of log(z . z'), z the assignment softmax over parts (loops)."""
    total, count = 0.0, 0
    for img, img_view in zip(s, s_view):
        for reg, reg_view in zip(img, img_view):
            z = _softmax([v * t for v, t in zip(reg, scale)])
            zv = _softmax([v * t for v, t in zip(reg_view, scale)])
            total += -math.log(sum(a * b for a, b in zip(z, zv)))
            count += 1
    return total / count


def ref_peak_agreement(s, s_view, own, scale):
    """-mean over images and their own parts of log(pi . pi'), pi the part's softmax over regions (loops)."""
    total, count = 0.0, 0
    for img, img_view, parts in zip(s, s_view, own):
        for k in parts:
            pi = _softmax([reg[k] * scale[k] for reg in img])
            pv = _softmax([reg[k] * scale[k] for reg in img_view])
            total += -math.log(sum(a * b for a, b in zip(pi, pv)))
            count += 1
    return total / count


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_the_views_agreement_against_a_loop(gen, similarity):
    """C_agree (issue 16 lever 3): the assignments of corresponding regions (over the picked rows), and
    each own part's soft peak over all regions, agree across the two views; a view equal to the image
    agrees best."""
    from dpnet.train.model import PEAK_SHARPEN

    m = random_module(gen, d=5, p=6, c=3, q=2, constraints=("orth", "agree"))
    m.similarity = similarity
    x = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    own = [[4, 5], [0, 1]]  # class c owns parts 2c, 2c + 1

    def agreement(*args, **kw):
        return m.view_agreement(*args, **kw).detach()

    a = m.training_fold()[2].detach().tolist()
    s, sv = m.scores(x).detach().tolist(), m.scores(v).detach().tolist()
    peak = ref_peak_agreement(s, sv, own, [t * PEAK_SHARPEN for t in a])
    want = ref_assign_agreement(s, sv, a) + peak
    assert float(agreement(x, v, labels)) == pytest.approx(want, rel=1e-9)
    if similarity == "cosine":  # prepared input (the trainer's path) gives the same value
        prepared = m.view_agreement(m.prepare(x), m.prepare(v), labels, prepared=True)
        assert float(prepared.detach()) == pytest.approx(want, rel=1e-9)
    rows = torch.tensor([[0, 3], [6, 1]])
    picked = [[img[j] for j in r] for img, r in zip(s, rows.tolist())]
    picked_view = [[img[j] for j in r] for img, r in zip(sv, rows.tolist())]
    want_rows = ref_assign_agreement(picked, picked_view, a) + peak
    assert float(agreement(x, v, labels, rows)) == pytest.approx(want_rows, rel=1e-9)
    assert float(agreement(x, x, labels)) < want
    loss, terms = m.loss(x, labels, view=v, gemm_dtype=torch.float64)
    assert float(terms["agree"].detach()) == pytest.approx(want, rel=1e-9)
    loss.backward()
    assert torch.isfinite(m.parts.grad).all()
    with pytest.raises(ValueError, match="needs a view"):
        m.loss(x, labels, gemm_dtype=torch.float64)


# ------------------------------------------------------------------- the sparse class layer (sparse_parts)
def test_the_non_negative_class_fit_against_scipy(gen):
    """fit_nonneg (FISTA) reaches the minimum of CE + l1 sum sd_p v_cp + l2/2 |V|^2 over v >= 0, zero
    outside ``allowed``, that scipy's bounded L-BFGS-B finds on the same (smooth, on v >= 0) objective."""
    from scipy.optimize import minimize

    from dpnet.train.finish import fit_nonneg

    n, p, c, l1, l2 = 40, 7, 3, 0.02, 0.01
    bags = torch.rand(n, p, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % c
    bags[torch.arange(n), labels * 2] += 0.5
    allowed = torch.rand(c, p, generator=gen) > 0.3
    sd = bags.std(0)

    def objective(flat):
        v = torch.tensor(flat.reshape(c, p), requires_grad=True)
        loss = F.cross_entropy(bags @ v.T, labels) + l1 * (v * sd).sum() + l2 / 2 * (v ** 2).sum()
        loss.backward()
        return float(loss.detach()), v.grad.numpy().ravel()

    bounds = [(0, None) if a else (0, 0) for a in allowed.flatten().tolist()]
    ref = minimize(objective, [0.0] * (c * p), jac=True, method="L-BFGS-B", bounds=bounds, options={"gtol": 1e-12})
    v = fit_nonneg(bags, labels, allowed, l1=l1, l2=l2, steps=5000)
    assert (v >= 0).all() and (v[~allowed] == 0).all()
    assert objective(v.numpy().ravel())[0] <= ref.fun + 1e-9
    assert torch.allclose(v, torch.tensor(ref.x.reshape(c, p)), atol=1e-4)


def test_a_sparse_class_layer_weighs_k_parts_per_class_positively(tmp_path):
    """sparsify_class_layer: each class keeps at most K parts, with non-negative weights, chosen among the
    parts it kept before (the stages nest); the logits are the sum of those parts' points, and the
    support survives a save and load."""
    from dpnet.train.finish import sparsify_class_layer

    g = torch.Generator().manual_seed(3)
    m = DPNetModule(6, 12, 3, 4, (), {}, similarity="cosine", sparse_parts=2)
    with torch.no_grad():
        m.classifier.copy_(torch.randn(3, 12, generator=g))
    assert not m.sparse and (m.class_weights() < 0).any()  # until made sparse, the free layer as it is
    bags = torch.rand(60, 12, generator=g)
    labels = torch.arange(60) % 3
    for cls in range(3):  # parts 4 cls .. 4 cls + 2 fire on the class's images
        bags[labels == cls, 4 * cls:4 * cls + 3] += 0.6
    sparsify_class_layer(m, bags, labels, 3)
    first = m.support.clone()
    sparsify_class_layer(m, bags, labels, 2)
    v = m.class_weights().detach()
    assert m.sparse and (v >= 0).all() and ((v > 0).sum(1) <= 2).all() and (v > 0).sum() > 0
    assert not (m.support & ~first).any()  # nested: K=2 chosen among the K=3
    assert ((v > 0) <= m.support).all()
    for cls in range(3):
        assert set(torch.nonzero(v[cls]).flatten().tolist()) <= {4 * cls, 4 * cls + 1, 4 * cls + 2}
    torch.testing.assert_close(m.logits(bags), bags @ v.T)
    assert (F.cross_entropy(m.logits(bags), labels) < math.log(3))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    again = DPNetModule(6, 12, 3, 4, (), {}, similarity="cosine", sparse_parts=2)
    again.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert again.sparse and torch.equal(again.class_weights(), m.class_weights())
