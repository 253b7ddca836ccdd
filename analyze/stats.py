"""The report's whole-training-set pass: each part's top regions, and the class sums behind d(p, c).

One streaming pass over the cache's training shards (memory: one shard plus (P, k) running
arrays); the pooling is the model's (``dpnet.train.class_parts.pooled_shards``) and d(p, c) is
``dpnet.train.class_parts.class_part_weights``, the same the run saved with the model.
Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from dpnet.extract.cache import RegionCache
from dpnet.train.class_parts import add_class_sums, class_part_weights, pooled_shards
from dpnet.train.estimator import DPNetClassifier

log = logging.getLogger(__name__)


@dataclass
class PartStats:
    """What the training pass learns about the parts.

    Attributes:
        top_score: (P, k) raw scores s_pr of each part's best training regions, best first.
        top_image: (P, k) image ids of those regions (one region per image).
        top_region: (P, k) region indices inside those images.
        class_sum: (C, P) sum over training images of class c of b_p (the pooled part score).
        class_count: (C,) training images per class.
        d: (C, P) d(p, c), see :func:`dpnet.train.class_parts.class_part_weights`.
        f: (P,) f(p), likewise.
    """

    top_score: np.ndarray
    top_image: np.ndarray
    top_region: np.ndarray
    class_sum: np.ndarray
    class_count: np.ndarray
    d: np.ndarray
    f: np.ndarray


def merge_topk(score: np.ndarray, extra: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of ``score`` (P, a) and ``extra`` (P, b); returns scores and column picks.

    Returns:
        (P, k') best scores, best first, and (P, k') indices into the concatenation [score | extra].
    """
    both = np.concatenate([score, extra], axis=1)  # (P, a + b)
    kk = min(k, both.shape[1])
    pick = np.argsort(-both, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(both, pick, 1), pick


class PartStatsPass:
    """The running state of the training pass (P, k) top regions and (C, P) class sums, fed chunk by
    chunk by :func:`part_stats` or by any pass that pools the training images anyway."""

    def __init__(self, est: DPNetClassifier, k: int):
        p, c = est.module_.parts.shape[0], len(est.classes_)
        self.est, self.k = est, k
        self.top_score = np.full((p, 0), -np.inf, np.float32)
        self.top_image = np.zeros((p, 0), np.int64)
        self.top_region = np.zeros((p, 0), np.int64)
        self.class_sum, self.class_count = np.zeros((c, p)), np.zeros(c, np.int64)

    def add(self, b: np.ndarray, raw: np.ndarray, where: np.ndarray, labels: np.ndarray, image_ids: np.ndarray) -> None:
        """One chunk of n images: b, raw, where (n, P) from the model's pool, labels and ids (n,)."""
        add_class_sums(self.class_sum, self.class_count, labels, b)
        self.top_score, pick = merge_topk(self.top_score, raw.T, self.k)
        new_img = np.broadcast_to(image_ids[None, :], raw.T.shape)
        self.top_image = np.take_along_axis(np.concatenate([self.top_image, new_img], 1), pick, 1)
        self.top_region = np.take_along_axis(np.concatenate([self.top_region, where.T], 1), pick, 1)

    def finish(self) -> PartStats:
        return finish_stats(self.est, self.top_score, self.top_image, self.top_region, self.class_sum,
                            self.class_count)


def part_stats(est: DPNetClassifier, cache: RegionCache, k: int = 8, progress: bool = False) -> PartStats:
    """One pass over the training split: running top-k regions per part, and d(p, c)."""
    acc = PartStatsPass(est, k)
    passes = pooled_shards(est, cache, "train")
    for _, arrays, (b, raw, where) in tqdm(passes, total=cache.n_shards, desc="parts", unit="shard",
                                           disable=not progress):
        acc.add(b, raw, where, arrays["labels"], arrays["image_ids"])
    return acc.finish()


def finish_stats(est: DPNetClassifier, top_score: np.ndarray, top_image: np.ndarray, top_region: np.ndarray,
                 class_sum: np.ndarray, class_count: np.ndarray) -> PartStats:
    """PartStats from the pass's arrays: d(p, c) and f(p) from the class sums."""
    v = est.module_.class_weights().detach().cpu().numpy().astype(np.float64)
    d, f = class_part_weights(v, class_sum, class_count, est.parts_per_class)
    return PartStats(top_score, top_image, top_region, class_sum, class_count, d, f)


def bootstrap_interval(n: int, statistic: Callable[[np.ndarray], float], reps: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of n images, resampling the images.

    Args:
        n: how many images the statistic is over.
        statistic: takes (n,) row indices drawn with replacement and returns the statistic of those rows.
        reps: resamples (each ``rng.integers(0, n, n)`` in turn, from ``default_rng(seed)``).

    Returns:
        The (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled statistic.
    """
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(reps)])
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))
