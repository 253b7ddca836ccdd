"""Stage 1's typed config: :class:`ExtractConfig`, its per-dataset defaults, and what a run reports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpnet.device import resolve_device
from dpnet.options import check_fields, option

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


def _datasets() -> tuple[str, ...]:
    from .datasets import list_datasets

    return tuple(list_datasets())


@dataclass
class ExtractConfig:
    """Everything stage 1 needs; saved (resolved) in the cache's plan and manifest. Each field is an
    option (:func:`dpnet.options.option`): its help, range and make variable; the command line and
    :meth:`validate` are made from them."""

    dataset: str = option("synth", "the dataset: synth, cub, folder, imagenet, ...", make="DATASET",
                          check=lambda v: v in _datasets(), want="one of the known datasets (python -m dpnet.extract "
                                                                 "--help lists them)")
    data_dir: str | None = option(None, "the dataset's folder (None: data/raw/<dataset>)", make="DATA_DIR")
    backbone: str = option("efficientnet_lite0", "efficientnet_lite0 (embedded), efficientnet_lite2, resnet50, vgg19 "
                                                 "or any timm model name", make="BACKBONE")
    weights: str | None = option(None, "a state-dict file, or 'random' (tests only); None: the backbone's own",
                                 make="WEIGHTS")
    regions: int | None = option(None, "R, regions per image", make="REGIONS", check=lambda v: v >= 1, want=">= 1")
    image_size: int = option(544, "input side in pixels", make="IMAGE_SIZE", check=lambda v: v >= MIN_IMAGE_SIZE,
                             want=f">= {MIN_IMAGE_SIZE} pixels")
    store: str = option("zarr", f"shard format: {' or '.join(STORES)}", make="STORE", choices=STORES)
    seed: int = option(0, "seeds the regions and the image order", make="SEED", check=lambda v: 0 <= v < 2**32,
                       want="in [0, 2^32)")
    shard_mb: float = option(256.0, "target size of one shard, MiB", check=lambda v: v > 0, want="> 0")
    batch_size: int = option(0, "images per backbone batch; 0: 8 on CPU, 64 on CUDA", make="BATCH",
                             check=lambda v: v >= 0, want=">= 1, or 0 for the device's default")
    workers: int = option(-1, "decoding processes; -1: auto (see default_workers)", make="WORKERS",
                          check=lambda v: v >= -1, want=">= 0, or -1 for auto")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...", make="DEVICE")
    skip_bad: bool = option(False, "leave unreadable images out (listed in the manifest)", make="SKIP_BAD")
    test_fraction: float = option(0.5, "test share of folder datasets without train/ and test/", make="TEST_FRACTION",
                                  check=lambda v: 0.0 <= v <= 1.0, want="in [0, 1]")
    synth: dict[str, int] = option(help="the synthetic set's size", cli=False,
                                   factory=lambda: {"n_classes": 10, "per_class": 60, "image_size": 256})
    out_root: str = option("data/cache", "where caches go")
    name: str | None = option(None, "cache folder name (None: <dataset>-<backbone>[-hc]-r<R>[-d<k>]-s<size>"
                                    "[-crop][-flip])")
    progress: bool = option(True, "progress bars", cli=False)
    ranks: int = option(1, "extraction processes on this machine, each writing every ranks-th shard (under "
                           "torchrun, RANK / WORLD_SIZE are read instead)", make="RANKS", check=lambda v: v >= 1,
                        want=">= 1")
    rank: int = option(-1, "this process's rank; -1: from torchrun's RANK / WORLD_SIZE, else 0 of 1", cli=False)
    world_size: int = option(0, "the number of ranks (with rank)", cli=False)
    crop: bool | None = option(None, "cut each image to its object box first (the CUB protocol; needs boxes)",
                               make="CROP")
    runtime: str = option("auto", "CPU backbone: frozen (TorchScript with oneDNN fusion, 1.5x faster), eager, or auto "
                                  "(frozen for caches of 64+ images)", make="RUNTIME", choices=RUNTIMES)
    dense: tuple[int, ...] | None = option(None, "square window sizes (grid cells) laid densely, stride 1, before the "
                                                 "random boxes, e.g. 1,2 (they count in REGIONS; none: no dense "
                                                 "windows)", make="DENSE",
                                           check=lambda v: all(isinstance(k, int) and k >= 1 for k in v),
                                           want="window sizes >= 1 (grid cells), e.g. 2 or 1,2, or none")
    hypercolumn: bool = option(False, "append the backbone's stride-16 stage, pooled into the same regions "
                                      "(EfficientNets; issue 16's finer descriptors)", make="HYPERCOLUMN")
    flip: bool = option(False, "a view cache: every image mirrored left-right, region r the mirror of region r of "
                               "the same cache without it (train --views takes it)", make="FLIP")

    def __post_init__(self) -> None:
        """Options left None take the dataset's measured default (:data:`DATASET_DEFAULTS`), then the general one."""
        mine = DATASET_DEFAULTS.get(self.dataset, {})
        for name, general in GENERAL_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, mine.get(name, general))
        self.dense = tuple(self.dense)

    def cache_name(self) -> str:
        """``<dataset>-<backbone>[-hc]-r<R>[-d<k>]-s<size>[-crop][-flip]`` unless a name was given
        (``-hc`` hypercolumn, ``-d<k>`` dense windows of k cells, ``-crop`` object box, ``-flip`` mirrored view)."""
        crop = "-crop" if self.crop else ""
        dense = "-d" + "".join(str(k) for k in self.dense) if self.dense else ""
        hc = "-hc" if self.hypercolumn else ""
        flip = "-flip" if self.flip else ""
        return self.name or f"{self.dataset}-{self.backbone}{hc}-r{self.regions}{dense}-s{self.image_size}{crop}{flip}"

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def validate(self) -> "ExtractConfig":
        """Refuse values an option cannot take, naming each such option (make's name first) and its range.

        Raises:
            ConfigError: naming every option out of its range.
        """
        check_fields(self)
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
