"""Whole-training-set passes for the analysis: each part's top regions, and d(p, c).

One streaming pass over the cache's training shards (memory: one shard plus (P, k) running
arrays). Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.cache import RegionCache
from train.estimator import DPNetClassifier

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
        d: (C, P) d(p, c), see :func:`class_part_weights`.
        f: (P,) f(p), see :func:`class_part_weights`.
    """

    top_score: np.ndarray
    top_image: np.ndarray
    top_region: np.ndarray
    class_sum: np.ndarray
    class_count: np.ndarray
    d: np.ndarray
    f: np.ndarray


@torch.no_grad()
def best_regions(est: DPNetClassifier, regions: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (N, R, D) -> b (N, P) normalised, best raw score (N, P), best region index (N, P)."""
    module, outs = est.module_, []
    for a in range(0, len(regions), batch):
        s = module.scores(torch.from_numpy(regions[a:a + batch]).to(module.mean.device))  # (n, R, P)
        raw, where = s.max(dim=1)
        outs.append((torch.nn.functional.normalize(raw, dim=1).cpu().numpy(), raw.cpu().numpy(),
                     where.cpu().numpy()))
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def merge_topk(score: np.ndarray, extra: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of ``score`` (P, a) and ``extra`` (P, b); returns scores and column picks.

    Returns:
        (P, k') best scores, best first, and (P, k') indices into the concatenation [score | extra].
    """
    both = np.concatenate([score, extra], axis=1)  # (P, a + b)
    kk = min(k, both.shape[1])
    pick = np.argsort(-both, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(both, pick, 1), pick


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


def part_stats(est: DPNetClassifier, cache: RegionCache, k: int = 8, progress: bool = False) -> PartStats:
    """One pass over the training split: running top-k regions per part, and d(p, c)."""
    p, c = est.module_.parts.shape[0], len(est.classes_)
    top_score = np.full((p, 0), -np.inf, np.float32)
    top_image = np.zeros((p, 0), np.int64)
    top_region = np.zeros((p, 0), np.int64)
    class_sum, class_count = np.zeros((c, p)), np.zeros(c, np.int64)
    shards = cache.iter_shards("train", ("regions", "labels", "image_ids"))
    for _, arrays in tqdm(shards, total=cache.n_shards, desc="parts", unit="shard", disable=not progress):
        b, raw, where = best_regions(est, arrays["regions"])
        np.add.at(class_sum, arrays["labels"], b)
        class_count += np.bincount(arrays["labels"], minlength=c)
        top_score, pick = merge_topk(top_score, raw.T, k)
        new_img = np.broadcast_to(arrays["image_ids"][None, :], raw.T.shape)
        top_image = np.take_along_axis(np.concatenate([top_image, new_img], 1), pick, 1)
        top_region = np.take_along_axis(np.concatenate([top_region, where.T], 1), pick, 1)
        del arrays
    v = est.module_.classifier.detach().cpu().numpy().astype(np.float64)
    d, f = class_part_weights(v, class_sum, class_count, est.parts_per_class)
    return PartStats(top_score, top_image, top_region, class_sum, class_count, d, f)
