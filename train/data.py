"""Training data from the cache: shards streamed (or held, when they fit), a validation split
carved from the training images, standardisation statistics, and non-finite checks.

Glossary: N images, R regions, D descriptor size, C classes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from extract.cache import RegionCache
from extract.datasets import hash_fraction
from extract.errors import DpnetError

log = logging.getLogger(__name__)


class NonFiniteError(DpnetError):
    """NaN or inf in the cache or in the loss; names where it appeared."""


def is_val(image_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Validation membership of training images, by a hash of (seed, image id): stable, no shuffle."""
    return np.array([hash_fraction(f"val:{seed}:{int(i)}") < fraction for i in image_ids], bool)


def default_budget_mb() -> float:
    """A quarter of this machine's RAM, in MiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2**20
    except (ValueError, OSError, AttributeError):
        return 4096.0


@dataclass
class Chunk:
    """The training rows of one shard: regions (n, R, D) float16, labels (n,), image ids (n,)."""

    shard: int
    regions: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray


def check_finite(regions: np.ndarray, image_ids: np.ndarray, where: str) -> None:
    """Raise NonFiniteError naming the first image whose descriptors hold NaN or inf."""
    bad = ~np.isfinite(regions.reshape(len(regions), -1)).all(axis=1)
    if bad.any():
        first = int(image_ids[np.argmax(bad)])
        raise NonFiniteError(f"{where}: non-finite region descriptors in {int(bad.sum())} image(s), first image id "
                             f"{first}. Re-extract this cache (delete its shards folder and run make extract).")


class ShardSource:
    """Yields the training chunks of a cache, shard by shard, without validation images.

    Shards are read in a background thread one ahead of use. When the whole training split
    fits in ``budget_mb`` the chunks are kept after the first pass; otherwise each epoch
    streams them again, holding at most two shards.
    """

    def __init__(self, cache: RegionCache, val_fraction: float, seed: int, budget_mb: float | None = None):
        self.cache, self.val_fraction, self.seed = cache, val_fraction, seed
        bytes_train = cache.count("train") * cache.n_regions * cache.dim * 2
        self.budget_mb = default_budget_mb() if budget_mb is None else budget_mb
        self.hold = bytes_train / 2**20 <= self.budget_mb
        self._held: list[Chunk] | None = None
        log.info("training split: %.1f MiB; %s", bytes_train / 2**20,
                 "held in memory" if self.hold else f"streamed (budget {self.budget_mb:.0f} MiB)")

    def chunks(self) -> Iterator[Chunk]:
        """One pass over the training chunks in stored order."""
        if self._held is not None:
            yield from self._held
            return
        held = []
        fields = ("regions", "labels", "image_ids")
        for shard, arrays in self.cache.iter_shards("train", fields):
            keep = ~is_val(arrays["image_ids"], self.val_fraction, self.seed)
            chunk = Chunk(shard, arrays["regions"][keep], arrays["labels"][keep], arrays["image_ids"][keep])
            del arrays
            check_finite(chunk.regions, chunk.image_ids, f"{self.cache.path} shard {shard}")
            if self.hold:
                held.append(chunk)
            yield chunk
        if self.hold:
            self._held = held


def split_arrays(cache: RegionCache, split: str, val_fraction: float, seed: int,
                 fields: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """Stream ``fields`` of ``split`` in ``all``/``train``/``test``/``val``/``fit`` (train minus val)."""
    base = "train" if split in ("val", "fit") else split
    for _, arrays in cache.iter_shards(base, tuple(set(fields) | {"image_ids"})):
        if split in ("val", "fit"):
            mask = is_val(arrays["image_ids"], val_fraction, seed)
            arrays = {k: v[mask if split == "val" else ~mask] for k, v in arrays.items()}
        if len(arrays["image_ids"]):
            yield arrays


def region_stats(source: ShardSource) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (D,) of every training region descriptor, in float64 accumulators."""
    total = sq = None
    count = 0
    for chunk in source.chunks():
        for a in range(0, len(chunk.regions), 8):  # 8 images at a time: bounded float64 copies
            x = chunk.regions[a:a + 8].reshape(-1, chunk.regions.shape[-1]).astype(np.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            count += len(x)
    if not count:
        raise DpnetError(f"{source.cache.path}: no training images left after the validation split")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)
