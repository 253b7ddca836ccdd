"""The optimiser of U and V (dpnet.train.optim): RowAdam against torch's Adam and a slow loop."""

from __future__ import annotations

import torch

from dpnet.extract.cache import RegionCache
from dpnet.train.estimator import DPNetClassifier
from dpnet.train.optim import RowAdam
from tests.test_train import assert_same_weights, killed_then_resumed


def _run(opt_of, start: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(start.clone())
    opt = opt_of([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _grads(shape, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * torch.logspace(-3, 1, shape[1], dtype=torch.float64)
            for _ in range(n)]


def test_row_adam_without_rows_is_torch_adam():
    start, grads = torch.randn(4, 6, dtype=torch.float64), _grads((4, 6))
    ours = _run(lambda ps: RowAdam([{"params": ps, "row": False}], lr=0.01), start, grads)
    ref = _run(lambda ps: torch.optim.Adam(ps, lr=0.01), start, grads)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_row_adam_shares_the_second_moment_along_each_row_as_a_slow_loop_does():
    start, grads = torch.randn(3, 5, dtype=torch.float64), _grads((3, 5))
    ours = _run(lambda ps: RowAdam([{"params": ps, "row": True}], lr=0.01), start, grads)
    p, b1, b2, eps, lr = start.clone(), 0.9, 0.999, 1e-8, 0.01
    m = torch.zeros_like(p)
    v = [0.0] * p.shape[0]
    for t, g in enumerate(grads, 1):
        for i in range(p.shape[0]):
            v[i] = b2 * v[i] + (1 - b2) * float(sum(g[i, j] ** 2 for j in range(p.shape[1]))) / p.shape[1]
            for j in range(p.shape[1]):
                m[i, j] = b1 * m[i, j] + (1 - b1) * g[i, j]
                p[i, j] -= lr * (m[i, j] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)) ** 0.5 + eps)
    torch.testing.assert_close(ours, p, rtol=1e-10, atol=1e-12)


def test_a_parts_step_does_not_depend_on_the_basis_with_row_adam_and_does_with_adam():
    """U in one orthonormal basis and U Q in another take the same steps (rotated) with RowAdam;
    plain Adam's per-coordinate scaling does not."""
    start, grads = torch.randn(4, 6, dtype=torch.float64), _grads((4, 6))
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    for make, invariant in ((lambda ps: RowAdam([{"params": ps, "row": True}], lr=0.01), True),
                            (lambda ps: torch.optim.Adam(ps, lr=0.01), False)):
        a = _run(make, start, grads) @ q
        b = _run(make, start @ q, [g @ q for g in grads])
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11) == invariant


def test_a_fit_with_row_adam_learns_and_resumes_to_the_same_weights(pretrained_tiny_cache, tmp_path):
    tiny_cache = RegionCache(pretrained_tiny_cache)
    kw = dict(parts_per_class=2, epochs=6, inner_epochs=3, batch_size=4, pca_dim=32, entropy_regions=4,
              optimizer="row-adam", gemm_dtype="float32", val_fraction=0.0)
    ref = DPNetClassifier(**kw).fit(tiny_cache)
    assert ref.history_[-1]["train_top1"] >= 90  # 3 classes
    resumed = killed_then_resumed(lambda: DPNetClassifier(**kw), tiny_cache, tmp_path / "ck.pt", after=2)
    assert_same_weights(ref, resumed)
    adam = DPNetClassifier(**{**kw, "optimizer": "adam"}).fit(tiny_cache)
    assert not torch.equal(adam.module_.parts, ref.module_.parts)


def test_files_from_before_the_optimizer_option_read_as_adam(pretrained_tiny_cache, tmp_path):
    """Checkpoints and models written before ``optimizer`` existed were fitted with Adam: they resume
    under adam (and are refused, with the difference named, under row-adam), and load as adam."""
    import pytest

    from dpnet.errors import CheckpointMismatchError
    from dpnet.train.serialize import load_file, save_file

    cache = RegionCache(pretrained_tiny_cache)
    kw = dict(parts_per_class=2, epochs=2, inner_epochs=1, batch_size=4, pca_dim=32, entropy_regions=4,
              gemm_dtype="float32", val_fraction=0.0)
    ck, model = tmp_path / "ck.pt", tmp_path / "model.pt"
    DPNetClassifier(**kw, optimizer="adam").fit(cache, checkpoint=ck).save(model)
    for path in (ck, model):  # as an older version wrote them: no optimizer among the params
        kind, meta, tensors = load_file(path, ("dpnet-fit", "dpnet-model"))
        del meta["params"]["optimizer"]
        save_file(path, kind, meta, tensors)
    assert DPNetClassifier.load(model).optimizer == "adam"
    with pytest.raises(CheckpointMismatchError, match="optimizer"):
        DPNetClassifier(**kw, optimizer="row-adam").fit(cache, checkpoint=ck)
    resumed = DPNetClassifier(**kw, optimizer="adam").fit(cache, checkpoint=ck)  # at its end: nothing left to run
    assert len(resumed.history_) == 2
