"""Stage 1: images -> frozen backbone -> R random-region means per image -> cache shards.

``run_extraction(ExtractConfig(...))`` plans the cache (image order, shards), skips the
shards already on disk, extracts the others, then writes the manifest. Killed at any point
and run again, it resumes at the first missing shard and ends with the same cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpnet.device import resolve_device
from dpnet.errors import BadImagesError, CacheMismatchError, ConfigError, DatasetLayoutError, DpnetError
from dpnet.errors import check_options
from dpnet.files import FolderLock, claim_folder, disk_full_as_error, keep_mark, read_json, remove, remove_stale_temps
from dpnet.files import write_json_atomic, write_text_atomic
from dpnet.memory import large_buffers_reused

from dpnet import __version__
from .backbones import Backbone, create_backbone, grid_size
from .cache import FORMAT, STORES, ShardWriter, cache_identity, open_shard_writer, shard_path, shard_problems
from .cache.location import Location
from .datasets import DatasetIndex, DatasetOptions, ImageRecord, load_dataset
from .images import DecodedBatch, ImageFiles, collate
from .regions import global_means, image_boxes, region_means

log = logging.getLogger(__name__)

# Settings that may change between a run and its resume without changing the cache.
RUNTIME_ONLY = ("batch_size", "workers", "device", "skip_bad", "progress", "out_root", "name", "ranks", "rank",
                "world_size")


# Per-dataset defaults of the region options, chosen by measurement (see the README): CUB is cropped
# to the bird box (the protocol the field's part measures use) and gets a dense grid of 2x2-cell
# windows beside the random boxes; ImageNet takes 100 regions (its cache would be 1.6 TB at 500).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"cub": {"crop": True, "dense": (2,)}, "imagenet": {"regions": 100}}
GENERAL_DEFAULTS: dict[str, Any] = {"regions": 500, "crop": False, "dense": ()}


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
        return self.name or f"{self.dataset}-{self.backbone}{hc}-r{self.regions}{dense}-s{self.image_size}{crop}"

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


def load_index(cfg: ExtractConfig) -> DatasetIndex:
    """The dataset named by ``cfg``, generated first when it is ``synth``."""
    opts = DatasetOptions(cfg.data_dir, cfg.test_fraction, cfg.synth.get("n_classes", 10),
                          cfg.synth.get("per_class", 60), cfg.synth.get("image_size", 256),
                          cfg.synth.get("seed", 0))
    return load_dataset(cfg.dataset, opts)


def cache_order(records: list[ImageRecord], seed: int) -> list[ImageRecord]:
    """Training images first, shuffled by ``seed`` (so each shard mixes classes), then test by id."""
    train = sorted((r for r in records if r.is_train), key=lambda r: r.image_id)
    test = sorted((r for r in records if not r.is_train), key=lambda r: r.image_id)
    perm = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(len(train))
    return [train[i] for i in perm] + test


def make_plan(cfg: ExtractConfig, index: DatasetIndex, bb: Backbone, grid: tuple[int, int]) -> dict[str, Any]:
    """The resolved, resumable description of a cache: config, shapes and shard ranges."""
    order = cache_order(index.records, cfg.seed)
    per_image = cfg.regions * bb.dim * 2
    shard_size = max(1, int(cfg.shard_mb * 2**20 // per_image))
    bounds = [[a, min(a + shard_size, len(order))] for a in range(0, len(order), shard_size)]
    config = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in RUNTIME_ONLY}))  # as plan.json holds it
    config["runtime"] = resolve_runtime(cfg.runtime, cfg.resolved_device(), len(order))
    return {
        "format": FORMAT, "code_version": __version__, "config": config,
        "dataset": index.name, "dataset_root": str(Path(index.root).resolve()), "image_dir": index.image_dir,
        "classes": index.classes,
        "backbone": bb.name, "weights": bb.weights, "weights_sha256": bb.weights_sha256, "layer": bb.layer,
        "mean": list(bb.mean), "std": list(bb.std), "image_size": bb.fit_size(cfg.image_size), "grid": list(grid),
        "R": cfg.regions, "D": bb.dim, "seed": cfg.seed, "store": cfg.store, "dtype": "float16",
        "shard_size": shard_size, "shard_bounds": bounds, "order": [r.image_id for r in order],
    }


def check_grid(cfg: ExtractConfig, grid: tuple[int, int]) -> None:
    """The feature grid must hold at least 2 x 2 cells (else every region is the whole image), and
    dense windows must fit in it."""
    if min(grid) < 2:
        raise ConfigError(f"IMAGE_SIZE={cfg.image_size} gives {cfg.backbone} a {grid[0]}x{grid[1]} feature grid, in "
                          f"which every region is the whole image: use a larger IMAGE_SIZE (544 is the default)")
    if cfg.dense and max(cfg.dense) > min(grid):
        raise ConfigError(f"DENSE={','.join(map(str, cfg.dense))}: windows of {max(cfg.dense)} cells do not fit the "
                          f"{grid[0]}x{grid[1]} feature grid: use sizes up to {min(grid)}")


def prepare_cache_dir(cache_dir: Path, plan: dict[str, Any], order: list[ImageRecord]) -> None:
    """Write plan.json and images.tsv, or check that an earlier run used the same plan."""
    plan_file = cache_dir / "plan.json"
    if plan_file.is_file():
        old = read_json(plan_file, f"delete {cache_dir} and extract again")
        # a resume runs the backbone as the cache was started (caches from before runtimes: eager)
        plan["config"]["runtime"] = old.setdefault("config", {}).setdefault("runtime", "eager")
        old.setdefault("image_dir", plan["image_dir"])  # caches made before it was recorded
        plan["code_version"] = old.get("code_version", plan["code_version"])  # an upgrade alone changes no descriptor
        defaults = json.loads(json.dumps(asdict(ExtractConfig())))
        new_cfg = plan.get("config", {})
        # options added after a cache was started read as their defaults (so old caches still resume)
        old["config"] = {**{k: v for k, v in new_cfg.items() if k not in old.get("config", {}) and v == defaults.get(k)},
                         **old.get("config", {})}
        diffs = [k for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: {str(old.get(k))[:80]} -> {str(plan.get(k))[:80]}" for k in diffs[:5])
            raise CacheMismatchError(
                f"{cache_dir} was started with other settings ({shown}). Delete {cache_dir} to start "
                f"over, or pass --name <another name> (python -m extract) to keep both.")
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "manifest.json").unlink(missing_ok=True)
    write_text_atomic(cache_dir / "images.tsv", image_table_text(order))
    write_json_atomic(plan_file, plan)


def image_table_text(order: list[ImageRecord]) -> str:
    """The text of ``images.tsv``: one row per image, in cache order."""
    rows = ["position\timage_id\tlabel\tis_train\tpath"]
    rows += [f"{i}\t{r.image_id}\t{r.label}\t{int(r.is_train)}\t{r.path}" for i, r in enumerate(order)]
    return "\n".join(rows) + "\n"


class FeatureExtractor:
    """Backbone + region pooling for decoded uint8 batches, on one device.

    ``runtime="frozen"`` (CPU) runs the backbone as a frozen TorchScript graph with oneDNN's
    operator fusion: EfficientNet-Lite0 at 544 px ran 1.5x faster than eager on the 2-core
    reference machine, its maps within 2e-5 of eager's (relative), far inside float16's
    precision. It is made on the first batch (a few seconds); a backbone that cannot be traced
    runs eager, with a warning.
    """

    def __init__(self, bb: Backbone, grid: tuple[int, int], n_regions: int, seed: int, device: torch.device,
                 runtime: str = "eager", dense: tuple[int, ...] = ()):
        self.bb, self.grid, self.n_regions, self.seed, self.device = bb, grid, n_regions, seed, device
        self.dense = tuple(dense)
        self.cuda = device.type == "cuda"
        # channels_last on both devices: measured 1.7x faster on CPU (oneDNN) for Lite0 at 544 px.
        self.body = bb.body.to(device).to(memory_format=torch.channels_last)
        self.runtime = "eager" if self.cuda else runtime
        self._frozen = None
        self._warm: set[tuple[int, ...]] = set()
        std = torch.tensor(bb.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # (x / 255 - mean) / std = x * scale - shift
        self.neg_shift = -torch.tensor(bb.mean, device=device).view(1, 3, 1, 1) / std

    def boxes(self, image_ids: list[int]) -> np.ndarray:
        """int16 (N, R, 4) boxes of these images."""
        h, w = self.grid
        return np.stack([image_boxes(self.seed, i, self.n_regions, h, w, self.dense) for i in image_ids])

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, S, S) and (N, R, 4) -> float16 regions (N, R, D) and global (N, D)."""
        regions, glob = self.pool(self.features(self.normalise(pixels)), boxes)
        return regions.half().cpu().numpy(), glob.half().cpu().numpy()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (N, 3, S, S) -> the backbone's map, float32 (N, D, H, W)."""
        if self.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.body(x).float()
        return self._cpu_body(x).float()

    @torch.no_grad()
    def pool(self, fmap: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (N, D, H, W) and grid boxes (N, R, 4) -> float32 region means (N, R, D) and global means (N, D)."""
        return region_means(fmap, torch.from_numpy(boxes).to(self.device)), global_means(fmap)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32 (x / 255 - mean) / std on the device, in two passes.

        Laid out channels_last for eager convolutions (1.7x faster on CPU for Lite0); the frozen
        graph takes planar input (oneDNN reorders it once itself: 1.1 ms per image less at 544 px).
        """
        layout = torch.contiguous_format if self.runtime == "frozen" else torch.channels_last
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=layout)
        return torch.addcmul(self.neg_shift, x.float(), self.scale)

    def _cpu_body(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime == "frozen" and self._frozen is None:
            self._frozen = frozen_body(self.body, x) or self.body
        body = self._frozen if self._frozen is not None else self.body
        if self._frozen is not None and tuple(x.shape) not in self._warm:
            # TorchScript's profiling executor runs the first calls of each input shape through other
            # (unfused) kernels, whose float rounding differs: a resumed cache would differ from an
            # unbroken one in the first and last batch of its first shard. Every real call is a warm one.
            for _ in range(FROZEN_WARMUP_CALLS):
                body(x)
            self._warm.add(tuple(x.shape))
        return body(x)


def extractor_for(manifest: dict[str, Any], where: str, device: torch.device | None = None,
                  runtime: str = "eager") -> FeatureExtractor:
    """The extraction stage of a cache, again: its backbone (with the same weights, or an error),
    input size, grid, R and seed, so images described now match the cached ones.

    Raises:
        CacheMismatchError: the backbone weights found here are not those the cache was made with.
    """
    weights = manifest["weights"] if manifest["weights"] == "random" or Path(str(manifest["weights"])).is_file() else None
    bb = create_backbone(manifest["backbone"], weights, manifest["image_size"],
                         bool(manifest.get("config", {}).get("hypercolumn", False)))
    if bb.weights_sha256 != manifest.get("weights_sha256"):
        raise CacheMismatchError(f"the {manifest['backbone']} weights found here ({bb.weights}) are not those the cache "
                                 f"{where} was extracted with ({manifest['weights']}): the same weights are needed")
    return FeatureExtractor(bb, tuple(manifest["grid"]), manifest["R"], manifest["seed"],
                            device or torch.device("cpu"), runtime, tuple(manifest.get("config", {}).get("dense", ())))


def frozen_body(body: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module | None:
    """``body`` traced on ``example``, frozen, with oneDNN fusion on; None (with a warning) when it cannot be."""
    import warnings

    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated for torch.compile, which ran Lite0 slower here (25-30 img/s
            # against 35 at 544 px, 2 cores): keep it while that holds
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
            return torch.jit.freeze(torch.jit.trace(body.eval(), example[:1], check_trace=False))
    except Exception as exc:  # noqa: BLE001 - any model TorchScript cannot trace runs eager instead
        log.warning("the backbone cannot be frozen for the CPU (%s: %s); it runs eager (slower)",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def resolve_runtime(runtime: str, device: torch.device, n_images: int) -> str:
    """"eager" or "frozen" for ``runtime`` = "auto" | "eager" | "frozen".

    auto: frozen on the CPU for caches of at least FROZEN_MIN_IMAGES images (its few seconds of
    set-up pay for themselves), eager otherwise and on CUDA (which runs bfloat16 autocast).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    return "frozen" if device.type == "cpu" and n_images >= FROZEN_MIN_IMAGES else "eager"


RUNTIMES = ("auto", "eager", "frozen")
FROZEN_WARMUP_CALLS = 2  # the profiling executor's runs of a new shape before its optimised graph
MIN_IMAGE_SIZE = 32  # below this no backbone has a feature grid; the grid itself is checked once it is known
FROZEN_MIN_IMAGES = 64


def default_workers(cuda: bool, cores: int) -> int:
    """Decoding processes when ``workers=-1``.

    On CUDA the CPU only decodes: up to 8 workers. On CPU the backbone already uses every
    core, and an extra decoding process oversubscribes them: on the 2-core reference machine
    decoding in the main process was 0.2-0.3 s faster per 64 images at 544 px than one worker.
    So CPU runs decode in-process unless there are cores to spare.
    """
    if cuda:
        return min(8, cores)
    return 0 if cores <= 4 else min(4, cores // 4)


def _batches(bounds: list[tuple[int, int]], todo: list[int], batch_size: int) -> list[list[int]]:
    """Batches of cache positions that never cross a shard boundary (so resumed batches match)."""
    out = []
    for s in todo:
        a, b = bounds[s]
        out += [list(range(i, min(i + batch_size, b))) for i in range(a, b, batch_size)]
    return out


def _loader(files: ImageFiles, batches: list[list[int]], workers: int, pin: bool):
    if workers == 0 and not pin:  # in-process decoding: a plain loop, without DataLoader's machinery
        return (collate([files[i] for i in batch]) for batch in batches)
    return torch.utils.data.DataLoader(files, batch_sampler=batches, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin,
                                       persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


def run_extraction(cfg: ExtractConfig) -> ExtractSummary:
    """Extract (or finish extracting) the cache described by ``cfg``; returns what was done.

    The cache folder is locked for the run (a second extraction of it is refused, naming this
    one's pid); temporary shards of dead runs are removed; shards left damaged are re-extracted.

    Raises:
        BadImagesError: some images could not be read and ``skip_bad`` is off. Shards without
            bad images are kept; run again (with ``skip_bad`` to drop the bad ones) to finish.
        InUseError: another live process extracts this cache.
        DiskFullError: the disk filled up; finished shards are kept.
    """
    cfg.validate()
    cfg.resolved_device()  # an unknown device, or CUDA where there is none: said before anything is written
    if cfg.ranks > 1 and cfg.rank < 0:
        return _run_ranks(cfg)
    cache_dir = claim_folder(Path(cfg.out_root) / cfg.cache_name(), "extraction", CACHE_FILES)
    rank, world = cfg.resolved_rank()
    with FolderLock(cache_dir, "extraction", ".lock" if world == 1 else f".lock-rank{rank}"), \
            disk_full_as_error(cache_dir):
        keep_mark(cache_dir, "extraction")
        return _extract_locked(cfg, cache_dir, rank, world)


# What a cache folder of an older version (before marks) holds: such a folder is still a cache.
CACHE_FILES = r"\.lock(-rank\d+)?|plan\.json|images\.tsv|manifest\.json|shards"


def _extract_locked(cfg: ExtractConfig, cache_dir: Path, rank: int, world: int) -> ExtractSummary:
    t0 = time.perf_counter()
    index = load_index(cfg)
    bb = create_backbone(cfg.backbone, cfg.weights, cfg.image_size, cfg.hypercolumn)
    grid = grid_size(bb, bb.fit_size(cfg.image_size))
    check_grid(cfg, grid)
    plan = make_plan(cfg, index, bb, grid)
    by_id = {r.image_id: r for r in index.records}
    order = [by_id[i] for i in plan["order"]]
    for folder in (cache_dir, cache_dir / "shards"):
        remove_stale_temps(folder)
    prepare_cache_dir(cache_dir, plan, order)
    bounds = [tuple(b) for b in plan["shard_bounds"]]
    todo = [s for s in range(len(bounds)) if s % world == rank and not _shard_whole(cache_dir, s, plan)]
    device = cfg.resolved_device()
    extractor = FeatureExtractor(bb, grid, cfg.regions, cfg.seed, device, plan["config"]["runtime"], cfg.dense)
    with large_buffers_reused():
        bad = _extract_shards(cfg, cache_dir, order, bounds, todo, extractor,
                              [index.image_file(r.path) for r in order], _crop_boxes(cfg, index, order))
    if bad and not cfg.skip_bad:
        raise BadImagesError(bad, f"Fix or remove these files and run again (finished shards are kept), or "
                                  f"pass SKIP_BAD=1 (--skip-bad) to leave them out; they are then listed in "
                                  f"{cache_dir / 'manifest.json'}.")
    if not all(shard_path(cache_dir, s, cfg.store).exists() for s in range(len(bounds))):
        # another rank still works: whichever rank finishes last gathers the manifest
        return ExtractSummary(cache_dir, 0, len(todo), len(bounds), 0, time.perf_counter() - t0, [])
    manifest = finish_manifest(cache_dir, plan)
    write_latest(Path(cfg.out_root), cache_dir.name)
    summary = _summary(cache_dir, manifest, len(todo), time.perf_counter() - t0)
    log.debug("extracted %s", summary.line())
    return summary


def write_latest(out_root: Path, name: str) -> None:
    """Point ``<out_root>/LATEST`` at the cache ``name``. A LATEST that dpnet did not write (not one line
    naming a cache folder beside it) is a user's file: left as it is, with a warning."""
    latest = out_root / "LATEST"
    if latest.is_symlink() or (latest.exists() and not _is_latest(latest)):
        log.warning("warning: %s is not a file dpnet wrote; it is left as it is (pass CACHE=%s to use this cache)",
                    latest, name)
        return
    write_text_atomic(latest, name + "\n")


def _is_latest(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) == 1 and "/" not in lines[0] and (path.parent / lines[0] / "plan.json").is_file()


def _shard_whole(cache_dir: Path, shard: int, plan: dict[str, Any]) -> bool:
    """Whether shard ``shard`` is on disk and whole; a damaged one is removed (to be extracted again)."""
    path = shard_path(cache_dir, shard, plan["store"])
    if not path.exists():
        return False
    a, b = plan["shard_bounds"][shard]
    n = _rows_written(path, plan["store"], b - a)
    damage, mismatch = shard_problems(Location(cache_dir), path.relative_to(cache_dir).as_posix(), plan["store"], n,
                                      plan["R"], plan["D"])
    if not damage and not mismatch:
        return True
    log.warning("%s is damaged (%s): extracting it again", path, "; ".join(damage + mismatch))
    remove(path)
    return False


def _rows_written(path: Path, store: str, planned: int) -> int:
    """Rows a finished shard holds: its plan's, less the images skipped as unreadable."""
    try:
        handle = Location(path.parent).open_store(path.name, store)
    except Exception:  # noqa: BLE001 - unreadable: shard_problems says why
        return planned
    try:
        return planned - len(json.loads(handle.attrs.get("skipped", "[]")))
    except (ValueError, TypeError):
        return planned
    finally:
        if store == "h5":
            handle.close()


def _summary(cache_dir: Path, manifest: dict[str, Any], written: int, seconds: float) -> ExtractSummary:
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return ExtractSummary(cache_dir, manifest["n_images"], written, len(manifest["shards"]), size, seconds,
                          manifest["skipped"])


def _rank_main(cfg: ExtractConfig, threads: int, parent: int) -> None:
    _die_with_parent(parent)
    # Each rank uses the parent's torch thread count: the CPU kernels' results can depend on
    # it (and a spawned child would otherwise read OMP_NUM_THREADS afresh), and the cache must
    # not depend on how many ranks made it.
    torch.set_num_threads(threads)
    run_extraction(cfg)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux), so a killed ``RANKS=N``
    run leaves no rank working on; exit at once if the parent is already gone."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("no prctl here: ranks outlive a killed parent")
    if os.getppid() != parent:
        os._exit(1)


def _run_ranks(cfg: ExtractConfig) -> ExtractSummary:
    """Start ``cfg.ranks`` processes on this machine (the same split torchrun would give), then
    gather the manifest. Each rank writes only its own shards, so the cache equals a 1-process run."""
    import multiprocessing as mp
    from dataclasses import replace

    t0 = time.perf_counter()
    load_index(cfg)  # generate the synthetic set once, before the ranks read it
    ctx = mp.get_context("spawn")
    cache_dir = claim_folder(Path(cfg.out_root) / cfg.cache_name(), "extraction", CACHE_FILES)
    with FolderLock(cache_dir, "extraction"):
        keep_mark(cache_dir, "extraction")
        for folder in (cache_dir, cache_dir / "shards"):
            remove_stale_temps(folder)
        procs = [ctx.Process(target=_rank_main, args=(replace(cfg, rank=r, world_size=cfg.ranks,
                                                              progress=cfg.progress and r == 0),
                                                      torch.get_num_threads(), os.getpid()))
                 for r in range(cfg.ranks)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    failed = [r for r, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise DpnetError(f"extraction ranks {failed} failed (see their errors above); finished shards are kept: "
                         f"run the same command again to resume")
    # the last rank to finish wrote the manifest (and LATEST); only the summary is left to make
    wall0 = time.time() - (time.perf_counter() - t0)
    manifest = read_json(cache_dir / "manifest.json", "run the same `make extract` again")
    written = sum(1 for f in (cache_dir / "shards").iterdir() if f.stat().st_mtime >= wall0)
    return _summary(cache_dir, manifest, written, time.perf_counter() - t0)


def _crop_boxes(cfg: ExtractConfig, index: DatasetIndex, order: list[ImageRecord]) -> list | None:
    """Per cache position, the object box to crop to (CROP=1), or None when not cropping."""
    if not cfg.crop:
        return None
    missing = [r.path for r in order if r.image_id not in index.bboxes]
    if missing:
        raise DatasetLayoutError(f"CROP=1 needs an object box for every image; {len(missing)} have none in "
                                 f"{index.root} (first: {missing[0]}). Add bounding_boxes.txt or drop CROP=1.")
    return [index.bboxes[r.image_id] for r in order]


def _extract_shards(cfg: ExtractConfig, cache_dir: Path, order: list[ImageRecord], bounds: list[tuple[int, int]],
                    todo: list[int], extractor: FeatureExtractor, paths: list[Path],
                    crops: list | None) -> list[tuple[str, str]]:
    """Run the loader over the shards in ``todo``; returns the bad files met."""
    cuda = extractor.cuda
    batch = cfg.batch_size or (64 if cuda else 8)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(cuda, os.cpu_count() or 1)
    batches = _batches(bounds, todo, batch)
    shard_of = {p: s for s in todo for p in range(*bounds[s])}
    bad: list[tuple[str, str]] = []
    writer: ShardWriter | None = None
    shard_bad: list[dict[str, str]] = []
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", disable=not cfg.progress, desc="extract")
    try:
        files = ImageFiles(paths, extractor.bb.fit_size(cfg.image_size), crops)
        for positions, decoded in zip(batches, _loader(files, batches, workers, cuda)):
            s = shard_of[positions[0]]
            if writer is None:
                a, b = bounds[s]
                writer = open_shard_writer(cache_dir, s, cfg.store, b - a, cfg.regions, extractor.bb.dim)
                shard_bad, shard_start = [], time.perf_counter()
            for pos, why in decoded.errors:
                bad.append((str(paths[pos]), why))
                shard_bad.append({"path": order[pos].path, "reason": why})
            _write_batch(writer, decoded, order, extractor)
            bar.update(len(positions))
            bar.set_postfix(shard=f"{s + 1}/{len(bounds)}")
            if positions[-1] == bounds[s][1] - 1:
                if shard_bad and not cfg.skip_bad:
                    writer.abort()  # not committed: the bad files must be fixed or skipped first
                else:
                    writer.commit({"shard": s, "skipped": json.dumps(shard_bad),
                                   "seconds": round(time.perf_counter() - shard_start, 3)})
                writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    return bad


def _write_batch(writer: ShardWriter, decoded: DecodedBatch, order: list[ImageRecord],
                 extractor: FeatureExtractor) -> None:
    if not decoded.positions:
        return
    recs = [order[p] for p in decoded.positions]
    boxes = extractor.boxes([r.image_id for r in recs])
    regions, glob = extractor(decoded.pixels, boxes)
    writer.append({"regions": regions, "global": glob, "boxes": boxes, "sizes": decoded.sizes_wh,
                   "labels": np.array([r.label for r in recs], np.int32),
                   "image_ids": np.array([r.image_id for r in recs], np.int64),
                   "is_train": np.array([r.is_train for r in recs], bool)})


def finish_manifest(cache_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Gather the shards' row counts into manifest.json (written atomically, last), with the
    cache's identity (a hash of plan.json and images.tsv as written)."""
    loc = Location(cache_dir)
    shards, skipped, seconds = [], [], []
    for s in range(len(plan["shard_bounds"])):
        path = shard_path(cache_dir, s, plan["store"])
        handle = loc.open_store(path.relative_to(cache_dir).as_posix(), plan["store"])
        try:
            is_train = np.asarray(handle["is_train"][:])
            skipped += json.loads(handle.attrs.get("skipped", "[]"))
            seconds.append(handle.attrs.get("seconds"))
        finally:
            if plan["store"] == "h5":
                handle.close()
        shards.append({"file": path.relative_to(cache_dir).as_posix(), "n": int(len(is_train)),
                       "n_train": int(is_train.sum())})
    manifest = {k: v for k, v in plan.items() if k not in ("order", "shard_bounds")}
    manifest.update(shards=shards, skipped=skipped, n_images=sum(s["n"] for s in shards),
                    n_train=sum(s["n_train"] for s in shards), n_classes=len(plan["classes"]))
    manifest["n_test"] = manifest["n_images"] - manifest["n_train"]
    # the extraction's work, summed over shards (a resumed run counts each shard once); None when
    # a shard was written by a version that did not time it
    manifest["extract_seconds"] = None if None in seconds else round(float(sum(seconds)), 1)
    written_plan = read_json(cache_dir / "plan.json", f"delete {cache_dir} and extract again")
    tsv = cache_dir / "images.tsv"
    manifest["cache_id"] = cache_identity(written_plan, tsv.read_text(encoding="utf-8") if tsv.is_file() else "")
    write_json_atomic(cache_dir / "manifest.json", manifest)
    return manifest
