"""The read side of a cache: :class:`RegionCache`, checked against its shards when it is opened."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dpnet.errors import CacheIncompleteError, CacheMismatchError, DatasetLayoutError, DpnetError

from .chunks import damaged, map_raw_chunks, missing_chunks, read_raw_chunks
from .layout import FIELDS, FORMAT, SPLITS, cache_identity, extract_command, field_specs
from .location import Location, is_url

log = logging.getLogger(__name__)

SMALL_FIELDS = tuple(f for f in FIELDS if f != "regions")


def shard_problems(loc: Location, rel: str, store: str, n: int, n_regions: int, dim: int,
                   fields: tuple[str, ...] = FIELDS) -> tuple[list[str], list[str]]:
    """What is wrong with the shard at ``rel`` against the shapes it should have.

    Returns (damage, mismatch): files missing or unreadable, and arrays whose shape differs
    from ``(n, R, D)``. Chunk files are listed for ``fields`` (zarr stores).
    """
    if not loc.exists(rel):
        return ["the shard folder is missing"], []
    try:
        handle = loc.open_store(rel, store)
    except Exception as exc:  # noqa: BLE001 - any failure to open is damage, reported with its cause
        return [f"it cannot be opened: {type(exc).__name__}: {exc}"], []
    damage, mismatch = [], []
    try:
        for name, (shape, _, _) in field_specs(n, n_regions, dim).items():
            try:
                array = handle[name]
                got = tuple(array.shape)
            except Exception as exc:  # noqa: BLE001
                damage.append(f"array {name!r} cannot be read ({type(exc).__name__}: {exc})")
                continue
            if got != shape:
                mismatch.append(f"{name} has shape {got}, expected {shape}")
            elif store == "zarr" and name in fields:
                gone = missing_chunks(array, loc.files_under(f"{rel}/{name}"))
                if gone:
                    damage.append(f"{name}: {len(gone)} chunk file(s) missing, first {name}/{gone[0]}")
    finally:
        if store == "h5":
            handle.close()
    return damage, mismatch


class RegionCache:
    """Read-only view of a finished cache, checked when it is opened.

    Opening reads ``manifest.json`` and checks every shard against it: present, readable, arrays
    of the shapes the manifest says (n, R, D), and (local zarr) every chunk file of the small
    arrays present; ``regions`` chunks are checked as they are read. Anything wrong raises an
    error naming the file and the fix. Remote caches check each shard when it is first read.

    Args:
        path: the cache folder (the one holding ``manifest.json``), or an fsspec URL.
        expect: optional fields the caller relies on (for example ``{"D": 1280, "R": 500,
            "dataset": "cub"}``, or ``cache_id``); any that differ from the manifest raise
            :class:`CacheMismatchError` naming the field.
    """

    def __init__(self, path: str | os.PathLike, expect: dict[str, Any] | None = None):
        self.loc = Location(path)
        self.path = self.loc.path
        self.fs = self.loc.fs
        self.manifest: dict[str, Any] = self._read_manifest()
        self.manifest.setdefault("cache_id", self._identity())
        self._checked: set[int] = set()
        if self.loc.local:
            for shard in range(self.n_shards):
                self.check_shard(shard)
        if expect:
            check_compatible(self.manifest, expect, f"{self._join('manifest.json')}")

    # -- opening
    def _read_manifest(self) -> dict[str, Any]:
        where = self._join("manifest.json")
        if not self.loc.exists("manifest.json"):
            hint = ("extraction did not finish: run the same `make extract` again to resume it"
                    if self.loc.exists("plan.json") else "run `make extract` first")
            raise CacheIncompleteError(f"no finished cache at {self.path} (no manifest.json): {hint}")
        try:
            manifest = json.loads(self.loc.read_text("manifest.json"))
            shards = [(s["file"], int(s["n"]), int(s["n_train"])) for s in manifest["shards"]]
            int(manifest["R"]), int(manifest["D"]), manifest["store"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CacheIncompleteError(
                f"{where} is damaged ({type(exc).__name__}: {exc}). Run the same `make extract` again: it keeps "
                f"the shards and rebuilds the manifest from them.") from exc
        if manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if any(n_train > n or n_train < 0 for _, n, n_train in shards):
            raise CacheIncompleteError(f"{where} is damaged (a shard with more training rows than rows). Run the "
                                       f"same `make extract` again: it rebuilds the manifest from the shards.")
        return manifest

    def _identity(self) -> str:
        """The identity of a cache made before identities were recorded: from its plan and image table."""
        try:
            return cache_identity(json.loads(self.loc.read_text("plan.json")), self.loc.read_text("images.tsv"))
        except (OSError, ValueError):
            return cache_identity(self.manifest, "")

    def check_shard(self, shard: int) -> None:
        """Raise a clear error unless ``shard`` is whole and has the shapes the manifest says."""
        if shard in self._checked:
            return
        info = self.manifest["shards"][shard]
        rel, n = info["file"], int(info["n"])
        damage, mismatch = shard_problems(self.loc, rel, self.manifest["store"], n, self.n_regions, self.dim,
                                          SMALL_FIELDS)
        where = self._join(rel)
        if damage:
            raise damaged(where, "; ".join(damage))
        if mismatch:
            raise CacheMismatchError(
                f"{where}: {'; '.join(mismatch)}: manifest.json (n={n}, R={self.n_regions}, D={self.dim}) does not "
                f"describe its shards. Run the same `make extract` again to rebuild the manifest from the shards "
                f"({extract_command(self.manifest.get('config', {}))}).")
        self._checked.add(shard)

    # -- location
    def _join(self, rel: str):
        return self.loc.join(rel)

    def shard_location(self, shard: int) -> str:
        """Path or URL of one shard (for zarr / dask readers)."""
        return str(self._join(self.manifest["shards"][shard]["file"]))

    # -- shapes
    @property
    def cache_id(self) -> str:
        return str(self.manifest["cache_id"])

    @property
    def n_regions(self) -> int:
        return int(self.manifest["R"])

    @property
    def dim(self) -> int:
        return int(self.manifest["D"])

    @property
    def n_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def rows(self, shard: int, split: str = "all") -> tuple[int, int]:
        """Row range ``[start, stop)`` of ``split`` inside ``shard``."""
        info = self.manifest["shards"][shard]
        n, n_train = int(info["n"]), int(info["n_train"])
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return {"all": (0, n), "train": (0, n_train), "test": (n_train, n)}[split]

    def count(self, split: str = "all") -> int:
        """Number of images of ``split`` in the whole cache."""
        return sum(b - a for a, b in (self.rows(i, split) for i in range(self.n_shards)))

    # -- reads
    def load_shard(self, shard: int, split: str = "all", fields: tuple[str, ...] = FIELDS,
                   mmap: bool = False) -> dict[str, np.ndarray]:
        """Read the rows of ``split`` of one shard into memory (one contiguous slice per field).

        ``regions`` of an uncompressed local zarr shard is read straight from its chunk files
        into the result (one ``readinto`` per image: less CPU taken from a trainer running
        beside it); anything else goes through zarr or h5py, after checking that every chunk
        the array promises exists. With ``mmap``, that ``regions`` comes back as
        :class:`~dpnet.extract.cache.chunks.MappedRows` instead: no copy at all (the trainer's
        streaming path).
        """
        self.check_shard(shard)
        start, stop = self.rows(shard, split)
        rel = self.manifest["shards"][shard]["file"]
        path = self._join(rel)
        store = self.manifest["store"]
        handle = self.loc.open_store(rel, store)
        local_zarr = store == "zarr" and self.loc.local
        try:
            out = {}
            for name in fields:
                fast = None
                if local_zarr and mmap and name == "regions":
                    fast = map_raw_chunks(path, name, handle[name], start, stop)
                if local_zarr and fast is None and name == "regions":
                    fast = read_raw_chunks(path, name, handle[name], start, stop)
                if fast is None:
                    fast = self._read_array(rel, name, handle[name], start, stop)
                out[name] = fast
            return out
        finally:
            if store == "h5":
                handle.close()

    def _read_array(self, rel: str, name: str, array: Any, start: int, stop: int) -> np.ndarray:
        if self.manifest["store"] == "zarr" and (name == "regions" or not self.loc.local):
            gone = missing_chunks(array, self.loc.files_under(f"{rel}/{name}"))
            if gone:
                raise damaged(self._join(rel), f"{name}: {len(gone)} chunk file(s) missing, first {name}/{gone[0]}")
        return np.asarray(array[start:stop])

    def iter_shards(self, split: str = "all", fields: tuple[str, ...] = FIELDS, prefetch: bool = True,
                    order: list[int] | None = None, mmap: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(shard index, arrays)`` in ``order`` (default: stored order), skipping empty ones.

        With ``prefetch`` the next shard is read in a background thread while the caller
        works on the current one, so at most two shards are in memory at once.
        """
        order = [i for i in (order if order is not None else range(self.n_shards))
                 if self.rows(i, split)[1] > self.rows(i, split)[0]]
        if not prefetch:
            for i in order:
                yield i, self.load_shard(i, split, fields, mmap)
            return
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.load_shard, order[0], split, fields, mmap) if order else None
            for k, i in enumerate(order):
                arrays = pending.result()
                pending = pool.submit(self.load_shard, order[k + 1], split, fields, mmap) if k + 1 < len(order) else None
                yield i, arrays
                if not mmap:
                    del arrays
                    continue
                # Unmap the shard in the reader thread: its last reference runs 64-500 munmaps
                # (2-3 ms a shard) that the trainer need not wait for. Only the box holds the
                # arrays when it is cleared there (a caller that kept a reference frees them
                # itself later, as before).
                box = [arrays]
                del arrays
                pool.submit(box.clear)

    def read(self, field: str, split: str = "all") -> np.ndarray:
        """One small field (labels, image_ids, global, sizes, ...) of ``split``, all shards joined."""
        parts = [self.load_shard(i, split, (field,))[field] for i in range(self.n_shards)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def image_file(self, rel: str) -> Path:
        """The file of an image of the table (``rel`` its path there) in the dataset the cache was made from."""
        return image_file(self.manifest, rel)

    def dataset_index(self):
        """The dataset this cache was extracted from (:class:`dpnet.extract.datasets.DatasetIndex`: its
        keypoints, boxes and image files), or None (with a warning) when it cannot be read here."""
        from ..config import ExtractConfig
        from ..pipeline import load_index

        cfg = dict(self.manifest["config"])
        cfg["data_dir"] = self.manifest.get("dataset_root", cfg.get("data_dir"))
        try:
            return load_index(ExtractConfig(**{k: v for k, v in cfg.items() if k in ExtractConfig.__dataclass_fields__}))
        except Exception as exc:  # noqa: BLE001 - the report still builds without images' annotations
            log.warning("could not read the dataset of %s (%s); localisation is skipped", self.path, exc)
            return None

    def image_table(self) -> list[dict[str, Any]]:
        """Rows of ``images.tsv``: position, image_id, label, is_train, path (checked to stay in the dataset)."""
        from dpnet.extract.datasets import checked_relative

        where = self._join("images.tsv")
        lines = self.loc.read_text("images.tsv").splitlines()
        header = lines[0].split("\t")
        out = []
        for lineno, line in enumerate(lines[1:], 2):
            row = dict(zip(header, line.split("\t")))
            try:
                out.append({"position": int(row["position"]), "image_id": int(row["image_id"]),
                            "label": int(row["label"]), "is_train": row["is_train"] == "1",
                            "path": checked_relative(row["path"], f"{where}:{lineno}")})
            except (KeyError, ValueError) as exc:
                if isinstance(exc, DatasetLayoutError):
                    raise
                raise damaged(where, f"line {lineno}: {line!r}") from exc
        return out


def image_file(manifest: dict[str, Any], rel: str) -> Path:
    """An image's file from a cache manifest: the dataset root, the layout's image folder, the path.

    Caches made before the image folder was recorded take it from the dataset: the CUB layout
    (``cub``, ``synth``) keeps images under ``images/``; every other reader lists paths from the root.
    """
    image_dir = manifest.get("image_dir")
    if image_dir is None:
        image_dir = "images" if manifest.get("dataset") in ("cub", "synth") else ""
    return Path(manifest["dataset_root"]) / image_dir / rel  # an empty image_dir adds nothing


def check_compatible(manifest: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    """Raise :class:`CacheMismatchError` naming every field of ``expect`` that differs from ``manifest``.

    ``cache_id`` is compared only when both sides have one (files made before identities were
    recorded have none).
    """
    expect = dict(expect)
    want_id = expect.pop("cache_id", None)
    diffs = [f"{k}: cache has {manifest.get(k)!r}, expected {v!r}" for k, v in expect.items() if manifest.get(k) != v]
    if diffs:
        raise CacheMismatchError(f"{where} does not match: " + "; ".join(diffs) +
                                 ". Use a cache extracted with those settings (or train a model on this one).")
    if want_id is not None and manifest.get("cache_id") not in (None, want_id):
        raise CacheMismatchError(
            f"{where}: made from another cache (id {want_id}) than this one (id {manifest['cache_id']}), though "
            f"the shapes agree: the descriptors differ. Use the cache it was made from, or train anew on this one.")


def cache_name(ref: Path | str) -> str:
    """The folder name of a cache path or URL (runs are named after it)."""
    return str(ref).rstrip("/").rsplit("/", 1)[-1] if is_url(ref) else Path(ref).name


def resolve_cache(ref: str | os.PathLike | None, cache_root: str | os.PathLike = "data/cache") -> Path | str:
    """A cache folder from a path, a name under ``cache_root``, an fsspec URL, or ``None`` for ``LATEST``."""
    if is_url(ref):
        return ref
    root = Path(cache_root)
    if ref is None or str(ref) == "":
        latest = root / "LATEST"
        if not latest.is_file():
            raise CacheIncompleteError(f"no {latest}: run `make extract` first (or pass CACHE=...)")
        return root / latest.read_text().strip()
    path = Path(ref)
    return path if path.is_dir() or path.is_absolute() or len(path.parts) > 1 else root / path


def find_cache(cache: str | os.PathLike | None, dataset: str | None, cache_root: str | os.PathLike = "data/cache",
               want: dict[str, Any] | None = None) -> Path | str:
    """The cache named by ``cache``, else the newest finished cache of ``dataset`` under ``cache_root``
    whose manifest has the values ``want`` asks for (e.g. ``{"backbone": ..., "R": 500}``), else LATEST.

    Raises:
        DpnetError: ``want`` without a dataset to pick in, or no such cache (naming the make command).
    """
    want = want or {}
    if cache or not dataset:
        if want and not cache:
            raise DpnetError("--backbone / --regions / --image-size pick among a dataset's caches: give DATASET= too "
                             "(or CACHE=<name>)")
        return resolve_cache(cache, cache_root)
    found = [p for p in sorted(Path(cache_root).glob(f"{dataset}-*/manifest.json"), key=lambda p: p.stat().st_mtime)
             if _has(p, want)]
    if not found:
        asked = "".join(f", {k}={v}" for k, v in want.items())
        raise DpnetError(f"no finished cache for dataset {dataset!r}{asked} in {cache_root}: "
                         f"run `make extract DATASET={dataset}` (with the same options) first")
    return found[-1].parent


def _has(manifest: Path, want: dict) -> bool:
    if not want:
        return True
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(m.get(k) == v for k, v in want.items())
