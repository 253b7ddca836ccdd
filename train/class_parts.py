"""Class-level part weights d(p, c), computed with the fit and saved with the run.

One streaming pass over a split gives every image's pooled parts (:func:`pooled_shards`); the
training split's per-class sums give d(p, c) (:func:`class_part_weights`). The report's part
gallery and ``make explain`` use the d saved in ``model.pt``, so explain does not depend on a
report having been built. Glossary: N images, R regions, P parts, C classes, q parts per class.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from dpnet.extract.cache import RegionCache

from .data import check_finite
from .estimator import DPNetClassifier


@torch.no_grad()
def pooled(est: DPNetClassifier, regions: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (N, R, D) -> b (N, P) normalised, best raw score (N, P), best region index (N, P)."""
    module, outs = est.module_, []
    for a in range(0, len(regions), batch):
        pool = module.pool(module.scores(torch.from_numpy(np.asarray(regions[a:a + batch])).to(module.mean.device)))
        outs.append((pool.b.cpu().numpy(), pool.raw.cpu().numpy(), pool.where.cpu().numpy()))
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def pooled_shards(est: DPNetClassifier, cache: RegionCache, split: str, fields: tuple[str, ...] = ()
                  ) -> Iterator[tuple[int, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Stream a split: (shard, arrays of ``fields`` + labels and image_ids, (b, raw, where)).

    Raises:
        NonFiniteError: a score is NaN or inf; names the shard file and the first image.
    """
    wanted = tuple(dict.fromkeys(("regions", "labels", "image_ids") + tuple(fields)))
    for shard, arrays in cache.iter_shards(split, wanted):
        b, raw, where = pooled(est, arrays["regions"])
        if not np.isfinite(raw).all():
            check_finite(arrays["regions"], arrays["image_ids"], cache.shard_location(shard))
            check_finite(raw, arrays["image_ids"], cache.shard_location(shard), "part scores")
        yield shard, arrays, (b, raw, where)


def add_class_sums(class_sum: np.ndarray, count: np.ndarray, labels: np.ndarray, b: np.ndarray) -> None:
    """Accumulate sum_{I in c} b_p(I) into ``class_sum`` (C, P) and images per class into ``count`` (C,)."""
    np.add.at(class_sum, labels, b)
    count += np.bincount(labels, minlength=len(count))


def class_part_weights(weights: np.ndarray, class_sum: np.ndarray, class_count: np.ndarray,
                       parts_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """d(p, c) and f(p) of method.md, with log(1 + f) in place of the paper's log f.

    Args:
        weights: V (C, P).
        class_sum: (C, P) sum of b_p over the training images of each class.
        class_count: (C,) images per class.
        parts_per_class: q; f(p) counts the classes having p among their top-q parts by mean
            contribution v_cp * mean b_p.

    Returns:
        d (C, P) = sum_{I in c} v_cp b_p(I) / log(1 + max(f(p), 1)), and f (P,) integers. A part in
        no class's top-q (f = 0) is not shared, so it is weighted like f = 1.
    """
    c, p = weights.shape
    total = weights * class_sum  # (C, P): sum over class images of v_cp * b_p
    mean = total / np.maximum(class_count, 1)[:, None]
    top = np.argsort(-mean, axis=1, kind="stable")[:, :parts_per_class]  # (C, q)
    f = np.zeros(p, np.int64)
    np.add.at(f, top.ravel(), 1)
    return total / np.log1p(np.maximum(f, 1))[None, :], f


def fit_class_parts(est: DPNetClassifier, cache: RegionCache) -> np.ndarray:
    """d(p, c) of a fitted model over ``cache``'s training split; also stored as ``est.class_parts_``."""
    p, c = est.module_.parts.shape[0], len(est.classes_)
    class_sum, count = np.zeros((c, p)), np.zeros(c, np.int64)
    for _, arrays, (b, _, _) in pooled_shards(est, cache, "train"):
        add_class_sums(class_sum, count, arrays["labels"], b)
    v = est.module_.class_weights().detach().cpu().numpy().astype(np.float64)
    est.class_parts_ = class_part_weights(v, class_sum, count, est.parts_per_class)[0]
    return est.class_parts_
