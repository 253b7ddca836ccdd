"""Training data from the cache: shards streamed (or held, when they fit), a validation split
carved from the training images, standardisation statistics, and non-finite checks.

Glossary: N images, R regions, D descriptor size, C classes.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from dpnet.errors import CacheMismatchError, DpnetError, NonFiniteError
from dpnet.extract.cache import RegionCache
from dpnet.extract.datasets import hash_fraction

log = logging.getLogger(__name__)


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
    """The fitting rows of one shard, without copying its descriptors.

    ``regions`` is the shard's array (n_shard, R, D) float16 as read; ``rows`` (n,) picks this
    chunk's images from it; ``labels`` and ``image_ids`` (n,) are already picked.
    """

    shard: int
    regions: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray
    view: np.ndarray | None = None  # the view cache's array of the same shard (rows index it alike), if any

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """float16 (len(idx), R, D) of the chunk's images ``idx`` (positions in this chunk)."""
        return self.regions[self.rows[idx]]

    def view_batch(self, idx: np.ndarray) -> np.ndarray:
        """The view's (len(idx), R, D) of the same images (region r the mirror of region r)."""
        return self.view[self.rows[idx]]

    def batch_into(self, idx: np.ndarray, buf: torch.Tensor) -> torch.Tensor:
        """The images ``idx`` converted into the float32 buffer ``buf`` (flat, large enough), viewed
        as (len(idx), R, D): image by image, with no float16 copy of the batch in between."""
        r, d = self.regions.shape[1:]
        out = buf[:len(idx) * r * d].view(len(idx), r, d)
        with warnings.catch_warnings():  # mapped rows are read-only; they are only ever copied from
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for k, row in enumerate(self.rows[idx]):
                out[k].copy_(torch.from_numpy(self.regions[row]))
        return out

    def compact(self) -> "Chunk":
        """A copy holding only this chunk's rows (for keeping in memory across epochs)."""
        if isinstance(self.regions, np.ndarray) and len(self.rows) == len(self.regions) and \
                (self.view is None or isinstance(self.view, np.ndarray)):
            return self
        view = None if self.view is None else np.asarray(self.view[self.rows])
        return Chunk(self.shard, self.regions[self.rows], np.arange(len(self.rows)), self.labels, self.image_ids, view)


def check_finite(values: np.ndarray, image_ids: np.ndarray, where: str, what: str = "region descriptors") -> None:
    """Raise NonFiniteError naming the first image whose ``values`` (one row per image) hold NaN or inf.

    A full scan; callers run it only once a sum they compute anyway (the statistics, a loss, a
    logit, a score) turns out non-finite, so finite data costs nothing. ``where`` names the shard.
    """
    bad = np.array([not np.isfinite(np.asarray(r, dtype=np.float32)).all() for r in values], bool)
    if bad.any():
        first = int(image_ids[np.argmax(bad)])
        raise NonFiniteError(f"{where}: non-finite {what} in {int(bad.sum())} image(s), first image id {first}. "
                             f"Delete that shard and run the same `make extract` again to re-extract it.")


class ShardSource:
    """Yields the training chunks of a cache, shard by shard, without validation images.

    Shards are read in a background thread one ahead of use. When the whole training split
    fits in ``budget_mb`` the chunks are kept after the first pass; otherwise each epoch
    streams them again, holding at most two shards.
    """

    def __init__(self, cache: RegionCache, val_fraction: float, seed: int, budget_mb: float | None = None,
                 views: RegionCache | None = None):
        self.cache, self.val_fraction, self.seed, self.views = cache, val_fraction, seed, views
        if views is not None:
            check_views(cache, views)
        bytes_train = cache.count("train") * cache.n_regions * cache.dim * 2 * (1 if views is None else 2)
        self.budget_mb = default_budget_mb() if budget_mb is None else budget_mb
        self.hold = bytes_train / 2**20 <= self.budget_mb
        self._held: list[Chunk] | None = None
        self._index: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None  # rows, labels, ids
        log.info("training split: %.1f MiB; %s", bytes_train / 2**20,
                 "held in memory" if self.hold else f"streamed (budget {self.budget_mb:.0f} MiB)")

    def chunks(self) -> Iterator[Chunk]:
        """One pass over the training chunks in stored order."""
        if self._held is not None:
            yield from self._held
            return
        held, index = [], self._index or {}
        # After the first pass only the descriptors are read again: the rows, labels and ids of
        # each shard's fitting images are remembered (a few KB), which spares the reader thread
        # (it shares the cores with the trainer) two zarr reads and the validation hash per shard.
        fields = ("regions",) if self._index is not None else ("regions", "labels", "image_ids")
        # streaming maps the shards (no copy); a split that is kept is copied into memory once
        views = self.views.iter_shards("train", ("regions",), mmap=True) if self.views is not None else None
        for shard, arrays in self.cache.iter_shards("train", fields, mmap=True):
            if shard not in index:
                keep = np.flatnonzero(~is_val(arrays["image_ids"], self.val_fraction, self.seed))
                index[shard] = keep, arrays["labels"][keep], arrays["image_ids"][keep]
            view = None if views is None else next(views)[1]["regions"]  # the same shard (check_views)
            chunk = Chunk(shard, arrays["regions"], *index[shard], view)
            del arrays
            if self.hold:
                chunk = chunk.compact()
                held.append(chunk)
            yield chunk
            del chunk  # streaming: only the consumer's reference remains, then the shard is freed
        self._index = index
        if self.hold:
            self._held = held


VIEW_SAME = ("format", "dataset", "backbone", "weights_sha256", "layer", "image_size", "grid", "R", "D", "seed",
             "order", "shard_bounds")
VIEW_CONFIG_SAME = {"crop": False, "dense": [], "hypercolumn": False}  # with the value a cache without the key had


def check_views(cache: RegionCache, views: RegionCache) -> None:
    """A view cache pairs with ``cache`` when it holds the same images in the same shards, each region
    the mirror of the same region: made by the same extraction with FLIP=1 (and ``cache`` without).

    Raises:
        CacheMismatchError: naming every field that differs, and the command that makes the view.
    """
    a, b = cache.manifest, views.manifest
    ca, cb = a.get("config", {}), b.get("config", {})
    diffs = [k for k in VIEW_SAME if a.get(k) != b.get(k)]
    diffs += [k for k, old in VIEW_CONFIG_SAME.items() if ca.get(k, old) != cb.get(k, old)]
    if not cb.get("flip") or ca.get("flip"):
        diffs.append("flip (the view must be extracted with FLIP=1, the cache without)")
    if diffs:
        raise CacheMismatchError(f"the view cache {views.path} does not pair with {cache.path}: {', '.join(diffs)} "
                                 f"differ. Make it with the cache's own extraction command plus FLIP=1 (--flip).")


def split_arrays(cache: RegionCache, split: str, val_fraction: float, seed: int,
                 fields: tuple[str, ...], with_shard: bool = False, share: tuple[int, int] = (0, 1)) -> Iterator:
    """Stream ``fields`` of ``split`` in ``all``/``train``/``test``/``val``/``fit`` (train minus val).

    Yields dicts of arrays (``image_ids`` always included), or ``(shard, dict)`` with ``with_shard``.
    ``share`` = (rank, ranks): only every ranks-th image of each shard, from the rank-th (the ranks'
    shares are disjoint and together the split; only the rows of this share are read).
    """
    base = "train" if split in ("val", "fit") else split
    rank, ranks = share
    # a subset of the train split (or a rank's share) maps its shards, so only the rows it keeps are copied
    subset = base != split or ranks > 1
    for shard, arrays in cache.iter_shards(base, tuple(set(fields) | {"image_ids"}), mmap=subset):
        if subset:
            keep = np.ones(len(arrays["image_ids"]), bool)
            if split in ("val", "fit"):
                mask = is_val(arrays["image_ids"], val_fraction, seed)
                keep = mask if split == "val" else ~mask
            keep[np.flatnonzero(keep)[np.arange(keep.sum()) % ranks != rank]] = False
            arrays = {k: v[keep] for k, v in arrays.items()}
        if len(arrays["image_ids"]):
            yield (shard, arrays) if with_shard else arrays


def region_stats(source: ShardSource, moment_regions: int = 0, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean and std (D,) of every training region descriptor, in float64 accumulators; and, with
    ``moment_regions``, the correlation matrix (D, D) of the standardised descriptors, estimated
    from that many random regions per image (for the PCA basis), else None.

    Raises:
        NonFiniteError: a descriptor is NaN or inf; names the shard and the first image.
    """
    total = sq = moment = None
    count = sampled = 0
    r, d = source.cache.n_regions, source.cache.dim
    buf = torch.empty(2 * r * d)
    for chunk in source.chunks():
        for a in range(0, len(chunk), 2):  # 2 images at a time, in one reused float32 buffer
            rows = np.arange(a, min(a + 2, len(chunk)))
            x = chunk.batch_into(rows, buf)  # (n, R, D)
            if moment_regions:
                picks = np.stack([np.random.default_rng([seed, int(i)]).permutation(r)[:moment_regions]
                                  for i in chunk.image_ids[rows]])  # (n, k): by image id, whatever the order
                xs = x.gather(1, torch.from_numpy(picks).unsqueeze(-1).expand(-1, -1, d)).flatten(0, 1)
                block = (xs.T @ xs).double()  # a float32 GEMM over <= 2k rows, summed in float64
                moment = block if moment is None else moment.add_(block)
                sampled += len(xs)
            x = x.flatten(0, 1)  # (n R, D)
            part = x.sum(0).double()  # float32 sums of <= 2R rows, accumulated in float64
            part_sq = x.square_().sum(0).double()
            if not (torch.isfinite(part).all() and torch.isfinite(part_sq).all()):
                check_finite(chunk.batch(rows), chunk.image_ids[rows], source.cache.shard_location(chunk.shard))
            total = part if total is None else total + part
            sq = part_sq if sq is None else sq + part_sq
            count += len(x)
        del chunk
    if not count:
        raise DpnetError(f"{source.cache.path}: no training images left after the validation split")
    total, sq = total.numpy(), sq.numpy()
    mean = total / count
    std = np.maximum(np.sqrt(np.maximum(sq / count - mean**2, 0.0)), 1e-3)
    corr = None
    if moment is not None:  # E[(x - m)(x - m)^T] / (s s^T), from the sampled second moment
        corr = (moment.numpy() / sampled - np.outer(mean, mean)) / np.outer(std, std)
    return mean.astype(np.float32), std.astype(np.float32), corr


def pca_basis(corr: np.ndarray, dim: int) -> np.ndarray:
    """The ``dim`` leading eigenvectors (D, dim) of a correlation matrix, largest first, signs fixed."""
    values, vectors = np.linalg.eigh(corr)  # ascending
    basis = vectors[:, ::-1][:, :dim]
    basis *= np.where(basis[np.abs(basis).argmax(0), np.arange(dim)] < 0, -1.0, 1.0)  # deterministic signs
    return np.ascontiguousarray(basis, dtype=np.float32)


class PreparedChunks:
    """The fitting chunks prepared once (``prepare``: raw (n, R, D) -> (n, R, W) float32; the module's
    projection onto its PCA basis, normalised for cosine similarity).

    Held in memory when they fit in ``budget_mb`` (projected, they are D / W times smaller than
    the cache); otherwise each pass prepares each shard again as it streams by.
    """

    def __init__(self, source: ShardSource, prepare, width: int, budget_mb: float | None = None):
        self.source, self.project = source, prepare
        need = source.cache.count("train") * source.cache.n_regions * width * 4 / 2**20 * (1 + (source.views is not None))
        self.hold = need <= (default_budget_mb() if budget_mb is None else budget_mb)
        self._held: list[Chunk] | None = None
        log.info("prepared training split: %.1f MiB, %s", need, "held in memory" if self.hold else "prepared each pass")

    def chunks(self) -> Iterator[Chunk]:
        if self._held is not None:
            yield from self._held
            return
        held = []
        buf = None
        for chunk in self.source.chunks():
            out, view = [], []
            for a in range(0, len(chunk), 16):
                rows = np.arange(a, min(a + 16, len(chunk)))
                if buf is None:
                    buf = torch.empty(16 * chunk.regions.shape[1] * chunk.regions.shape[2])
                out.append(self.project(chunk.batch_into(rows, buf)).numpy())
                if chunk.view is not None:
                    view.append(self.project(torch.from_numpy(np.asarray(chunk.view_batch(rows), np.float32))).numpy())
            projected = Chunk(chunk.shard, np.concatenate(out), np.arange(len(chunk)), chunk.labels, chunk.image_ids,
                              np.concatenate(view) if view else None)
            del chunk
            if self.hold:
                held.append(projected)
            yield projected
        if self.hold:
            self._held = held
