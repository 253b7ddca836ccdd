"""The trainer: overfitting a tiny cache, resume equivalence, save/load, mismatches, NaN."""


import numpy as np
import pytest
import torch

from dpnet.errors import CacheMismatchError, NonFiniteError
from dpnet.extract.cache import RegionCache
from dpnet.extract.pipeline import run_extraction
from tests.helpers import tiny_config
from dpnet.train.config import TrainConfig
from dpnet.train.estimator import DPNetClassifier, NotFittedError
from dpnet.train.trainer import Trainer
from dpnet.train.run import train_run
from dpnet.train.serialize import load_file, save_file


@pytest.fixture(scope="module")
def tiny_cache(pretrained_tiny_cache) -> RegionCache:
    return RegionCache(pretrained_tiny_cache)


# The paper's model in exact float32 arithmetic: what most tests here compare against their references
# (the default model, cosine in a PCA subspace with bfloat16 GEMMs, is tested on its own below).
PAPER_MODEL = dict(similarity="dot", pca_dim=0, backward="dense", entropy_regions=0, patience=0, gemm_dtype="float32")


def quick(**kw) -> DPNetClassifier:
    base = dict(parts_per_class=2, epochs=3, inner_epochs=2, lr=1e-2, batch_size=4, val_fraction=0.0, seed=0,
                **PAPER_MODEL)
    base.update(kw)
    return DPNetClassifier(**base)


def train_arrays(cache: RegionCache) -> tuple[np.ndarray, np.ndarray]:
    parts = [a for _, a in cache.iter_shards("train", ("regions", "labels"))]
    return np.concatenate([p["regions"] for p in parts]), np.concatenate([p["labels"] for p in parts])


class Stop(Exception):
    """Raised from ``on_epoch``: a fit killed right after an epoch's checkpoint."""


def killed_then_resumed(make, cache, checkpoint, after: int) -> DPNetClassifier:
    """``make().fit`` stopped after epoch ``after`` (its checkpoint written), then a fresh
    ``make().fit`` resumed from that checkpoint to the end."""
    def stop(row):
        if row["epoch"] == after:
            raise Stop

    with pytest.raises(Stop):
        make().fit(cache, checkpoint=checkpoint, on_epoch=stop)
    assert load_file(checkpoint, ("dpnet-fit",))[1]["epoch"] == after
    return make().fit(cache, checkpoint=checkpoint)


def assert_same_weights(a: DPNetClassifier, b: DPNetClassifier) -> None:
    for k, v in a.module_.state_dict().items():
        assert torch.equal(v, b.module_.state_dict()[k]), k


def test_overfits_tiny_cache(tiny_cache):
    est = quick(epochs=6, inner_epochs=5).fit(tiny_cache)
    x, y = train_arrays(tiny_cache)
    assert (est.predict(x) == y).mean() == 1.0
    assert est.history_[-1]["loss_ce"] < est.history_[0]["loss_ce"]


def test_outputs_have_documented_shapes(tiny_cache):
    est = quick(epochs=1, inner_epochs=1).fit(tiny_cache)
    x, _ = train_arrays(tiny_cache)
    n, r = len(x), tiny_cache.n_regions
    assert est.decision_function(x).shape == (n, 3) and est.part_scores(x).shape == (n, 6)
    assert est.region_scores(x).shape == (n, r, 6)
    assert est.region_scores(x).flags.c_contiguous  # (the report's passes read it by image, then region)
    np.testing.assert_allclose(np.linalg.norm(est.part_scores(x), axis=1), 1.0, rtol=1e-5)
    b, v = est.part_scores(x), est.module_.classifier.detach().numpy()
    np.testing.assert_allclose((v[None] * b[:, None, :]).sum(-1), est.decision_function(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="regions must be"):
        est.predict(x[:, :, :10])


def test_not_fitted_error():
    with pytest.raises(NotFittedError, match="fit"):
        quick().predict(np.zeros((1, 2, 3), np.float16))


def test_save_load_identical_predictions(tiny_cache, tmp_path):
    est = quick(epochs=2).fit(tiny_cache)
    est.save(tmp_path / "m.pt")
    again = DPNetClassifier.load(tmp_path / "m.pt", tiny_cache)
    x, _ = train_arrays(tiny_cache)
    assert np.array_equal(est.decision_function(x), again.decision_function(x))
    assert again.get_params() == est.get_params()


def test_resume_gives_same_weights(tiny_cache, tmp_path):
    ref = quick(val_fraction=0.3).fit(tiny_cache, checkpoint=tmp_path / "ref.pt")
    resumed = killed_then_resumed(lambda: quick(val_fraction=0.3), tiny_cache, tmp_path / "ck.pt", after=2)
    assert_same_weights(ref, resumed)
    assert [r["val_top1"] for r in ref.history_] == [r["val_top1"] for r in resumed.history_]


def test_checkpoint_with_other_cache_is_refused(tiny_cache, tmp_path):
    est = quick(epochs=1).fit(tiny_cache, checkpoint=tmp_path / "ck.pt")
    est.save(tmp_path / "m.pt")
    other = RegionCache(run_extraction(tiny_config(tmp_path / "o", regions=9)).cache_dir)
    with pytest.raises(CacheMismatchError, match=r"R: cache has 9, expected 16"):
        DPNetClassifier.load(tmp_path / "m.pt", other)
    with pytest.raises(CacheMismatchError, match="R: cache has 9"):
        quick(epochs=2).fit(other, checkpoint=tmp_path / "ck.pt")
    with pytest.raises(CacheMismatchError, match="hyper-parameters"):
        quick(epochs=2, lr=0.5).fit(tiny_cache, checkpoint=tmp_path / "ck.pt")


def test_streamed_fit_equals_held_fit(tiny_cache):
    """Streaming the shards every epoch (budget 0: mapped, read ahead, unmapped in the reader)
    trains exactly as holding the split in memory."""
    from dpnet.train.data import ShardSource

    assert tiny_cache.n_shards > 1 and not ShardSource(tiny_cache, 0.3, 0, budget_mb=0).hold
    held = quick(val_fraction=0.3).fit(tiny_cache)
    streamed = quick(val_fraction=0.3, memory_budget_mb=0).fit(tiny_cache)
    for k, v in held.module_.state_dict().items():
        assert torch.equal(v, streamed.module_.state_dict()[k]), k
    assert [r["val_top1"] for r in held.history_] == [r["val_top1"] for r in streamed.history_]


def test_checkpoint_from_an_older_version_resumes(tiny_cache, tmp_path):
    """A checkpoint without an option added since (here micro_batch) resumes when that option is
    at its default, and is still refused when it is not."""
    ref = quick(epochs=2).fit(tiny_cache, checkpoint=tmp_path / "ck.pt")
    kind, meta, tensors = load_file(tmp_path / "ck.pt", ("dpnet-fit",))
    del meta["params"]["micro_batch"]
    save_file(tmp_path / "ck.pt", kind, meta, tensors)
    est = quick(epochs=2).fit(tiny_cache, checkpoint=tmp_path / "ck.pt")  # both epochs come from it
    assert [r["loss_ce"] for r in est.history_] == [r["loss_ce"] for r in ref.history_]
    for k, v in ref.module_.state_dict().items():
        assert torch.equal(v, est.module_.state_dict()[k]), k
    with pytest.raises(CacheMismatchError, match="micro_batch"):
        quick(epochs=2, micro_batch=2).fit(tiny_cache, checkpoint=tmp_path / "ck.pt")


def test_nan_in_cache_names_shard_and_image(tmp_path):
    cfg = tiny_config(tmp_path)
    cache = RegionCache(run_extraction(cfg).cache_dir)
    import zarr

    shard = zarr.open_group(str(cache.path / cache.manifest["shards"][1]["file"]), mode="r+")
    shard["regions"][0, 3, 5] = np.nan
    bad_id = int(shard["image_ids"][0])
    with pytest.raises(NonFiniteError, match=rf"00001\.zarr: .*first image id {bad_id}"):
        quick(epochs=1).fit(cache)


def _poison(cache: RegionCache, split_train: bool) -> int:
    """Put a NaN into the first train (or test) image of the first shard holding one; its id."""
    import zarr

    for entry in cache.manifest["shards"]:
        shard = zarr.open_group(str(cache.path / entry["file"]), mode="r+")
        rows = np.flatnonzero(shard["is_train"][:] == split_train)
        if len(rows):
            shard["regions"][int(rows[0]), 2, 1] = np.nan
            return int(shard["image_ids"][int(rows[0])])
    raise AssertionError("no such image")


def test_nan_met_on_resume_names_shard_and_image(tmp_path):
    """Resuming skips the statistics pass; the first non-finite loss then blames the cache row."""
    cache = RegionCache(run_extraction(tiny_config(tmp_path)).cache_dir)

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    with pytest.raises(Stop):
        quick(epochs=2).fit(cache, checkpoint=tmp_path / "ck.pt", on_epoch=stop)
    bad_id = _poison(cache, split_train=True)
    with pytest.raises(NonFiniteError, match=rf"\d{{5}}\.zarr: .*first image id {bad_id}"):
        quick(epochs=2).fit(cache, checkpoint=tmp_path / "ck.pt")


def test_nan_in_test_image_named_by_evaluate(tmp_path):
    cache = RegionCache(run_extraction(tiny_config(tmp_path)).cache_dir)
    est = quick(epochs=1).fit(cache)
    bad_id = _poison(cache, split_train=False)
    with pytest.raises(NonFiniteError, match=rf"\d{{5}}\.zarr: .*first image id {bad_id}"):
        est.evaluate(cache, "test")


def test_nan_loss_names_epoch_and_image(tiny_cache, monkeypatch):
    from dpnet.train.model import DPNetModule

    forward = DPNetModule.forward_train

    def poisoned(self, x, *args, **kw):
        out = forward(self, x, *args, **kw)
        logits = torch.cat([out.logits[:1], out.logits[1:2] * float("nan"), out.logits[2:]])  # the 2nd image
        return out._replace(logits=logits)

    monkeypatch.setattr(DPNetModule, "forward_train", poisoned)
    est = quick(epochs=2)
    with pytest.raises(NonFiniteError, match=r"epoch 1, shard \d+, image id\(s\) \[\d+\]"):
        est.fit(tiny_cache)


def test_train_run_writes_run_files(tiny_cache, tmp_path):
    cfg = TrainConfig.from_options(cache=str(tiny_cache.path), run_dir=str(tmp_path / "run"), parts_per_class=2, epochs=2,
                      inner_epochs=1, batch_size=4, progress=False)
    metrics = train_run(cfg)
    for f in ("metrics.json", "model.pt", "checkpoint.pt", "log.csv", "config.json"):
        assert (tmp_path / "run" / f).is_file(), f
    for k in ("dpnet", "global_linear", "global_mlp", "global_logreg"):
        assert 0 <= metrics[k]["top1"] <= 100 and 0 <= metrics[k]["mean_class"] <= 100
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 3
    # the MLP baseline is sized like DP-Net
    assert 0.5 < metrics["global_mlp"]["params"] / metrics["dpnet"]["params"] < 2.0


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("backward", ["dense", "sparse"])
def test_micro_batches_give_the_batch_gradient(micro, backward):
    """A step pushed through in micro-batches has the gradient of the whole batch's loss."""
    from dpnet.train.data import Chunk

    torch.manual_seed(0)
    n, r, d, c, q = 8, 5, 6, 3, 2
    regions = np.random.default_rng(0).normal(size=(n, r, d)).astype(np.float16)
    labels = np.arange(n) % c
    chunk = Chunk(0, regions, np.arange(n), labels, np.arange(n) + 1)
    est = DPNetClassifier(parts_per_class=q, batch_size=n, micro_batch=micro, **{**PAPER_MODEL, "backward": backward})
    module = est.make_module(d, c)
    torch.nn.init.normal_(module.parts)
    torch.nn.init.normal_(module.classifier)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    next(Trainer(est)._chunk_steps(module, opt, chunk, 0, 0, torch.device("cpu")))
    got = module.parts.grad.clone(), module.classifier.grad.clone()
    module.zero_grad()
    loss, _ = module.loss(torch.from_numpy(regions).float(), torch.from_numpy(labels))
    loss.backward()
    torch.testing.assert_close(got[0], module.parts.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], module.classifier.grad, rtol=1e-5, atol=1e-6)


def test_the_hyper_parameters_have_one_definition():
    """get_params, the estimator's signature, its validation and the command line all come from FitParams."""
    import dataclasses
    import inspect

    from dpnet.train.cli import build_parser
    from dpnet.train.config import FitParams, fit_options

    names = [n for n in inspect.signature(DPNetClassifier.__init__).parameters if n != "self"]
    assert list(DPNetClassifier().get_params()) == sorted(names)  # scikit-learn lists them by name
    assert [f.name for f in dataclasses.fields(FitParams)] == names
    assert FitParams() == FitParams(**DPNetClassifier().get_params())
    parser = build_parser()
    options = {a.dest for a in parser._actions}
    assert set(names) <= options
    args = parser.parse_args(["--q", "3", "--constraints", "orth,cs", "--memory-budget-mb", "none", "--lr", "0.5"])
    assert fit_options(args) == {"parts_per_class": 3, "constraints": ("orth", "cs"), "lr": 0.5}
    assert "passes over each loaded shard" in parser.format_help()  # help from the field's metadata
    assert "passes over each loaded shard" in DPNetClassifier.__doc__
    est = DPNetClassifier(**dataclasses.asdict(TrainConfig.from_options("c", "r", lr=0.5).fit_params("cub")))
    assert est.lr == 0.5 and est.epochs == DPNetClassifier().epochs


def test_the_paper_preset_is_one_word_away():
    from dpnet.train.config import TrainConfig

    paper = TrainConfig.from_options("c", "r", preset="paper").fit_params("cub")
    assert (paper.parts_per_class, paper.epochs, paper.inner_epochs, paper.lr, paper.lr_step) == (20, 40, 32, 1e-3, 10)
    assert TrainConfig.from_options("c", "r", preset="paper").fit_params("imagenet").parts_per_class == 10
    assert TrainConfig.from_options("c", "r", preset="paper", epochs=2).fit_params("cub").epochs == 2
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_options("c", "r", preset="nope").fit_params("cub")


def test_the_paper_schedule_is_one_word_away_on_the_default_model():
    """SCHEDULE=paper: the paper's 40 x 32 at lr 1e-3, without early stopping, on the default model."""
    from dpnet.train.config import TrainConfig

    default = TrainConfig.from_options("c", "r").fit_params("cub")
    sched = TrainConfig.from_options("c", "r", schedule="paper").fit_params("cub")
    assert (sched.epochs, sched.inner_epochs, sched.lr, sched.lr_step, sched.patience) == (40, 32, 1e-3, 10, 0)
    assert (sched.similarity, sched.pca_dim, sched.parts_per_class) == (default.similarity, default.pca_dim,
                                                                       default.parts_per_class)
    assert TrainConfig.from_options("c", "r", schedule="paper").fit_params("imagenet").epochs == 4
    with pytest.raises(ValueError, match="unknown schedule"):
        TrainConfig.from_options("c", "r", schedule="nope").fit_params("cub")


def test_parts_learnt_in_a_pca_subspace_score_raw_descriptors_exactly(tiny_cache, tmp_path):
    """pca_dim: the trainer works on projected descriptors; the model scores raw ones the same way."""
    est = quick(pca_dim=8, epochs=2).fit(tiny_cache)
    m = est.module_
    assert m.parts.shape == (6, 8) and m.basis.shape == (1280, 8)
    torch.testing.assert_close(m.basis.T @ m.basis, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal
    x, y = train_arrays(tiny_cache)
    raw = torch.from_numpy(x[:3])
    with torch.no_grad():
        s_raw = m.scores(raw)  # folded back to descriptor space
        s_proj = m.project(raw) @ m.parts.T  # what the trainer computed
    torch.testing.assert_close(s_raw, s_proj, rtol=1e-4, atol=1e-4)
    est.save(tmp_path / "m.pt")
    again = DPNetClassifier.load(tmp_path / "m.pt", tiny_cache)
    assert np.array_equal(again.decision_function(x), est.decision_function(x))
    fitted = quick(pca_dim=32, epochs=6, inner_epochs=5).fit(tiny_cache)  # learns as the full-D fit does
    assert (fitted.predict(x) == y).mean() == 1.0


def test_projection_folds_the_standardisation_into_the_basis():
    """project = ((x - mean) / std) @ basis, without an elementwise pass over the (N, R, D) descriptors:
    the standardisation rides in the GEMM (x @ (basis / std) - mean / std @ basis)."""
    from torch.profiler import ProfilerActivity, profile

    from dpnet.train.model import DPNetModule

    n, r, d, w = 3, 7, 64, 8
    gen = torch.Generator().manual_seed(0)
    m = DPNetModule(d, 6, 3, 2, basis_dim=w)
    m.mean.copy_(torch.rand(d, generator=gen) * 5)  # descriptors far from zero, as after a ReLU
    m.std.copy_(torch.rand(d, generator=gen) + 0.2)
    m.basis.copy_(torch.linalg.qr(torch.randn(d, w, generator=gen))[0])
    raw = (m.mean + m.std * torch.randn(n, r, d, generator=gen)).half()
    slow = ((raw.double() - m.mean.double()) / m.std.double()) @ m.basis.double()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        z = m.project(raw)
    assert z.dtype == torch.float32 and z.shape == (n, r, w)
    torch.testing.assert_close(z.double(), slow, rtol=1e-5, atol=1e-4)
    big = {(n, r, d), (n * r, d)}
    passes = [e.name for e in prof.events() if e.name in ("aten::sub", "aten::div", "aten::sub_", "aten::div_")
              and any(tuple(s) in big for s in e.input_shapes if s)]
    assert passes == []
    rows = raw[0]  # (R, D): a few regions without an image axis, as the region-prototype init passes them
    torch.testing.assert_close(m.project(rows).double(), slow[0], rtol=1e-5, atol=1e-4)


def test_parts_started_at_training_regions_in_a_pca_subspace(tiny_cache):
    """init="regions" with pca_dim: each part starts at a projected training region of its class (unit length)."""
    est = quick(pca_dim=8, epochs=1, init="regions", similarity="cosine").fit(tiny_cache)
    assert est.module_.parts.shape == (6, 8) and torch.isfinite(est.module_.parts).all()


def test_a_pca_fit_resumes_to_the_same_weights(tiny_cache, tmp_path):
    ref = quick(pca_dim=8).fit(tiny_cache)

    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        quick(pca_dim=8).fit(tiny_cache, checkpoint=tmp_path / "ck.pt", on_epoch=stop)
    resumed = quick(pca_dim=8).fit(tiny_cache, checkpoint=tmp_path / "ck.pt")
    for k, v in ref.module_.state_dict().items():
        assert torch.equal(v, resumed.module_.state_dict()[k]), k


@pytest.mark.parametrize("pca", [0, 32])
def test_a_cosine_owned_fit_learns_and_scores_raw_descriptors_as_it_trained(tiny_cache, tmp_path, pca):
    est = quick(similarity="cosine", class_layer="owned", pca_dim=pca, epochs=6, inner_epochs=5).fit(tiny_cache)
    x, y = train_arrays(tiny_cache)
    assert (est.predict(x) == y).mean() == 1.0
    m = est.module_
    with torch.no_grad():
        s = m.scores(torch.from_numpy(x[:2]))
        assert s.abs().max() <= 1.0 + 1e-6  # cosines
        v = m.class_weights()
        assert (v * (1 - torch.block_diag(*[torch.ones(1, 2)] * 3))).abs().max() == 0  # owned
    est.save(tmp_path / "m.pt")
    again = DPNetClassifier.load(tmp_path / "m.pt", tiny_cache)
    assert np.array_equal(again.decision_function(x), est.decision_function(x))


def test_patience_stops_on_a_validation_plateau(tiny_cache, tmp_path):
    """With patience k the fit ends once validation top-1 has not improved for k epochs at the
    current learning rate (a drop starts a new count), keeps the best epoch's weights, and a fit
    killed before the stop resumes to the same end."""
    kw = dict(epochs=12, val_fraction=0.3, lr=1e-1, lr_step=3)
    vals = [r["val_top1"] for r in quick(**kw, patience=0).fit(tiny_cache).history_]
    best, stop_after = 0, 12  # the rule, as a loop over the full run's validation curve
    for e in range(1, 13):
        best = e if vals[e - 1] > (vals[best - 1] if best else -1) else best
        if e - max(best, (e - 1) // 3 * 3) >= 2:
            stop_after = e
            break
    assert stop_after < 12, "the reference run never plateaus: the test would prove nothing"
    stopper = quick(**kw, patience=2).fit(tiny_cache, checkpoint=tmp_path / "a.pt")
    assert len(stopper.history_) == stop_after
    assert stopper.best_epoch_ == best
    assert [r["val_top1"] for r in stopper.history_] == vals[:stop_after]
    resumed = killed_then_resumed(lambda: quick(**kw, patience=2), tiny_cache, tmp_path / "b.pt", after=1)
    assert [r["val_top1"] for r in resumed.history_] == [r["val_top1"] for r in stopper.history_]
    assert_same_weights(stopper, resumed)


def test_patience_without_validation_runs_every_epoch(tiny_cache):
    assert len(quick(epochs=4, patience=1, val_fraction=0.0).fit(tiny_cache).history_) == 4
    with pytest.raises(ValueError, match="patience"):
        quick(patience=-1).fit(tiny_cache)


def test_the_default_model_learns_resumes_and_reloads(tiny_cache, tmp_path):
    """The estimator's defaults (cosine parts in a PCA subspace, gather backward, sampled entropy,
    bfloat16 GEMMs where the CPU has them, early stopping) fit the tiny cache, resume to the same
    weights and reload to the same predictions."""
    from dpnet.train.gemm import resolve_gemm_dtype

    kw = dict(parts_per_class=2, epochs=6, inner_epochs=3, batch_size=4, pca_dim=32, entropy_regions=4)
    est = DPNetClassifier(**kw, val_fraction=0.0).fit(tiny_cache)
    x, y = train_arrays(tiny_cache)
    assert (est.predict(x) == y).mean() >= 0.9 and est.module_.similarity == "cosine"
    assert est.module_.basis.shape == (tiny_cache.dim, 32)
    est.save(tmp_path / "m.pt")
    assert np.array_equal(DPNetClassifier.load(tmp_path / "m.pt", tiny_cache).decision_function(x),
                          est.decision_function(x))
    ref = DPNetClassifier(**kw, gemm_dtype="bfloat16").fit(tiny_cache)
    resumed = killed_then_resumed(lambda: DPNetClassifier(**kw, gemm_dtype="bfloat16"), tiny_cache,
                                  tmp_path / "ck.pt", after=2)
    assert_same_weights(ref, resumed)
    assert resolve_gemm_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_gemm_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="gemm_dtype"):
        DPNetClassifier(gemm_dtype="half").fit(tiny_cache)


def test_bfloat16_gemms_give_the_float32_gradient_to_bfloat16_precision(tiny_cache):
    """The bfloat16 GEMM path (CUDA's, and the CPU's where it has bfloat16 units) trains the same
    model as float32 to within bfloat16 rounding: first-step gradients agree closely."""
    from dpnet.train.data import Chunk

    torch.manual_seed(0)
    n, r, d, c, q = 8, 6, 16, 3, 2
    regions = np.random.default_rng(0).normal(size=(n, r, d)).astype(np.float16)
    chunk = Chunk(0, regions, np.arange(n), np.arange(n) % c, np.arange(n) + 1)
    grads = []
    for dtype in ("float32", "bfloat16"):
        est = DPNetClassifier(parts_per_class=q, batch_size=n, similarity="cosine", entropy_regions=0,
                              pca_dim=0, gemm_dtype=dtype)
        module = est.make_module(d, c)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            module.parts.copy_(torch.randn(module.parts.shape, generator=gen))
            module.classifier.copy_(torch.randn(module.classifier.shape, generator=gen))
        opt = torch.optim.SGD(module.parameters(), lr=0.0)
        next(Trainer(est)._chunk_steps(module, opt, chunk, 0, 0, torch.device("cpu")))
        grads.append([p.grad.clone() for p in (module.parts, module.classifier)])
    for a, b in zip(*grads):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99 and not torch.equal(a, b)


def test_region_stats_against_numpy(tiny_cache):
    """Mean, std over every training region, and the correlation of the sampled regions (float32
    GEMMs summed in float64) against a float64 numpy reference over the same picks."""
    from dpnet.train.data import ShardSource, region_stats

    source = ShardSource(tiny_cache, 0.0, 0)
    mean, std, corr = region_stats(source, 5, seed=3)
    x, _ = train_arrays(tiny_cache)
    ids = np.concatenate([a["image_ids"] for _, a in tiny_cache.iter_shards("train", ("image_ids",))])
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, np.maximum(flat.std(0), 1e-3), rtol=1e-4, atol=1e-5)
    picked = np.concatenate([x[i, np.random.default_rng([3, int(ids[i])]).permutation(x.shape[1])[:5]]
                             for i in range(len(x))]).astype(np.float64)
    want = (picked.T @ picked / len(picked) - np.outer(flat.mean(0), flat.mean(0))) / np.outer(std, std)
    np.testing.assert_allclose(corr, want, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_ablation_shows_table_2_the_run_s_setting_and_the_paper_preset(tiny_cache, tmp_path):
    import json

    from dpnet.train.config import TrainConfig
    from dpnet.train.run import run_ablation

    cfg = TrainConfig.from_options(cache=str(tiny_cache.path), run_dir=str(tmp_path / "run"), parts_per_class=2,
                                   epochs=1, inner_epochs=1, batch_size=4, val_fraction=0.0, baselines=False,
                                   progress=False, pca_dim=8)
    rows = run_ablation(cfg)
    names = [r["constraints"] for r in rows]
    assert names[:8] == ["none", "orth", "assign", "cs", "orth+assign", "cs+orth", "cs+assign", "all"]
    assert names[8:] == ["default preset (orth+assign+cs+clst)", "paper preset, this schedule"]
    paper = json.loads((tmp_path / "run" / "ablation" / "paper_preset_this_schedule" / "config.json").read_text())
    assert paper["preset"] == "paper" and paper["fit"]["similarity"] == "dot" and paper["fit"]["epochs"] == 1
    assert "paper preset, this schedule" in (tmp_path / "run" / "ablation.md").read_text()


def test_pruned_parts_stay_silent_through_the_refit_and_a_save(tiny_cache, tmp_path, monkeypatch):
    """prune_parts runs ProtoPNet's pruning after training, before the last-layer refit: a pruned part
    weighs nothing in the refitted layer, in the saved model, and in its predictions."""
    import dpnet.train.trainer as te

    calls = []

    def prune_two(module, bags, labels):  # the real rule on this tiny set may prune nothing: prune two
        calls.append(bags.shape)
        module.owner[[0, 3]] = -1
        return torch.tensor([0, 3])

    monkeypatch.setattr(te, "prune_parts", prune_two)
    est = quick(epochs=1, prune_parts=True, last_layer_steps=5, class_layer="positive").fit(tiny_cache)
    assert calls and (est.module_.class_weights()[:, [0, 3]] == 0).all()
    est.save(tmp_path / "m.pt")
    again = DPNetClassifier.load(tmp_path / "m.pt", tiny_cache)
    assert again.module_.owner[[0, 3]].tolist() == [-1, -1]
    regions = next(tiny_cache.iter_shards("test", ("regions",)))[1]["regions"]
    np.testing.assert_allclose(again.decision_function(regions), est.decision_function(regions), rtol=1e-5)


def test_the_training_path_says_which_arithmetic_a_fit_takes():
    """Benchmarks and the fit's log say which GEMM dtype, space, backward and kernel were taken."""
    from dpnet.train.gemm import training_path

    text = training_path(DPNetClassifier(gemm_dtype="float32", pca_dim=0, backward="dense"), torch.device("cpu"))
    assert "GEMMs in float32" in text and "full D" in text and "dense backward" in text and "pool + entropy" in text
    assert "PCA 256" in training_path(DPNetClassifier(), torch.device("cpu"))
    assert "bfloat16" in training_path(DPNetClassifier(gemm_dtype="bfloat16"), torch.device("cpu"))


def test_the_estimator_is_a_scikit_learn_estimator_from_the_one_declaration():
    """get_params, clone and repr come from scikit-learn's BaseEstimator over the signature made from
    FitParams; an unknown name is refused either way."""
    from sklearn.base import clone

    from dpnet.train.params import FIELDS

    est = DPNetClassifier(pca_dim=0, constraints=["orth", "occur"])
    assert list(est.get_params()) == sorted(f.name for f in FIELDS) and est.constraints == ("orth", "occur")
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    assert "pca_dim=0" in repr(est) and "lr=" not in repr(est)  # repr shows what differs from the defaults
    est.set_params(constraints=["cs"], lr=0.5)
    assert est.constraints == ("cs",) and est.lr == 0.5
    with pytest.raises(ValueError, match="no_such"):
        est.set_params(no_such=1)
    with pytest.raises(TypeError, match="no_such"):
        DPNetClassifier(no_such=1)


def test_views_train_to_agree_and_must_pair(tmp_path):
    """Lever 3: a fit with a view cache (FLIP=1) and the agree constraint lowers C_agree; the micro-batch
    pieces of a step with views add up to the batch's gradient; a cache that is not its view is refused,
    and agree without a view (or a view without agree) says what to pass."""
    from dpnet.errors import CacheMismatchError, ConfigError
    from dpnet.train.data import Chunk

    kw = dict(image_size=96, regions=16, weights=None, synth={"n_classes": 3, "per_class": 8, "image_size": 96})
    cache = RegionCache(run_extraction(tiny_config(tmp_path, **kw)).cache_dir)
    views = RegionCache(run_extraction(tiny_config(tmp_path, flip=True, **kw)).cache_dir)
    agree = dict(constraints=("orth", "assign", "cs", "clst", "agree"), similarity="cosine", pca_dim=8)
    est = quick(**{**agree, "epochs": 4, "entropy_regions": 4}).fit(cache, views=views)
    first, last = est.history_[0]["loss_agree"], est.history_[-1]["loss_agree"]
    assert last < first
    with pytest.raises(CacheMismatchError, match="flip"):
        quick(**agree).fit(cache, views=cache)
    other = RegionCache(run_extraction(tiny_config(tmp_path, flip=True, **{**kw, "regions": 12})).cache_dir)
    with pytest.raises(CacheMismatchError, match="R"):
        quick(**agree).fit(cache, views=other)
    with pytest.raises(ConfigError, match="--views"):
        quick(**agree).fit(cache)
    with pytest.raises(ConfigError, match="--views"):
        quick().fit(cache, views=views)

    # micro-batches with views: the step's gradient is the batch's
    (x, y), (xv, _) = train_arrays(cache), train_arrays(views)
    n = 6
    chunk = Chunk(0, x[:n], np.arange(n), y[:n].astype(np.int64), np.arange(n), xv[:n])
    grads = []
    for micro in (n, 2):
        e = DPNetClassifier(parts_per_class=2, batch_size=n, micro_batch=micro, constraints=("agree",),
                            similarity="cosine", pca_dim=0, entropy_regions=0, gemm_dtype="float32")
        module = e.make_module(cache.dim, cache.n_classes)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            module.parts.copy_(torch.randn(module.parts.shape, generator=gen))
        opt = torch.optim.SGD(module.parameters(), lr=0.0)
        next(Trainer(e)._chunk_steps(module, opt, chunk, 0, 0, torch.device("cpu")))
        grads.append(module.parts.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_view_pairs_with_a_cache_made_before_the_newer_extraction_options(tmp_path, capsys):
    """A cache whose config predates an option (no 'hypercolumn' key: it was off) pairs with its view;
    a view that does not pair is refused by `train --views` without blaming the run folder."""
    import json

    from dpnet.train.cli import main
    from dpnet.train.data import check_views

    kw = dict(image_size=96, regions=16, synth={"n_classes": 3, "per_class": 8, "image_size": 96})
    cache = RegionCache(run_extraction(tiny_config(tmp_path, **kw)).cache_dir)
    views = RegionCache(run_extraction(tiny_config(tmp_path, flip=True, **kw)).cache_dir)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    del manifest["config"]["hypercolumn"], manifest["config"]["flip"]  # as an older dpnet wrote it
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    check_views(RegionCache(cache.path), views)
    other = RegionCache(run_extraction(tiny_config(tmp_path, flip=True, **{**kw, "regions": 12})).cache_dir)
    argv = ["--cache", str(cache.path), "--views", str(other.path), "--run-dir", str(tmp_path / "run"),
            "--constraints", "orth,agree", "--no-baselines", "--no-progress", "--epochs", "1"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "does not pair" in err and "holds the training of another cache" not in err


def test_a_module_hyper_parameter_is_its_field_and_the_module_s_argument():
    """The fields marked module=True are exactly DPNetModule's own keyword arguments (besides the shapes,
    constraints, weights and basis the estimator computes), so such a hyper-parameter touches its field
    and the module only; every lambda_<term> default is the module's default weight."""
    import inspect

    from dpnet.train.losses import KNOWN_CONSTRAINTS
    from dpnet.train.model import LAMBDAS, DPNetModule
    from dpnet.train.params import FIELDS

    computed = {"self", "dim", "n_parts", "n_classes", "parts_per_class", "constraints", "lambdas", "basis_dim"}
    module_args = set(inspect.signature(DPNetModule.__init__).parameters) - computed
    assert {f.name for f in FIELDS if f.metadata["module"]} == module_args
    est = DPNetClassifier(presence=0.3, centre=True, class_layer="owned")
    m = est.make_module(6, 2)
    assert (m.presence, m.centre, m.class_layer) == (0.3, True, "owned")
    assert LAMBDAS == {k: DPNetClassifier().get_params()[f"lambda_{k}"] for k in KNOWN_CONSTRAINTS}


def test_a_run_folder_holding_another_cache_s_checkpoint_says_so(tmp_path, capsys):
    """The run folder's checkpoint made on another cache: the error names the run folder and what to do
    (the view check above must not get this advice; this one must keep it)."""
    from dpnet.train.cli import main

    kw = dict(image_size=96, regions=16, synth={"n_classes": 3, "per_class": 8, "image_size": 96})
    a = run_extraction(tiny_config(tmp_path / "a", **kw)).cache_dir
    b = run_extraction(tiny_config(tmp_path / "b", seed=1, **kw)).cache_dir
    common = ["--run-dir", str(tmp_path / "run"), "--no-baselines", "--no-progress", "--q", "2", "--batch-size", "4"]
    assert main(["--cache", str(a), "--epochs", "1", *common]) == 0
    assert main(["--cache", str(b), "--epochs", "2", *common]) != 0
    err = capsys.readouterr().err
    assert "holds the training of another cache" in err and str(tmp_path / "run") in err


def test_the_torch_baselines_train_in_one_thread_and_give_the_threads_back():
    """Their matrices are tiny (32 x D by D x C): one thread was never slower beside a busy process
    (benchmarks/bench_contention.py --baselines-only); the caller's thread count is restored."""
    from dpnet.train import baselines as B

    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((m, 8)).astype(np.float32) for k, m in (("fit", 12), ("val", 4), ("test", 4))}
    y = {k: rng.integers(0, 3, len(v)).astype(np.int64) for k, v in x.items()}
    data = B.GlobalData(x, y, 3, np.zeros(8, np.float32), np.ones(8, np.float32))
    seen, step = [], torch.optim.AdamW.step
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(torch.get_num_threads()) or step(self, *a, **k))
            out, _ = B.fit_torch_baseline(data, "mlp", 4, epochs=1, passes=1, lr=1e-2, lr_step=1, batch_size=4, seed=0)
        assert seen and set(seen) == {B.BASELINE_THREADS} == {1}
        assert torch.get_num_threads() == 2 and 0 <= out["top1"] <= 100
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("after", [2, 5])
def test_a_sparse_class_layer_fit_ends_k_sparse_and_resumes_to_the_same_weights(tiny_cache, tmp_path, after):
    """sparse_parts=K: after the epochs, stages of 4K, 2K and K parts per class (each chosen and refitted,
    then fine-tuned for sparse_epochs); the model ends with at most K non-negative weights per class.
    Killed after the dense epochs (2) or inside a stage (5), the fit resumes to the same weights."""
    make = lambda: quick(epochs=2, sparse_parts=1, sparse_epochs=2, val_fraction=0.3)  # noqa: E731
    ref = make().fit(tiny_cache, checkpoint=tmp_path / "ref.pt")
    v = ref.module_.class_weights().detach()
    assert (v >= 0).all() and ((v > 0).sum(1) <= 1).all() and (v > 0).any()
    assert [r.get("sparse_parts") for r in ref.history_] == [None, None, 4, 4, 2, 2, 1, 1]
    assert ref.best_epoch_ in (7, 8)  # the best epoch of the last stage: the model is K-sparse
    resumed = killed_then_resumed(make, tiny_cache, tmp_path / f"ck{after}.pt", after=after)
    assert_same_weights(ref, resumed)
    assert [r["val_top1"] for r in ref.history_] == [r["val_top1"] for r in resumed.history_]
    x, _ = train_arrays(tiny_cache)
    ref.save(tmp_path / "m.pt")
    np.testing.assert_allclose(DPNetClassifier.load(tmp_path / "m.pt", tiny_cache).decision_function(x),
                               ref.decision_function(x), rtol=1e-6)
