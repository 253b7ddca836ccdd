"""The cache's format: folder layout, the arrays of a shard, and a cache's identity.

Layout of a cache folder::

    manifest.json      written last: the cache is complete when it exists
    plan.json          the resolved config and the shard plan, written first (for resume)
    images.tsv         position, image_id, label, is_train, path (relative to the dataset root)
    shards/00000.zarr  (or .h5) one shard per ``shard_size`` images, image-major chunks
    .lock              held (flock) by the extraction working in the folder

Arrays of a shard with n images: ``regions`` (n, R, D) float16, ``global`` (n, D) float16,
``boxes`` (n, R, 4) int16 grid cells ``(x0, y0, x1, y1)`` half-open, ``sizes`` (n, 2) int32
original ``(width, height)``, ``labels`` (n,) int32, ``image_ids`` (n,) int64, ``is_train``
(n,) bool. Training images come first in the cache order, so a shard's training rows are a
contiguous prefix: every read is a contiguous slice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "dpnet-cache/1"
FIELDS = ("regions", "global", "boxes", "sizes", "labels", "image_ids", "is_train")
STORES = ("zarr", "h5")
SPLITS = ("all", "train", "test")


def field_specs(n: int, n_regions: int, dim: int) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """name -> (shape, dtype, chunks) of a shard of n images; one image per ``regions`` chunk."""
    m = max(1, min(n, 256))
    return {
        "regions": ((n, n_regions, dim), "float16", (1, n_regions, dim)),
        "global": ((n, dim), "float16", (m, dim)),
        "boxes": ((n, n_regions, 4), "int16", (m, n_regions, 4)),
        "sizes": ((n, 2), "int32", (m, 2)),
        "labels": ((n,), "int32", (m,)),
        "image_ids": ((n,), "int64", (m,)),
        "is_train": ((n,), "bool", (m,)),
    }


def shard_path(cache_dir: Path, index: int, store: str) -> Path:
    """Where shard ``index`` lives."""
    return Path(cache_dir) / "shards" / f"{index:05d}.{store}"


def cache_identity(plan: dict[str, Any], images_tsv: str) -> str:
    """A short hash naming a cache's content: its resolved plan (dataset root, config, weights'
    hash, shapes, shard plan) and its image table. Two caches with equal shapes but other images,
    another dataset folder or other weights get different identities."""
    h = hashlib.sha256(json.dumps(plan, sort_keys=True).encode())
    h.update(images_tsv.encode())
    return h.hexdigest()[:16]


def extract_command(config: dict[str, Any]) -> str:
    """The ``make extract`` command line that (re)makes a cache with this resolved config."""
    parts = ["make extract", f"DATASET={config.get('dataset', '?')}"]
    if config.get("data_dir"):
        parts.append(f"DATA_DIR={config['data_dir']}")
    for key, var in (("backbone", "BACKBONE"), ("regions", "REGIONS"), ("image_size", "IMAGE_SIZE"),
                     ("store", "STORE"), ("seed", "SEED"), ("weights", "WEIGHTS")):
        if config.get(key) is not None:
            parts.append(f"{var}={config[key]}")
    if config.get("crop"):
        parts.append("CROP=1")
    return " ".join(parts)
