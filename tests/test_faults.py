"""Faults, bad input and hostile files (issue 10): each test is a behaviour a user met and the fix.

Grouped by what they test; each section names the audit item it came from (issue 10's numbers). Kills use SIGKILL on real child processes; "dead" temp
files carry the pid of a process that has exited.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpnet.errors import CacheIncompleteError, CacheMismatchError, DatasetLayoutError, DpnetError
from dpnet.extract.cache import RegionCache
from dpnet.extract.pipeline import run_extraction
from tests.helpers import ROOT, alive, children_of, python, spawn, tiny_config, train_config, wait_for
from dpnet.train.estimator import DPNetClassifier


def train_args(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--cache", str(cache), "--run-dir", str(run_dir), "--q", "2", "--epochs", "1", "--inner-epochs", "1",
            "--lr", "1e-2", "--batch-size", "4", "--val-fraction", "0", "--no-baselines", "--no-progress", *extra]


def train_main(argv: list[str]) -> int:
    from dpnet.train.cli import main

    return main(argv)


def analyze_main(argv: list[str]) -> int:
    from dpnet.analyze.cli import main

    return main(argv)


def extract_main(argv: list[str]) -> int:
    from dpnet.extract.cli import main

    return main(argv)


def dataset_image(cache: Path, split: str = "test") -> Path:
    """The file of the first image of ``split`` in the cache."""
    c = RegionCache(cache)
    row = next(r for r in c.image_table() if r["is_train"] == (split == "train"))
    return Path(c.manifest["dataset_root"]) / "images" / row["path"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if re.search(r"\.tmp-\d+|\.tmp$|\.unpack-\d+", p.name)]


# ==================================================================================================
# FILES THAT MUST NEVER RUN: pickles and compiled kernels
# ==================================================================================================

# --------------------------------------------------------------------------------- pickles (item 1)
class Plant:
    """Unpickling this creates ``marker``: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("target", ["model", "checkpoint"])
def test_a_pickle_planted_in_a_run_is_never_run(copy, capsys, target):
    marker = copy.tmp / "pwned"
    torch.save({"kind": "dpnet-model", "params": Plant(marker), "format": "x"}, copy.run / f"{target}.pt")
    commands = [lambda: train_main(train_args(copy.cache, copy.run, "--epochs", "4"))]
    if target == "model":
        commands = [lambda: analyze_main(["report", "--run", str(copy.run), "--no-progress"]),
                    lambda: analyze_main(["explain", str(dataset_image(copy.cache)), "--run", str(copy.run)])]
    codes = []
    for command in commands:
        try:
            codes.append(command())
        except Exception as exc:  # noqa: BLE001 - what matters first is whether the pickle ran
            codes.append(exc)
        assert not marker.exists(), "the planted pickle ran"
    err = capsys.readouterr().err
    assert codes == [2] * len(codes) and f"{target}.pt" in err


# ---------------------------------------------------------------------------------- kernel (item 2)
def _build_name(tmp: Path, monkeypatch) -> str:
    """The file name the real kernel build gets (built once in a scratch folder)."""
    from dpnet.train import native

    monkeypatch.setenv("DPNET_BUILD_DIR", str(tmp / "scratch"))
    native.reset()
    assert native.load() is not None
    native.reset()
    monkeypatch.delenv("DPNET_BUILD_DIR")
    return next((tmp / "scratch").glob("*.so")).name


def _plant_library(path: Path, marker: Path) -> None:
    """A shared library that creates ``marker`` when it is loaded."""
    src = path.with_name("plant.c")
    path.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void plant(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    src.unlink()


def test_a_kernel_planted_in_the_temporary_folder_is_not_loaded(tmp_path, monkeypatch):
    import tempfile

    from dpnet.train import native

    name = _build_name(tmp_path, monkeypatch)
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    marker = tmp_path / "pwned"
    _plant_library(tmpdir / f"dpnet-native-{os.getuid()}" / name, marker)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    native.reset()
    try:
        lib = native.load()
    finally:
        native.reset()
    assert not marker.exists(), "a library someone else could have placed was loaded"
    assert lib is not None and list((home / ".cache" / "dpnet" / "native").glob("*.so"))


@pytest.mark.parametrize("how", ["writable_by_others", "owned_by_another_user"])
def test_a_kernel_in_an_unsafe_build_folder_is_not_loaded(tmp_path, monkeypatch, how):
    from dpnet.train import native

    name = _build_name(tmp_path, monkeypatch)
    build, marker = tmp_path / "build", tmp_path / "pwned"
    _plant_library(build / name, marker)
    if how == "writable_by_others":
        build.chmod(0o777)
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a folder to another user")
        os.chown(build, 4242, 4242)
        os.chown(build / name, 4242, 4242)
    monkeypatch.setenv("DPNET_BUILD_DIR", str(build))
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match=str(build)):
            lib = native.load()
    finally:
        native.reset()
    assert not marker.exists(), "a library from an unsafe folder was loaded"
    assert lib is not None  # built privately instead: training keeps its kernel


# ==================================================================================================
# IMAGES AND NAMES A USER HANDS US: paths, encodings, non-images, 16-bit tones
# ==================================================================================================

# -------------------------------------------------------------------------- path traversal (item 4)
def _cub_layout(root: Path, paths: list[str]) -> None:
    root.mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
    (root / "image_class_labels.txt").write_text("".join(f"{i + 1} 1\n" for i in range(len(paths))))
    (root / "train_test_split.txt").write_text("".join(f"{i + 1} {i % 2}\n" for i in range(len(paths))))


@pytest.mark.parametrize("bad", ["../outside.jpg", "a/../../outside.jpg", "/etc/hostname"])
def test_image_paths_leaving_the_dataset_are_refused(tmp_path, bad):
    from dpnet.extract.datasets import read_cub

    _cub_layout(tmp_path / "cub", ["ok/a.jpg", bad])
    with pytest.raises(DatasetLayoutError, match=r"images\.txt:2"):
        read_cub(tmp_path / "cub")


# ------------------------------------------------------------------- non-UTF-8 file names (item 11)
def test_a_file_name_that_is_not_utf8_gets_a_clear_error(tmp_path, capsys):
    _folder_set(tmp_path / "raw", ["a", "b"])
    bad = os.path.join(os.fsencode(tmp_path / "raw" / "train" / "a"), b"caf\xe9.png")
    shutil.copyfile(tmp_path / "raw" / "train" / "a" / "im0.png", bad)
    code = extract_main(["--dataset", "folder", "--data-dir", str(tmp_path / "raw"), "--weights", "random",
                         "--regions", "4", "--image-size", "64", "--out-root", str(tmp_path / "cache"),
                         "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "caf\\xe9.png" in err and "rename" in err


# -------------------------------------------------------------------- explain a non-image (item 15)
def test_explaining_a_file_that_is_not_an_image_names_it(copy, capsys):
    fake = copy.tmp / "notes.jpg"
    fake.write_text("these are not pixels")
    assert analyze_main(["explain", str(fake), "--run", str(copy.run)]) == 2
    err = capsys.readouterr().err
    assert "notes.jpg" in err and "not a readable image" in err


# ----------------------------------------------------------------------------- 16-bit PNG (item 20)
def test_a_16_bit_png_keeps_its_tones(tmp_path):
    from dpnet.extract.images import load_rgb

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))  # dark to bright, left to right
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb, _ = load_rgb(path, 64)
    want = np.round(ramp / 257.0)
    got = rgb[..., 0].astype(float)[:32]
    assert np.abs(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)).max() == 0  # grey stays grey
    assert rgb.min() < 10 and rgb.max() > 245
    np.testing.assert_allclose(got.mean(0)[4:-4], np.interp(np.arange(64), np.arange(64), want[0])[4:-4], atol=6)


# ==================================================================================================
# CACHES THAT ARE DAMAGED OR DISAGREE: chunks, manifests, identity, non-finite values
# ==================================================================================================

# -------------------------------------------------------------------------- missing chunks (item 5)
@pytest.mark.parametrize("field", ["regions", "labels"])
def test_a_deleted_chunk_is_an_error_naming_the_shard(copy, capsys, field):
    chunks = sorted(p for p in (copy.cache / "shards" / "00000.zarr" / field / "c").rglob("*") if p.is_file())
    chunks[-1].unlink()
    with pytest.raises(CacheIncompleteError, match=r"00000\.zarr"):
        RegionCache(copy.cache).load_shard(0)
    assert train_main(train_args(copy.cache, copy.tmp / "r")) == 2
    err = capsys.readouterr().err
    assert "00000.zarr" in err and "make extract" in err


# ----------------------------------------------------------------- manifest against shards (item 6)
@pytest.mark.parametrize("key", ["R", "D"])
def test_a_manifest_that_disagrees_with_its_shards_is_refused(copy, capsys, key):
    path = copy.cache / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[key] += 4
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match=rf"00000\.zarr.*\b{key}\b"):
        RegionCache(copy.cache)
    assert train_main(train_args(copy.cache, copy.tmp / "r")) == 2
    assert "manifest.json" in capsys.readouterr().err


# ---------------------------------------------------------------------- damaged caches (item 12-13)
@pytest.mark.parametrize("damage", ["deleted shard", "manifest.json", "shards/00000.zarr/zarr.json",
                                    "shards/00001.zarr/regions/zarr.json"])
def test_a_damaged_cache_gets_an_error_naming_the_file_and_the_fix(copy, capsys, damage):
    if damage == "deleted shard":
        shutil.rmtree(copy.cache / "shards" / "00001.zarr")
        named = "00001.zarr"
    else:
        path = copy.cache / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        named = damage.split("/")[-1] if damage == "manifest.json" else damage.split("/")[1]
    assert train_main(train_args(copy.cache, copy.tmp / "r")) == 2
    err = capsys.readouterr().err
    assert named in err and "make extract" in err and "Traceback" not in err


# -------------------------------------------------------------------------- cache identity (item 7)
def test_a_checkpoint_or_model_of_another_cache_with_equal_shapes_is_refused(tmp_path):
    a = RegionCache(run_extraction(tiny_config(tmp_path / "a")).cache_dir)
    b = RegionCache(run_extraction(tiny_config(tmp_path / "b", synth={"n_classes": 3, "per_class": 6,
                                                                       "image_size": 64, "seed": 1})).cache_dir)
    assert (a.n_regions, a.dim, a.n_classes) == (b.n_regions, b.dim, b.n_classes)
    quick = dict(parts_per_class=2, inner_epochs=1, lr=1e-2, batch_size=4, val_fraction=0.0)
    ck = tmp_path / "checkpoint.pt"
    DPNetClassifier(epochs=1, **quick).fit(a, checkpoint=ck)
    with pytest.raises(CacheMismatchError, match="another cache"):
        DPNetClassifier(epochs=2, **quick).fit(b, checkpoint=ck)
    est = DPNetClassifier(epochs=1, **quick).fit(a)
    est.save(tmp_path / "model.pt")
    with pytest.raises(CacheMismatchError, match="another cache"):
        DPNetClassifier.load(tmp_path / "model.pt", b)
    DPNetClassifier.load(tmp_path / "model.pt", a)  # its own cache is fine


def test_a_global_linear_file_of_another_cache_in_a_run_is_named_not_crashed_on(copy, capsys):
    """global_linear.pt (the CAM baseline of the pixel measures) copied in from a run on another cache
    (here: another D, as a hypercolumn cache has) gets an error naming the file and the fix."""
    from dpnet.train.baselines import LINEAR_KIND
    from dpnet.train.serialize import save_file

    c = RegionCache(copy.cache)
    save_file(copy.run / "global_linear.pt", LINEAR_KIND, {"cache_id": "0" * 16},
              {"weight": torch.zeros(c.n_classes, c.dim + 112), "bias": torch.zeros(c.n_classes),
               "mean": torch.zeros(c.dim + 112), "std": torch.ones(c.dim + 112)})
    assert analyze_main(["report", "--run", str(copy.run), "--no-progress", "--pixel-images", "2"]) != 0
    err = capsys.readouterr().err
    assert "global_linear.pt" in err and "another cache" in err and "Traceback" not in err


# ------------------------------------------------------------------- non-finite values (item 16-17)
def _poke(cache: Path, shard: int, field: str, index: tuple, value: float) -> int:
    """Set one value of a stored array; returns the image id of the row touched."""
    import zarr

    group = zarr.open_group(str(cache / "shards" / f"{shard:05d}.zarr"), mode="r+")
    arr = group[field]
    row = arr[index[0]]
    row[index[1:]] = value
    arr[index[0]] = row
    return int(group["image_ids"][index[0]])


def test_inf_in_a_global_descriptor_is_named_before_scikit_learn(copy, capsys):
    image = _poke(copy.cache, 0, "global", (0, 5), np.inf)
    argv = train_args(copy.cache, copy.tmp / "r")
    argv.remove("--no-baselines")
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"image id {image}" in err and "00000" in err and "Traceback" not in err


def test_nan_in_the_cache_stops_the_report_naming_the_image(copy, capsys):
    cache = RegionCache(copy.cache)
    shard = next(s for s in range(cache.n_shards) if cache.rows(s, "test")[1] > cache.rows(s, "test")[0])
    row = cache.rows(shard, "test")[0]
    image = _poke(copy.cache, shard, "regions", (row, 3, 7), np.nan)
    assert analyze_main(["report", "--run", str(copy.run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"image id {image}" in err and f"{shard:05d}" in err


# ==================================================================================================
# THE REPORT'S PAGE: escaping and the atomic swap
# ==================================================================================================

# ------------------------------------------------------------------------- report escaping (item 3)
class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.handlers = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.handlers += [k for k, _ in attrs if k.startswith("on")]


def _folder_set(root: Path, classes: list[str], per_split: int = 4, names=None) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, cname in enumerate(classes):
            folder = root / split / cname
            folder.mkdir(parents=True)
            for i in range(per_split):
                pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
                pixels[:, :, c % 3] = 255 - 40 * i  # a class colour
                stem = f"{names[i % len(names)]}{i}" if names else f"im{i}"
                Image.fromarray(pixels).save(folder / f"{stem}.png")


def test_hostile_class_and_file_names_cannot_inject_markup(tmp_path):
    from dpnet.analyze.report import build_report
    from dpnet.train.run import train_run

    hostile = ["<svg onload=alert(1)>", "<img src=x onerror=alert(2)>", "plain"]
    _folder_set(tmp_path / "raw", hostile, names=["<svg onload=alert(3)>", "x\" onmouseover=\"alert(4)"])
    cfg = tiny_config(tmp_path, dataset="folder", regions=8)
    cache = run_extraction(cfg).cache_dir
    run = tmp_path / "run"
    train_run(train_config(cache=str(cache), run_dir=str(run), parts_per_class=2, epochs=1, inner_epochs=1,
                           lr=1e-2, batch_size=4, val_fraction=0.0, baselines=False, progress=False))
    page = build_report(run, k=2, n_show=2)
    parsed = _Tags()
    parsed.feed(page.read_text())
    assert not parsed.handlers and not parsed.tags & {"svg", "script"}
    assert "&lt;svg onload=alert(1)&gt;" in page.read_text()  # the name is shown, escaped


# --------------------------------------------------------------------------- report atomic (item 9)
KILLED_REPORT = """
import os, pathlib, signal, sys
sys.path.insert(0, {root!r})
import dpnet.analyze.report as rp
orig = rp._Renderer.gallery
def die(self):
    orig(self)
    os.kill(os.getpid(), signal.SIGKILL)
rp._Renderer.gallery = die
rp.build_report(pathlib.Path({run!r}), k=2, n_show=2)
"""


@pytest.mark.slow
def test_a_report_killed_while_it_renders_leaves_the_old_one_whole(copy):
    from dpnet.analyze.report import build_report

    page = build_report(copy.run, k=3, n_show=4)
    text = page.read_text()
    linked = [page.parent / s for s in re.findall(r"src='([^']+)'", text)]
    before = {p: sha(p) for p in linked}
    proc = python(KILLED_REPORT.format(root=str(ROOT), run=str(copy.run)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert page.read_text() == text
    assert {p: sha(p) for p in linked} == before, "the old page links images of the killed run"
    build_report(copy.run, k=2, n_show=2)
    assert not leftovers(copy.run), "the dead report's temporary folder was left behind"


# ==================================================================================================
# WRITES THAT SURVIVE NEIGHBOURS, KILLS AND FULL DISKS
# ==================================================================================================

# ----------------------------------------------------------------------------------- locks (item 8)
SLOW = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import {module} as m
orig = m.{owner}.{method}
def slow(*a, **k):
    pathlib.Path({flag!r}).touch()
    time.sleep(0.4)
    return orig(*a, **k)
m.{owner}.{method} = slow
{run}
"""


def test_a_second_extraction_of_one_cache_says_who_holds_it(tmp_path):
    flag = tmp_path / "started"
    run = f"from tests.helpers import tiny_config\nm.run_extraction(tiny_config(pathlib.Path({str(tmp_path)!r})))"
    first = spawn(SLOW.format(root=str(ROOT), module="dpnet.extract.pipeline", owner="FeatureExtractor", method="__call__",
                              flag=str(flag), run=run))
    try:
        wait_for(lambda: flag.exists() or first.poll() is not None, what="the first extraction")
        assert first.poll() is None, first.communicate()
        with pytest.raises(DpnetError, match=rf"in use by pid {first.pid}"):
            run_extraction(tiny_config(tmp_path))
    finally:
        first.kill()
        first.wait()
    run_extraction(tiny_config(tmp_path))  # the holder is gone: the cache is free again


def test_a_second_training_into_one_run_folder_says_who_holds_it(copy):
    from dpnet.train.run import train_run

    flag = copy.tmp / "started"
    options = dict(cache=str(copy.cache), run_dir=str(copy.tmp / "r"), parts_per_class=2, epochs=30, inner_epochs=1,
                   lr=1e-2, batch_size=4, val_fraction=0.0, baselines=False, progress=False)
    run = f"from tests.helpers import train_config\nimport dpnet.train.run as tr\ntr.train_run(train_config(**{options!r}))"
    first = spawn(SLOW.format(root=str(ROOT), module="dpnet.train.trainer", owner="Trainer", method="_run_epoch",
                              flag=str(flag), run=run))
    try:
        wait_for(lambda: flag.exists() or first.poll() is not None, what="the first training")
        assert first.poll() is None, first.communicate()
        with pytest.raises(DpnetError, match=rf"in use by pid {first.pid}"):
            train_run(train_config(**options))
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------- log after a kill (item 10)
KILL_BEFORE_LOG = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.helpers import train_config
import dpnet.train.run as tr
orig = tr.EpochLog.__call__
def die(self, row):
    if row["epoch"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    orig(self, row)
tr.EpochLog.__call__ = die
tr.train_run(train_config(**{options!r}))
"""


def test_a_kill_between_checkpoint_and_log_loses_no_log_row(copy):
    import csv

    from dpnet.train.run import train_run

    options = dict(cache=str(copy.cache), run_dir=str(copy.tmp / "r"), parts_per_class=2, epochs=3, inner_epochs=1,
                   lr=1e-2, batch_size=4, val_fraction=0.0, baselines=False, progress=False)
    proc = python(KILL_BEFORE_LOG.format(root=str(ROOT), options=options))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    train_run(train_config(**options))
    with open(copy.tmp / "r" / "log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


# ------------------------------------------------------------------------------ disk full (item 14)
@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of ``size`` bytes (root only: mounting needs it)."""
    mounted = []

    def make(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_during_extraction_keeps_finished_shards(tmp_path, small_disk, capsys):
    disk = small_disk(400 * 1024)
    argv = ["--dataset", "synth", "--data-dir", str(tmp_path / "raw"), "--weights", "random", "--regions", "12",
            "--image-size", "64", "--out-root", str(disk), "--shard-mb", str(12 * 1280 * 2 * 5 / 2**20),
            "--batch-size", "3", "--workers", "0", "--synth-classes", "3", "--synth-per-class", "6",
            "--synth-image-size", "64", "--no-progress"]
    assert extract_main(argv) == 2
    err = capsys.readouterr().err
    assert "disk" in err.lower() and str(disk) in err and "Traceback" not in err
    assert not leftovers(disk)
    done = list(disk.glob("*/shards/*.zarr"))
    assert done, "the test disk was too small to finish one shard"
    for shard in done:  # what was finished is whole
        import zarr

        assert zarr.open_group(str(shard), mode="r")["regions"][:].shape[0] > 0


def test_disk_full_during_training_leaves_no_temporary_file(copy, small_disk, capsys):
    disk = small_disk(48 * 1024)
    assert train_main(train_args(copy.cache, disk / "run", "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "disk" in err.lower() and "Traceback" not in err
    assert not leftovers(disk)


def test_a_failed_checkpoint_write_is_reported_and_cleaned_up(copy, monkeypatch, capsys):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    assert train_main(train_args(copy.cache, copy.tmp / "r")) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "disk" in err.lower()
    assert not leftovers(copy.tmp / "r")


# ----------------------------------------------------------------------------- dead temps (item 18)
def test_temporary_files_of_dead_runs_are_removed_and_live_ones_kept(copy, tmp_path):
    from dpnet.train.run import train_run

    gone, live = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = tiny_config(tmp_path / "x")
        run_extraction(cfg)
        cache = Path(cfg.out_root) / cfg.cache_name()
        dead = [cache / "shards" / f"00001.zarr.tmp-{gone}", Path(cfg.data_dir + f".tmp-{gone}"),
                cache / f"manifest.json.tmp-{gone}"]
        kept = cache / "shards" / f"00002.zarr.tmp-{live.pid}"
        for p in dead + [kept]:
            (p.mkdir(parents=True) if "zarr" in p.name or "raw" in p.name else p.write_text("x"))
        (cache / "manifest.json").unlink()  # a rerun that resumes
        run_extraction(cfg)
        assert not any(p.exists() for p in dead) and kept.exists()
        run = copy.tmp / "r"
        run.mkdir()
        (run / f"checkpoint.pt.tmp-{gone}").write_bytes(b"x")
        train_run(train_config(cache=str(copy.cache), run_dir=str(run), parts_per_class=2, epochs=1, inner_epochs=1,
                               lr=1e-2, batch_size=4, val_fraction=0.0, baselines=False, progress=False))
        assert not leftovers(run)
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ ranks die with parent (item 19)
RANKS = """
import pathlib, sys
sys.path.insert(0, {root!r})
from tests.helpers import tiny_config
from dpnet.extract.pipeline import run_extraction
run_extraction(tiny_config(pathlib.Path({tmp!r}), ranks=2, image_size=320,
                           synth={{"n_classes": 4, "per_class": 60, "image_size": 128}}))
"""


@pytest.mark.slow
def test_extraction_ranks_die_with_their_parent(tmp_path):
    parent = spawn(RANKS.format(root=str(ROOT), tmp=str(tmp_path)))
    ranks: list[int] = []
    try:
        def started() -> bool:
            ranks[:] = [c for c in children_of(parent.pid) if "spawn_main" in _cmdline(c)]
            return len(ranks) == 2 and any((tmp_path / "cache").rglob("*.tmp-*")) or parent.poll() is not None

        wait_for(started, timeout=180, what="two extraction ranks at work")
        assert parent.poll() is None, parent.communicate()
        parent.kill()
        parent.wait()
        wait_for(lambda: not any(alive(r) for r in ranks), timeout=20, what="the ranks to end")
    finally:
        for r in ranks:
            if alive(r):
                os.kill(r, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# ----------------------------------------------------------------------------- random SIGKILL tries
EXTRACT_CHILD = """
import pathlib, sys
sys.path.insert(0, {root!r})
from tests.helpers import tiny_config
from dpnet.extract.pipeline import run_extraction
run_extraction(tiny_config(pathlib.Path({tmp!r}), regions=20, synth={{"n_classes": 3, "per_class": 10, "image_size": 64}}))
"""


def _cache_arrays(cache: Path) -> dict[str, np.ndarray]:
    c = RegionCache(cache)
    out = {}
    for s in range(c.n_shards):
        for k, v in c.load_shard(s).items():
            out[f"{s}/{k}"] = np.asarray(v)
    return out


def _kill_and_rerun(code: str, ready, rng: random.Random, tries: int) -> int:
    """Start ``code`` ``tries`` times, SIGKILL it a random moment after ``ready()``; returns kills made."""
    kills = 0
    for _ in range(tries):
        proc = spawn(code)
        wait_for(lambda: ready() or proc.poll() is not None, what="the child to start")
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    return kills


@pytest.mark.slow
def test_faults_extraction_killed_at_random_moments_ends_identical(tmp_path):
    # every run in a fresh process with the same environment: CPU convolutions round differently
    # with another thread count, so the reference is not made in this (long-lived) process
    python(EXTRACT_CHILD.format(root=str(ROOT), tmp=str(tmp_path / "ref")), check=True)
    ref = next((tmp_path / "ref" / "cache").glob("synth-*"))
    work = tmp_path / "k"
    code = EXTRACT_CHILD.format(root=str(ROOT), tmp=str(work))
    kills = _kill_and_rerun(code, lambda: (work / "cache").is_dir() and any((work / "cache").rglob("plan.json")),
                            random.Random(0), tries=3)
    assert kills >= 1
    python(code, check=True)
    got = next((work / "cache").glob("synth-*"))
    a, b = _cache_arrays(ref), _cache_arrays(got)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert not leftovers(work)


TRAIN_CHILD = """
import sys
sys.path.insert(0, {root!r})
from tests.helpers import train_config
from dpnet.train.run import train_run
train_run(train_config(**{options!r}))
"""


def test_faults_training_killed_at_random_moments_ends_identical(copy):
    from dpnet.train.run import train_run

    options = dict(cache=str(copy.cache), parts_per_class=2, epochs=8, inner_epochs=2, lr=1e-2, batch_size=4,
                   val_fraction=0.0, baselines=False, progress=False)
    train_run(train_config(run_dir=str(copy.tmp / "ref"), **options))
    work = copy.tmp / "k"
    code = TRAIN_CHILD.format(root=str(ROOT), options={**options, "run_dir": str(work)})
    kills = _kill_and_rerun(code, lambda: (work / "config.json").is_file(), random.Random(1), tries=3)
    assert kills >= 1
    train_run(train_config(run_dir=str(work), **options))
    ref = DPNetClassifier.load(copy.tmp / "ref" / "model.pt").module_.state_dict()
    got = DPNetClassifier.load(work / "model.pt").module_.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (copy.tmp / "ref" / "log.csv").read_text().count("\n") == (work / "log.csv").read_text().count("\n")
    assert not leftovers(work)
