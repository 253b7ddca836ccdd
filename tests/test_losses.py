"""Every loss term against a slow loop reference, and float64 gradcheck."""

import math

import pytest
import torch

from train.losses import (assignment_entropy, assignment_entropy_from_scores, class_specific, orthogonality,
                          total_loss)
from train.model import DPNetModule


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
                s += abs(float(v[ci, pi]))
    return s / (p * (c - 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_orthogonality_matches_loop(gen):
    u = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert orthogonality(u).item() == pytest.approx(ref_orth(u), rel=1e-10)
    assert orthogonality(torch.eye(4, dtype=torch.float64)).item() == 0.0
    same = torch.ones(3, 4, dtype=torch.float64)
    assert orthogonality(same).item() == pytest.approx(6 / 9)  # plus sign: coinciding parts cost


def test_assignment_matches_loop(gen):
    u = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    assert assignment_entropy(u, x).item() == pytest.approx(ref_assign(u, x), rel=1e-10)
    # a mean over regions, not a sum: repeating regions leaves it unchanged
    assert assignment_entropy(u, x.repeat(1, 3, 1)).item() == pytest.approx(ref_assign(u, x), rel=1e-10)


def test_class_specific_matches_loop(gen):
    v = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    assert class_specific(v, 2).item() == pytest.approx(ref_cs(v, 2), rel=1e-12)
    own_only = torch.zeros(3, 6, dtype=torch.float64)
    own_only[0, :2] = own_only[1, 2:4] = own_only[2, 4:] = -5.0
    assert class_specific(own_only, 2).item() == 0.0  # a class's own parts are free
    assert class_specific(-v.abs(), 2).item() > 0  # L1: negative weights cost too


@pytest.mark.parametrize("term", ["orth", "assign", "cs"])
def test_gradcheck(term, gen):
    u = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 4, generator=gen, dtype=torch.float64).add(0.3).requires_grad_()
    fn = {"orth": lambda: torch.autograd.gradcheck(orthogonality, (u,)),
          "assign": lambda: torch.autograd.gradcheck(lambda a: assignment_entropy(a, x), (u,)),
          "cs": lambda: torch.autograd.gradcheck(lambda b: class_specific(b, 2), (v,))}[term]
    assert fn()


def test_model_contributions_sum_to_logit(gen):
    m = DPNetModule(dim=3, n_parts=4, n_classes=2).double()
    with torch.no_grad():
        m.parts.copy_(torch.randn(4, 3, generator=gen))
        m.classifier.copy_(torch.randn(2, 4, generator=gen))
        m.mean.copy_(torch.randn(3, generator=gen))
        m.std.copy_(torch.rand(3, generator=gen) + 0.5)
    raw = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64)
    x = (raw - m.mean) / m.std  # the loop reference works on standardised descriptors
    b, where = m.bag(raw)
    s = m.region_scores(raw)
    for n in range(5):
        best = [max(float((m.parts[p] * x[n, r]).sum().detach()) for r in range(7)) for p in range(4)]
        norm = math.sqrt(sum(r * r for r in best))
        for p in range(4):
            assert b[n, p].item() == pytest.approx(best[p] / norm, rel=1e-10)
            assert s[n, p, where[n, p]].item() == pytest.approx(best[p], rel=1e-10)
    contributions = m.classifier[None] * b[:, None, :]  # (N, C, P)
    torch.testing.assert_close(contributions.sum(-1), m(raw))


def test_assignment_from_scores_equals_direct(gen):
    u = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    direct = assignment_entropy(u, x)
    assert assignment_entropy_from_scores(x @ u.T, u).item() == pytest.approx(direct.item(), rel=1e-12)


def test_total_loss_switches_terms(gen):
    u = torch.randn(4, 3, generator=gen)
    v = torch.randn(2, 4, generator=gen)
    x = torch.randn(2, 5, 3, generator=gen)
    logits, y = torch.randn(2, 2, generator=gen), torch.tensor([0, 1])
    lam = {"orth": 1e-2, "assign": 1e-3, "cs": 1e-3}
    base, terms0 = total_loss(logits, y, u, v, x @ u.T, 2, (), lam)
    full, terms = total_loss(logits, y, u, v, x @ u.T, 2, ("orth", "assign", "cs"), lam)
    assert set(terms0) == {"ce"} and set(terms) == {"ce", "orth", "assign", "cs"}
    expect = terms["ce"] + 1e-2 * terms["orth"] + 1e-3 * terms["assign"] + 1e-3 * terms["cs"]
    assert full.item() == pytest.approx(expect, rel=1e-5) and base.item() == pytest.approx(terms["ce"], rel=1e-6)


def _module_with(parts: torch.Tensor, classifier: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> DPNetModule:
    m = DPNetModule(parts.shape[1], parts.shape[0], classifier.shape[0]).double()
    m.mean.copy_(mean)
    m.std.copy_(std)
    del m.parts, m.classifier
    m.parts, m.classifier = parts, classifier  # plain tensors, so gradcheck can vary them
    return m


@pytest.mark.parametrize("entropy", [True, False])
def test_fused_training_forward_equals_plain_composition(gen, entropy):
    """forward_train (one op, hand-written backward) = forward_scores + assignment_entropy_from_scores."""
    n, r, d, p, c = 3, 5, 6, 4, 2
    x = torch.randn(n, r, d, generator=gen, dtype=torch.float64)
    mean, std = torch.randn(d, generator=gen, dtype=torch.float64), torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    u0, v0 = torch.randn(p, d, generator=gen, dtype=torch.float64), torch.randn(c, p, generator=gen, dtype=torch.float64)
    weight = torch.randn(n, c, generator=gen, dtype=torch.float64)

    def fused(u, v):
        logits, ent = _module_with(u, v, mean, std).forward_train(x, entropy, torch.float64)
        return (logits * weight).sum() + 3.0 * ent

    def plain(u, v):
        m = _module_with(u, v, mean, std)
        logits, s = m.forward_scores(x)
        ent = assignment_entropy_from_scores(s, u) if entropy else torch.zeros((), dtype=torch.float64)
        return (logits * weight).sum() + 3.0 * ent

    args = (u0.clone().requires_grad_(), v0.clone().requires_grad_())
    assert torch.autograd.gradcheck(fused, args)
    got = torch.autograd.grad(fused(*args), args)
    want = torch.autograd.grad(plain(*args), args)
    assert fused(*args).item() == pytest.approx(plain(*args).item(), rel=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


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
        logits, ent = m.forward_train(x, True, dtype)
        assert logits.dtype == torch.float32 and ent.dtype == torch.float32
        (logits.sum() + ent).backward()
        grads.append((logits.detach(), m.parts.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0.05, atol=0.05)
    cos = torch.nn.functional.cosine_similarity(grads[1][1].flatten(), grads[0][1].flatten(), dim=0)
    assert cos > 0.98
