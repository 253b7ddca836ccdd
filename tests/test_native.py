"""The compiled pool + entropy kernel (train/pool_entropy.c) against the torch path it replaces."""

from __future__ import annotations

import shutil

import pytest
import torch

from dpnet.train import native
from dpnet.train.model import DPNetModule, _TrainOp

has_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler here")


@pytest.fixture
def torch_path(monkeypatch):
    """Switch the kernel off (DPNET_NATIVE=0) for the duration of a ``with``-less call."""

    def run(fn):
        monkeypatch.setenv("DPNET_NATIVE", "0")
        native.reset()
        try:
            return fn()
        finally:
            monkeypatch.delenv("DPNET_NATIVE")
            native.reset()

    return run


def _module(d: int, p: int, c: int, gen: torch.Generator) -> DPNetModule:
    m = DPNetModule(d, p, c)
    with torch.no_grad():
        m.parts.copy_(torch.randn(p, d, generator=gen) * 0.3)
        m.classifier.copy_(torch.randn(c, p, generator=gen))
        m.mean.copy_(torch.randn(d, generator=gen) * 0.1)
        m.std.copy_(torch.rand(d, generator=gen) + 0.5)
    return m


def _step(m: DPNetModule, x: torch.Tensor, weight: torch.Tensor, entropy: bool, **train):
    m.zero_grad()
    logits, ent, _ = m.forward_train(x, entropy, **train)
    ((logits * weight).sum() + 3.0 * ent).backward()
    return logits.detach(), ent.detach(), m.parts.grad.clone(), m.classifier.grad.clone()


@has_cc
@pytest.mark.parametrize("p", [7, 16, 200])  # P below, at, and not a multiple of the vector width
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("mode", ["dense", "sparse", "sparse-subset"])
def test_kernel_matches_torch_path(p, entropy, mode, torch_path):
    gen = torch.Generator().manual_seed(p)
    n, r, d, c = 5, 37, 24, 3
    m = _module(d, p, c, gen)
    x = torch.randn(n, r, d, generator=gen)
    weight = torch.randn(n, c, generator=gen)
    train = {"sparse": mode != "dense"}
    if mode == "sparse-subset":
        train["rows"] = torch.stack([torch.randperm(r, generator=gen)[:9] for _ in range(n)])
    native.reset()
    assert native.load() is not None, "a compiler is present, so the kernel must build"
    got = _step(m, x, weight, entropy, **train)
    want = torch_path(lambda: _step(m, x, weight, entropy, **train))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@has_cc
def test_kernel_forward_against_definitions():
    gen = torch.Generator().manual_seed(1)
    n, r, p = 3, 11, 21
    s = torch.randn(n, r, p, generator=gen) * 4
    inv = torch.rand(p, generator=gen) + 0.2
    best, where, lse, h = native.forward(s, inv, True)
    torch.testing.assert_close(best, s.max(1).values, rtol=0, atol=0)  # the max is exact
    assert torch.equal(where, s.argmax(1))
    z = s.double() * inv.double()
    torch.testing.assert_close(lse.double(), z.logsumexp(-1), rtol=1e-6, atol=1e-5)
    q = z.softmax(-1)
    torch.testing.assert_close(h.double(), -(q * q.log()).sum(-1), rtol=1e-5, atol=1e-5)


@has_cc
def test_kernel_gives_the_max_gradient_to_one_tied_region():
    """Ties in the max: the first argmax region takes the whole gradient, as one valid subgradient."""
    s = torch.zeros(2, 4, 3)
    s[:, 1] = 5.0
    s[:, 3] = 5.0  # regions 1 and 3 tie for every part
    g = torch.arange(6.0).view(2, 3) + 1
    best, where, lse, h = native.forward(s, torch.ones(3), False)
    ds, _, g_c = native.backward(s.clone(), torch.ones(3), lse, h, best, g, 0.0, False)
    assert torch.equal(ds[:, 1], g) and not ds[:, [0, 2, 3]].any()
    assert (where == 1).all()  # the argmax the gather backward uses is the same first region
    torch.testing.assert_close(g_c, -g.sum(0))


@has_cc
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kernel_non_finite_score_poisons_its_image_only(bad):
    s = torch.randn(3, 6, 5)
    s[1, 4, 2] = bad
    best, _, _, h = native.forward(s, torch.ones(5), True)
    assert torch.isnan(best[1]).all() and torch.isnan(h[1, 4])
    assert torch.isfinite(best[[0, 2]]).all() and torch.isfinite(h[[0, 2]]).all()


def test_float64_and_non_contiguous_scores_take_the_torch_path():
    s = torch.randn(2, 3, 4, dtype=torch.float64)
    assert not native.usable(s)
    assert not native.usable(torch.randn(2, 4, 3).transpose(1, 2))


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DPNET_BUILD_DIR", str(tmp_path / "build"))
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="torch path"):
            assert native.load() is None
        assert not native.usable(torch.randn(2, 3, 4))
        m = _module(6, 4, 2, torch.Generator().manual_seed(0))
        logits, ent, _ = m.forward_train(torch.randn(2, 3, 6), True)  # still trains, on the torch path
        assert torch.isfinite(logits).all() and ent.item() > 0
    finally:
        native.reset()


@has_cc
def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("DPNET_BUILD_DIR", str(tmp_path))
    native.reset()
    try:
        assert native.load() is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
        stamp = built[0].stat().st_mtime_ns
        native.reset()
        assert native.load() is not None
        assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # reused
    finally:
        native.reset()


@has_cc
def test_unwritable_home_builds_privately_and_leaves_nothing(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("DPNET_BUILD_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "file" / "home"))  # under a file: mkdir fails
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="privately"):
            assert native.load() is not None
        assert not list((tmp_path / "tmp").iterdir())  # the private build folder is gone
        s = torch.randn(2, 3, 4)
        best, _, _, _ = native.forward(s, torch.ones(4), False)
        assert torch.equal(best, s.max(1).values)  # and the kernel works
    finally:
        native.reset()


@has_cc
def test_fused_op_uses_the_kernel_for_float32_cpu(monkeypatch):
    calls = []
    forward = native.forward
    monkeypatch.setattr(native, "forward", lambda *a: calls.append(1) or forward(*a))
    native.reset()
    x, w, c, inv = torch.randn(2, 3, 4), torch.randn(5, 4, requires_grad=True), torch.randn(5), torch.rand(5) + 1
    _TrainOp.apply(x, w, c, inv, None, True, False)
    _TrainOp.apply(x.double(), w.double(), c.double(), inv.double(), None, True, False)  # float64: torch path
    assert calls == [1]
