"""Stage 1's typed config: :class:`ExtractConfig`, its per-dataset defaults, and what a run reports."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpnet.device import resolve_device
from dpnet.errors import check_options

from .cache import STORES


# Settings that may change between a run and its resume without changing the cache.
RUNTIME_ONLY = ("batch_size", "workers", "device", "skip_bad", "progress", "out_root", "name", "ranks", "rank",
                "world_size")


# Per-dataset defaults of the region options, chosen by measurement (see the README): CUB is cropped
# to the bird box (the protocol the field's part measures use) and gets a dense grid of 2x2-cell
# windows beside the random boxes; ImageNet takes 100 regions (its cache would be 1.6 TB at 500).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"cub": {"crop": True, "dense": (2,)}, "imagenet": {"regions": 100}}


GENERAL_DEFAULTS: dict[str, Any] = {"regions": 500, "crop": False, "dense": ()}


RUNTIMES = ("auto", "eager", "frozen")


MIN_IMAGE_SIZE = 32  # below this no backbone has a feature grid; the grid itself is checked once it is known


@dataclass
class ExtractConfig:
    """Everything stage 1 needs; saved (resolved) in the cache's plan and manifest."""

    dataset: str = "synth"
    data_dir: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    regions: int | None = None  # None: the dataset's default (DATASET_DEFAULTS), else 500
    image_size: int = 544
    store: str = "zarr"
    seed: int = 0
    shard_mb: float = 256.0
    batch_size: int = 0  # 0: 8 on CPU, 64 on CUDA
    workers: int = -1  # -1: auto, see default_workers
    device: str = "auto"
    skip_bad: bool = False
    test_fraction: float = 0.5
    synth: dict[str, int] = field(default_factory=lambda: {"n_classes": 10, "per_class": 60, "image_size": 256})
    out_root: str = "data/cache"
    name: str | None = None
    progress: bool = True
    ranks: int = 1  # processes to start on this machine, each taking every ranks-th shard
    rank: int = -1  # this process's rank; -1: from torchrun's RANK / WORLD_SIZE, else 0 of 1
    world_size: int = 0
    crop: bool | None = None  # cut each image to its object box first (CUB protocol; needs boxes); None: the dataset's
    runtime: str = "auto"  # the CPU backbone: "eager", "frozen" (TorchScript + oneDNN fusion), "auto"
    dense: tuple[int, ...] | None = None  # square windows laid densely (stride 1) before the random boxes; None: the dataset's
    hypercolumn: bool = False  # append the backbone's stride-16 stage to each region (EfficientNets; issue 16 lever 2)
    flip: bool = False  # a view cache: every image mirrored, region r the mirror of region r (issue 16 lever 3)

    def __post_init__(self) -> None:
        """Options left None take the dataset's measured default (:data:`DATASET_DEFAULTS`), then the general one."""
        mine = DATASET_DEFAULTS.get(self.dataset, {})
        for name, general in GENERAL_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, mine.get(name, general))
        self.dense = tuple(self.dense)

    def cache_name(self) -> str:
        """``<dataset>-<backbone>-r<R>-s<size>`` unless a name was given."""
        crop = "-crop" if self.crop else ""
        dense = "-d" + "".join(str(k) for k in self.dense) if self.dense else ""
        hc = "-hc" if self.hypercolumn else ""
        flip = "-flip" if self.flip else ""
        return self.name or f"{self.dataset}-{self.backbone}{hc}-r{self.regions}{dense}-s{self.image_size}{crop}{flip}"

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def validate(self) -> "ExtractConfig":
        """Refuse values an option cannot take, naming the option (make's name first) and its range.

        Raises:
            ConfigError: the first option out of its range.
        """
        from .datasets import list_datasets

        checks = [("DATASET (--dataset)", self.dataset, self.dataset in list_datasets(),
                   f"one of the known datasets: {', '.join(list_datasets())}"),
                  ("REGIONS (--regions)", self.regions, self.regions >= 1, ">= 1"),
                  ("IMAGE_SIZE (--image-size)", self.image_size, self.image_size >= MIN_IMAGE_SIZE,
                   f">= {MIN_IMAGE_SIZE} pixels"),
                  ("TEST_FRACTION (--test-fraction)", self.test_fraction, 0.0 <= self.test_fraction <= 1.0, "in [0, 1]"),
                  ("BATCH (--batch-size)", self.batch_size, self.batch_size >= 0, ">= 1, or 0 for the device's default"),
                  ("WORKERS (--workers)", self.workers, self.workers >= -1, ">= 0, or -1 for auto"),
                  ("SEED (--seed)", self.seed, 0 <= self.seed < 2**32, "in [0, 2^32)"),
                  ("RANKS (--ranks)", self.ranks, self.ranks >= 1, ">= 1"),
                  ("--shard-mb", self.shard_mb, self.shard_mb > 0, "> 0"),
                  ("DENSE (--dense)", self.dense, all(isinstance(k, int) and k >= 1 for k in self.dense),
                   "window sizes >= 1 (grid cells), e.g. 2 or 1,2, or none"),
                  ("STORE (--store)", self.store, self.store in STORES, f"one of {', '.join(STORES)}"),
                  ("RUNTIME (--runtime)", self.runtime, self.runtime in RUNTIMES, f"one of {', '.join(RUNTIMES)}")]
        check_options(checks)
        return self

    def resolved_rank(self) -> tuple[int, int]:
        """(rank, world size): given, else from torchrun's environment, else (0, 1)."""
        if self.rank >= 0:
            return self.rank, max(self.world_size, 1)
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class ExtractSummary:
    """What one call of :func:`run_extraction` did."""

    cache_dir: Path
    images: int
    shards_written: int
    shards_total: int
    bytes_on_disk: int
    seconds: float
    skipped: list[dict[str, str]]

    def line(self) -> str:
        return (f"{self.cache_dir}: {self.images} images, {self.shards_written}/{self.shards_total} shards "
                f"written this run, {self.bytes_on_disk / 2**20:.1f} MiB on disk, {self.seconds:.1f} s")
