"""Extraction into both stores, resume after crashes, and the reader's checks."""

import json
from pathlib import Path

import numpy as np
import pytest

from dpnet.extract import cache as cache_mod
from dpnet.extract.cache import FIELDS, RegionCache, resolve_cache
from dpnet.errors import CacheIncompleteError, CacheMismatchError
from dpnet.extract.pipeline import run_extraction
from dpnet.extract.regions import sample_boxes
from tests.helpers import tiny_config


def load_all(path: Path) -> dict[str, np.ndarray]:
    c = RegionCache(path)
    return {f: np.concatenate([c.load_shard(i)[f] for i in range(c.n_shards)]) for f in FIELDS}


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = load_all(a), load_all(b)
    for f in FIELDS:
        assert np.array_equal(x[f], y[f]), f
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):  # the identity hashes the dataset folder too, which differs here by design
        m.pop("dataset_root"), m["config"].pop("data_dir"), m.pop("cache_id"), m.pop("extract_seconds")  # and time
    assert ma == mb


@pytest.mark.parametrize("store", ["zarr", "h5"])
def test_store_round_trip(tmp_path, store):
    cfg = tiny_config(tmp_path, store=store)
    summary = run_extraction(cfg)
    c = RegionCache(summary.cache_dir, expect={"R": 12, "D": 1280, "dataset": "synth"})
    assert c.n_shards == 4 and c.count() == 18 and c.count("train") == 9
    arrays = load_all(summary.cache_dir)
    assert arrays["regions"].shape == (18, 12, 1280) and arrays["regions"].dtype == np.float16
    assert arrays["global"].shape == (18, 1280) and arrays["boxes"].shape == (18, 12, 4)
    assert arrays["is_train"][:9].all() and not arrays["is_train"][9:].any()  # train first
    grid = tuple(c.manifest["grid"])
    for i, img in enumerate(arrays["image_ids"]):
        assert np.array_equal(arrays["boxes"][i], sample_boxes(0, int(img), 12, *grid))
    assert (summary.cache_dir / "shards" / f"00000.{store}").exists()
    assert (Path(cfg.out_root) / "LATEST").read_text().strip() == summary.cache_dir.name
    assert resolve_cache(None, cfg.out_root) == summary.cache_dir


def test_split_reads_are_contiguous_prefixes(tiny):
    c = RegionCache(run_extraction(tiny).cache_dir)
    train = np.concatenate([a["labels"] for _, a in c.iter_shards("train")])
    test = np.concatenate([a["labels"] for _, a in c.iter_shards("test", prefetch=False)])
    assert len(train) == 9 and len(test) == 9
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.sort(c.read("labels")))
    assert c.read("is_train", "train").all() and not c.read("is_train", "test").any()


def test_batch_size_and_workers_do_not_change_cache(tmp_path):
    a = run_extraction(tiny_config(tmp_path / "a", batch_size=1, workers=0)).cache_dir
    b = run_extraction(tiny_config(tmp_path / "b", batch_size=5, workers=2)).cache_dir
    ra, rb = load_all(a), load_all(b)
    assert np.array_equal(ra["boxes"], rb["boxes"]) and np.array_equal(ra["image_ids"], rb["image_ids"])
    np.testing.assert_allclose(ra["regions"].astype(np.float32), rb["regions"].astype(np.float32), atol=2e-3)


class Crash(RuntimeError):
    pass


def _crash_on(monkeypatch, method: str, after: int):
    calls = {"n": 0}
    orig = getattr(cache_mod.ShardWriter, method)

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise Crash(f"simulated kill in {method}")
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cache_mod.ShardWriter, method, wrapped)


@pytest.mark.parametrize("method,after", [("commit", 2), ("append", 3)])
def test_interrupted_extraction_resumes_to_identical_cache(tmp_path, monkeypatch, method, after):
    """A crash between shards (in commit) or inside one (in append) loses nothing committed."""
    ref = run_extraction(tiny_config(tmp_path / "ref")).cache_dir
    cfg = tiny_config(tmp_path / "run")
    with monkeypatch.context() as m:
        _crash_on(m, method, after)
        with pytest.raises(Crash):
            run_extraction(cfg)
    cache_dir = Path(cfg.out_root) / cfg.cache_name()
    assert not (cache_dir / "manifest.json").exists()
    with pytest.raises(CacheIncompleteError, match="resume"):
        RegionCache(cache_dir)
    done = sorted(p.name for p in (cache_dir / "shards").iterdir() if ".tmp" not in p.name)
    assert len(done) == (2 if method == "commit" else 1)
    summary = run_extraction(cfg)
    assert summary.shards_written == 4 - len(done)
    assert not [p for p in (cache_dir / "shards").iterdir() if ".tmp" in p.name]
    assert_same_cache(ref, cache_dir)
    # each shard's extraction time is kept in it, so a resumed cache still says what it cost
    assert RegionCache(cache_dir).manifest["extract_seconds"] > 0


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run_extraction(cfg)
    with pytest.raises(CacheMismatchError, match="seed"):
        run_extraction(tiny_config(tmp_path, seed=1, name=cfg.cache_name()))


def test_reader_names_mismatched_field(tiny):
    path = run_extraction(tiny).cache_dir
    with pytest.raises(CacheMismatchError, match=r"D: cache has 1280, expected 2048"):
        RegionCache(path, expect={"D": 2048, "R": 12})
    with pytest.raises(CacheMismatchError, match="dataset"):
        RegionCache(path, expect={"dataset": "cub"})


def test_missing_cache_errors(tmp_path):
    with pytest.raises(CacheIncompleteError, match="make extract"):
        RegionCache(tmp_path)
    with pytest.raises(CacheIncompleteError, match="LATEST"):
        resolve_cache(None, tmp_path)


def test_raw_chunk_reader_equals_zarr(tmp_path):
    """The direct read of uncompressed one-image chunks gives zarr's own answer; damage is an error."""
    import zarr

    from dpnet.extract.cache.chunks import read_raw_chunks

    c = RegionCache(run_extraction(tiny_config(tmp_path)).cache_dir)
    shard_dir = c.path / c.manifest["shards"][1]["file"]
    group = zarr.open_group(str(shard_dir), mode="r")
    assert read_raw_chunks(shard_dir, "regions", group["regions"], 0, 2) is not None  # fast path taken
    for split in ("all", "train", "test"):
        a, b = c.rows(1, split)
        for mmap in (False, True):
            got = np.asarray(c.load_shard(1, split, ("regions",), mmap=mmap)["regions"])
            np.testing.assert_array_equal(got, group["regions"][a:b])
    chunk = shard_dir / "regions" / "c" / "0" / "0" / "0"
    whole = chunk.read_bytes()
    chunk.write_bytes(whole[:100])
    with pytest.raises(CacheIncompleteError, match=r"100 bytes, expected .*make extract"):
        c.load_shard(1, "all", ("regions",))
    chunk.write_bytes(whole)
    (shard_dir / "regions" / "c" / "1" / "0" / "0").unlink()  # zarr would read a hole as zeros
    for mmap in (False, True):
        with pytest.raises(CacheIncompleteError, match=r"00001\.zarr.*missing"):
            c.load_shard(1, "all", ("regions",), mmap=mmap)


@pytest.mark.slow
def test_two_ranks_make_the_single_process_cache(tmp_path):
    """Two processes, each taking every other shard, give exactly the 1-process cache."""
    one = run_extraction(tiny_config(tmp_path / "one")).cache_dir
    summary = run_extraction(tiny_config(tmp_path / "two", ranks=2))
    assert summary.images == 18 and summary.shards_written == summary.shards_total == 4
    assert_same_cache(one, summary.cache_dir)


def test_torchrun_ranks_split_shards_and_last_one_gathers(tmp_path, monkeypatch):
    """Under torchrun (RANK / WORLD_SIZE set) a rank writes only its shards; the last rank writes the manifest."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    first = run_extraction(tiny_config(tmp_path))
    shards = sorted(p.name for p in (first.cache_dir / "shards").iterdir())
    assert shards == ["00001.zarr", "00003.zarr"] and not (first.cache_dir / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    last = run_extraction(tiny_config(tmp_path))
    assert (last.cache_dir / "manifest.json").is_file() and last.images == 18
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert_same_cache(run_extraction(tiny_config(tmp_path / "ref")).cache_dir, last.cache_dir)


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_cache_on_an_fsspec_location_reads_and_trains_like_the_local_one(tmp_path, scheme):
    from dpnet.extract.publish import publish
    from dpnet.train.estimator import DPNetClassifier

    local = run_extraction(tiny_config(tmp_path)).cache_dir
    url = (tmp_path / "remote" / "c1").as_uri() if scheme == "file" else f"memory://dpnet-test/{tmp_path.name}/c1"
    remote = RegionCache(publish(local, url), expect={"R": 12, "dataset": "synth"})
    here = RegionCache(local)
    assert remote.manifest == here.manifest and remote.image_table() == here.image_table()
    for i in range(here.n_shards):
        for split in ("all", "train", "test"):
            a, b = here.load_shard(i, split), remote.load_shard(i, split)
            assert all(np.array_equal(a[f], b[f]) for f in FIELDS)
    kw = dict(parts_per_class=2, epochs=2, inner_epochs=1, batch_size=4, val_fraction=0.0, lr=1e-2)
    x = np.concatenate([here.load_shard(i, "test")["regions"] for i in range(here.n_shards)])
    p_local = DPNetClassifier(**kw).fit(here).decision_function(x)
    p_remote = DPNetClassifier(**kw).fit(remote).decision_function(x)
    np.testing.assert_allclose(p_local, p_remote, rtol=1e-6, atol=1e-7)


def test_an_unfinished_remote_cache_is_refused(tmp_path):
    with pytest.raises(CacheIncompleteError, match="no manifest.json"):
        RegionCache((tmp_path / "nothing").as_uri())


def test_mapped_shard_equals_read_shard_and_holds_no_files(tmp_path):
    """load_shard(mmap=True): same rows, no open file descriptors, unmapped once dropped."""
    import gc
    import os

    c = RegionCache(run_extraction(tiny_config(tmp_path)).cache_dir)
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(c.n_shards):
        for split in ("all", "train", "test"):
            mapped = c.load_shard(i, split, ("regions", "labels"), mmap=True)["regions"]
            read = c.load_shard(i, split, ("regions",))["regions"]
            assert mapped.shape == read.shape and np.array_equal(np.asarray(mapped), read)
            assert all(np.array_equal(mapped[k], read[k]) for k in range(len(read)))
            mask = np.arange(len(read)) % 2 == 0
            assert np.array_equal(mapped[mask], read[mask]) and np.array_equal(mapped[::-1], read[::-1])
    assert len(os.listdir("/proc/self/fd")) == fds  # no descriptor kept per mapped chunk
    shard_dir = str(c.path / c.manifest["shards"][0]["file"])
    held = c.load_shard(0, "all", ("regions",), mmap=True)["regions"]
    assert shard_dir in open("/proc/self/maps").read()
    del held, mapped
    gc.collect()
    assert shard_dir not in open("/proc/self/maps").read()  # unmapped when the last view went
    chunk = c.path / c.manifest["shards"][0]["file"] / "regions" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CacheIncompleteError, match="10 bytes"):
        c.load_shard(0, "all", ("regions",), mmap=True)


def test_mapped_rows_index_like_numpy():
    from dpnet.extract.cache.chunks import MappedRows

    rows = [np.arange(12).reshape(3, 4) + 100 * i for i in range(5)]
    m, full = MappedRows(rows, (3, 4), np.dtype(np.int64)), np.stack(rows)
    a, b = np.array([0, 4, 2]), np.array([1, 0, 2])
    for idx in (a, slice(1, 3), full[:, 0, 0] > 150, (a, b), np.array([], int)):
        assert np.array_equal(m[idx], full[idx]), idx
    assert m.shape == full.shape and np.array_equal(np.asarray(m), full) and m[3] is rows[3]


def test_dense_windows_are_extracted_recorded_and_resumed(tmp_path, monkeypatch):
    from dpnet.extract.regions import image_boxes

    cfg = tiny_config(tmp_path, regions=20, dense=(1,))
    cache = RegionCache(run_extraction(cfg).cache_dir)
    grid = tuple(cache.manifest["grid"])
    assert cache.manifest["config"]["dense"] == [1] and cache.path.name.endswith("r20-d1-s64")
    a = cache.load_shard(0)
    for i, img in enumerate(a["image_ids"]):
        assert np.array_equal(a["boxes"][i], image_boxes(0, int(img), 20, *grid, (1,)))
    (cache.path / "manifest.json").unlink()
    run_extraction(tiny_config(tmp_path, regions=20, dense=(1,)))  # the plan (a JSON list) is the same
    with pytest.raises(CacheMismatchError, match="dense"):
        run_extraction(tiny_config(tmp_path, regions=20, dense=(2,), name=cache.path.name))


def test_a_cache_started_by_another_dpnet_version_resumes_and_the_version_is_dpnets(tmp_path, monkeypatch):
    """The version a plan records is the package's (one place); a code upgrade alone never blocks a resume."""
    import dpnet

    cfg = tiny_config(tmp_path / "run")
    with monkeypatch.context() as m:
        _crash_on(m, "commit", 2)
        with pytest.raises(Crash):
            run_extraction(cfg)
    cache_dir = Path(cfg.out_root) / cfg.cache_name()
    plan = json.loads((cache_dir / "plan.json").read_text())
    assert plan["code_version"] == dpnet.__version__
    plan["code_version"] = "0.0.1"  # as an older dpnet wrote it
    (cache_dir / "plan.json").write_text(json.dumps(plan))
    run_extraction(cfg)
    assert RegionCache(cache_dir).manifest["code_version"] == "0.0.1"  # the version that started the cache


def test_a_hypercolumn_cache_is_named_recorded_and_described_again_alike(tmp_path):
    """HYPERCOLUMN=1: D = 1280 + 112 in the cache, '-hc' in its name, and the analysis's extractor (built
    from the manifest) describes an image as the cache holds it."""
    from dpnet.extract.runtime import extractor_for

    cache = RegionCache(run_extraction(tiny_config(tmp_path, hypercolumn=True, image_size=96)).cache_dir)
    m = cache.manifest
    assert m["D"] == 1392 and m["config"]["hypercolumn"] is True and "-hc-" in cache.path.name
    assert "blocks.4" in m["layer"]
    fx = extractor_for(m, str(cache.path))
    assert fx.bb.dim == 1392
    a = cache.load_shard(0)
    assert a["regions"].shape[-1] == 1392
    plain = tiny_config(tmp_path, image_size=96)
    assert "-hc" not in plain.cache_name() and plain.hypercolumn is False


def test_a_flipped_view_cache_mirrors_each_image_and_each_box(tmp_path):
    """FLIP=1: same images, same order, each box the mirror of the plain cache's; each region is the
    mean of the flipped image's map over its mirrored box (what the plain region shows, mirrored)."""
    import torch

    from dpnet.extract.backbones import create_backbone
    from dpnet.extract.images import ImageFiles, collate
    from dpnet.extract.regions import region_means
    from dpnet.extract.runtime import mirror_boxes

    plain = RegionCache(run_extraction(tiny_config(tmp_path)).cache_dir)
    flip = RegionCache(run_extraction(tiny_config(tmp_path, flip=True)).cache_dir)
    assert flip.path.name == plain.path.name + "-flip" and flip.manifest["config"]["flip"] is True
    a, b = plain.load_shard(0), flip.load_shard(0)
    assert np.array_equal(a["image_ids"], b["image_ids"]) and np.array_equal(a["labels"], b["labels"])
    grid_w = plain.manifest["grid"][1]
    assert np.array_equal(b["boxes"], mirror_boxes(a["boxes"], grid_w))
    assert not np.allclose(a["regions"], b["regions"])
    m = plain.manifest
    files = ImageFiles([str(Path(m["dataset_root"]) / "images" / r["path"]) for r in plain.image_table()[:2]],
                       m["image_size"])
    pixels = collate([files[0], files[1]]).pixels.flip(-1)
    bb = create_backbone("efficientnet_lite0", "random")
    x = (pixels.float() / 255 - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = region_means(bb.body(x), torch.from_numpy(b["boxes"][:2].astype(np.int64)))
    np.testing.assert_allclose(b["regions"][:2].astype(np.float32), want.numpy(), rtol=2e-2, atol=2e-2)
