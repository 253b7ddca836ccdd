"""The training-set pass of :mod:`dpnet.analyze.stats` on dask.array over the zarr cache.

Same result as :func:`dpnet.analyze.stats.part_stats`, but expressed as a dask graph over the
shards' ``regions`` arrays, so any dask scheduler runs it: threads here, or a
``distributed.Client`` (a cluster whose workers can read the cache path). Each block holds a
few images; a block becomes its per-part best scores, then reductions give the top-k per part
(``da.topk``) and the per-class sums (one-hot labels times b).
Glossary: N images, R regions, D descriptor size, P parts, C classes.
"""

from __future__ import annotations

import numpy as np
import torch

from dpnet.extract.cache import RegionCache
from dpnet.train.estimator import DPNetClassifier
from dpnet.train.model import DPNetModule

from .stats import PartStats, finish_stats


def train_regions(cache: RegionCache, images_per_block: int = 16):
    """dask (N, R, D) float16 of the training images, shard after shard, in cache order."""
    import dask.array as da

    if cache.manifest["store"] != "zarr":
        raise ValueError(f"{cache.path}: the dask path reads zarr shards; this cache is {cache.manifest['store']}")
    parts = []
    for s in range(cache.n_shards):
        cache.check_shard(s)
        a, b = cache.rows(s, "train")
        if b > a:
            arr = da.from_zarr(cache.shard_location(s), component="regions")
            parts.append(arr[a:b])
    return da.concatenate(parts).rechunk((images_per_block, -1, -1))


@torch.no_grad()
def _block_scores(block: np.ndarray, module: DPNetModule) -> np.ndarray:
    """(n, R, D) float16 -> (n, 3, P): b (normalised), best raw score, best region index (as float)."""
    pooled = module.pool(module.scores(torch.from_numpy(np.ascontiguousarray(block))))
    return np.stack([pooled.b.numpy(), pooled.raw.numpy(), pooled.where.numpy().astype(np.float32)], 1)


def part_stats_dask(est: DPNetClassifier, cache: RegionCache, k: int = 8, images_per_block: int = 16) -> PartStats:
    """:func:`dpnet.analyze.stats.part_stats` as a dask computation (uses the current dask scheduler/client)."""
    import dask
    import dask.array as da

    module = est.module_.cpu().eval()
    p, n_classes = module.parts.shape[0], len(est.classes_)
    x = train_regions(cache, images_per_block)
    per = x.map_blocks(_block_scores, module, drop_axis=[1, 2], new_axis=[1, 2], chunks=(x.chunks[0], (3,), (p,)),
                       dtype=np.float32)  # (N, 3, P)
    labels = cache.read("labels", "train").astype(np.int64)
    ids = cache.read("image_ids", "train").astype(np.int64)
    onehot = da.from_array(np.eye(n_classes)[labels], chunks=(x.chunks[0], n_classes))  # (N, C)
    class_sum = onehot.T @ per[:, 0, :].astype(np.float64)  # (C, P)
    top_pos = da.argtopk(per[:, 1, :], k, axis=0)  # (k, P) rows of the training images, best first
    class_sum, top_pos = dask.compute(class_sum, top_pos)
    top_pos = top_pos.T  # (P, k)
    cols = np.broadcast_to(np.arange(p)[:, None], top_pos.shape)
    # only the selected (image, part) cells come back: memory stays (P, k) whatever N is
    top_score, top_region = dask.compute(per[:, 1, :].vindex[top_pos, cols], per[:, 2, :].vindex[top_pos, cols])
    order = np.argsort(-top_score, axis=1, kind="stable")  # argtopk's order is not guaranteed
    top_pos = np.take_along_axis(top_pos, order, 1)
    top_score = np.take_along_axis(top_score, order, 1).astype(np.float32)
    top_region = np.take_along_axis(top_region, order, 1).astype(np.int64)
    count = np.bincount(labels, minlength=n_classes)
    return finish_stats(est, top_score, ids[top_pos], top_region, class_sum, count)
