"""Stage 1: images -> frozen backbone -> R random-region means per image -> cache shards.

``run_extraction(ExtractConfig(...))`` plans the cache (image order, shards), skips the
shards already on disk, extracts the others, then writes the manifest. Killed at any point
and run again, it resumes at the first missing shard and ends with the same cache. How the
backbone runs (TorchScript, decoding workers, rank processes) is :mod:`dpnet.extract.runtime`'s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpnet.errors import BadImagesError, CacheMismatchError, ConfigError, DatasetLayoutError, DpnetError
from dpnet.files import FolderLock, claim_folder, disk_full_as_error, keep_mark, read_json, remove, remove_stale_temps
from dpnet.files import write_json_atomic, write_text_atomic
from dpnet.memory import large_buffers_reused

from dpnet import __version__
from .backbones import Backbone, create_backbone, grid_size
from .cache import FORMAT, ShardWriter, cache_identity, open_shard_writer, shard_path, shard_problems
from .cache.location import Location
from .config import RUNTIME_ONLY, ExtractConfig, ExtractSummary
from .datasets import DatasetIndex, DatasetOptions, ImageRecord, load_dataset
from .images import DecodedBatch, ImageFiles
from .runtime import FeatureExtractor, _loader, _rank_main, default_workers, resolve_runtime

log = logging.getLogger(__name__)


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
                f"over, or pass --name <another name> (python -m dpnet.extract) to keep both.")
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


def _batches(bounds: list[tuple[int, int]], todo: list[int], batch_size: int) -> list[list[int]]:
    """Batches of cache positions that never cross a shard boundary (so resumed batches match)."""
    out = []
    for s in todo:
        a, b = bounds[s]
        out += [list(range(i, min(i + batch_size, b))) for i in range(a, b, batch_size)]
    return out


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
    extractor = FeatureExtractor(bb, grid, cfg.regions, cfg.seed, device, plan["config"]["runtime"], cfg.dense,
                                 cfg.flip, batch=cfg.batch_size or (64 if device.type == "cuda" else 8))
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
    batch = extractor.batch
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
