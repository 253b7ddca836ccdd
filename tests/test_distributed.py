"""Training under torchrun (issue 18): two CPU ranks (gloo) fit what one process fits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpnet.extract.cache import RegionCache
from dpnet.train.estimator import DPNetClassifier

# several pieces per batch (micro_batch 1 of 4 images) so both ranks work on every step
PARAMS = dict(parts_per_class=2, epochs=3, inner_epochs=2, lr=1e-2, batch_size=4, micro_batch=1, val_fraction=0.2,
              seed=0, patience=0, gemm_dtype="float32")


@pytest.fixture(scope="module")
def cache_dir(pretrained_tiny_cache) -> Path:
    return pretrained_tiny_cache


class Stop(Exception):
    pass


def _rank(rank: int, world: int, init: str, cache_dir: str, out: str, checkpoint: str | None, stop_after: int) -> None:
    """One rank: join the group, fit (stopping after ``stop_after`` epochs when > 0), rank 0 saves U and V."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        def on_epoch(row):
            if stop_after and row["epoch"] >= stop_after:
                raise Stop

        est = DPNetClassifier(**PARAMS)
        try:
            est.fit(RegionCache(cache_dir), checkpoint=checkpoint, on_epoch=on_epoch)
        except Stop:
            return
        if rank == 0:
            torch.save({**est.module_.state_dict(), "val_top1": [row["val_top1"] for row in est.history_]}, out)
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, cache_dir: Path, out: Path, checkpoint: Path | None = None, stop_after: int = 0) -> None:
    init = f"file://{tmp / ('init-' + out.stem + str(stop_after))}"
    torch.multiprocessing.spawn(_rank, args=(2, init, str(cache_dir), str(out), str(checkpoint) if checkpoint else None,
                                             stop_after), nprocs=2, join=True)


def _assert_same(state: dict, est: DPNetClassifier) -> None:
    for k in ("parts", "classifier"):
        torch.testing.assert_close(state[k], est.module_.state_dict()[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_cpu_ranks_fit_what_one_process_fits(cache_dir, tmp_path):
    one = DPNetClassifier(**PARAMS).fit(RegionCache(cache_dir))
    _spawn(tmp_path, cache_dir, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt")
    _assert_same(two, one)
    assert two["val_top1"] == [row["val_top1"] for row in one.history_]  # the ranks' added counts: the same top-1


@pytest.mark.parametrize("projected", [True, False])
def test_each_rank_scores_its_own_share_of_the_validation_split(cache_dir, monkeypatch, projected):
    """Under torchrun the ranks split the validation images (disjoint shares, together the split);
    the top-1 from their added counts is the one-process top-1."""
    from dpnet.train import distributed
    from dpnet.train.trainer import Trainer

    est = DPNetClassifier(**{**PARAMS, "epochs": 1, "val_fraction": 0.5, "pca_dim": 8 if projected else 0}).fit(
        RegionCache(cache_dir))
    assert (est.module_.basis is not None) == projected
    cache = RegionCache(cache_dir)
    seen = []
    monkeypatch.setattr(distributed, "sum_numbers", lambda values: seen.append(values) or values)
    one = Trainer(est, cache)._val_accuracy(est.module_, cache, torch.device("cpu"))
    counts = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        Trainer(est, cache)._val_accuracy(est.module_, cache, torch.device("cpu"))
        counts[rank] = seen[-1]
    (right, n), (r0, n0), (r1, n1) = seen[0], counts[0], counts[1]
    assert n >= 4 and n0 + n1 == n and abs(n0 - n1) <= cache.n_shards and r0 + r1 == right
    assert one == 100.0 * (right / n)


@pytest.mark.slow
def test_a_distributed_fit_stopped_and_resumed_ends_where_an_unbroken_one_does(cache_dir, tmp_path):
    one = DPNetClassifier(**PARAMS).fit(RegionCache(cache_dir))
    ckpt = tmp_path / "checkpoint.pt"
    _spawn(tmp_path, cache_dir, tmp_path / "stopped.pt", ckpt, stop_after=1)
    assert ckpt.is_file() and not (tmp_path / "stopped.pt").exists()
    _spawn(tmp_path, cache_dir, tmp_path / "resumed.pt", ckpt)
    _assert_same(torch.load(tmp_path / "resumed.pt"), one)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not beside this python")
@pytest.mark.slow
def test_torchrun_trains_a_run_that_one_process_reproduces(cache_dir, tmp_path):
    """``torchrun --nproc_per_node=2 -m dpnet.train`` (what RANKS=2 make train runs) writes one run, rank 0's."""
    common = ["--cache", str(cache_dir), "--no-baselines", "--no-progress", "--q", "2", "--epochs", "2",
              "--batch-size", "4", "--micro-batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "dpnet.train", "--run-dir",
                          str(tmp_path / "two"), *common], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run:") == 1  # rank 0 reports; rank 1 only fits
    one = subprocess.run([sys.executable, "-m", "dpnet.train", "--run-dir", str(tmp_path / "one"), *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    cache = RegionCache(cache_dir)
    regions = next(cache.iter_shards("test", ("regions",)))[1]["regions"]
    a, b = (DPNetClassifier.load(tmp_path / r / "model.pt", cache) for r in ("two", "one"))
    np.testing.assert_allclose(a.decision_function(regions), b.decision_function(regions), rtol=1e-4, atol=1e-4)
