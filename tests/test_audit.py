"""The second fault audit (issue 15): nothing lost, nothing overwritten, a clear line for every mistake.

Ordered by what is attacked: outputs a user names, locks and folders, dataset files, options,
signals, and runs whose pieces moved. Each test plants real files where files are at stake.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dpnet.errors import DatasetLayoutError
from dpnet.files import FolderLock
from dpnet.extract.cache import RegionCache
from tests.helpers import ROOT, python, spawn, tiny_config, train_config, wait_for


def main(stage: str, argv: list[str]) -> int:
    if stage == "extract":
        from dpnet.extract.cli import main as m
    elif stage == "train":
        from dpnet.train.cli import main as m
    else:
        from dpnet.analyze.cli import main as m
    return m(argv)


def explain(image: Path, run: Path, *extra: str) -> int:
    return main("analyze", ["explain", str(image), "--run", str(run), *extra])


def report(run: Path, *extra: str) -> int:
    return main("analyze", ["report", "--run", str(run), "--no-progress", "--pixel-images", "0", *extra])


def held_out_image(cache: Path) -> Path:
    c = RegionCache(cache)
    return c.image_file(next(r["path"] for r in c.image_table() if not r["is_train"]))


def plant_user_files(folder: Path) -> dict[Path, bytes]:
    """A user's files in ``folder``, to check later that they survived."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {folder / "thesis.txt": b"three years of work", folder / "notes" / "a.md": b"# notes"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def intact(files: dict[Path, bytes]) -> bool:
    return all(p.is_file() and p.read_bytes() == data for p, data in files.items())


def run_files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if re.search(r"\.(tmp|old|unpack)-\d+", p.name)]


# ============================================================ outputs a user names (items 1, 2, 19)
@pytest.mark.parametrize("name", ["...jpg", "..jpg", ".jpg"])
def test_explaining_an_image_whose_stem_is_dots_keeps_the_run_and_earlier_explanations(copy, name, capsys):
    before = run_files(copy.run)
    earlier = held_out_image(copy.cache)
    assert explain(earlier, copy.run) == 0
    first = next((copy.run / "explain").iterdir())
    odd = copy.tmp / name
    shutil.copyfile(earlier, odd)
    assert explain(odd, copy.run) == 0, capsys.readouterr().err
    assert run_files(copy.run) == before, "a run file was removed or changed"
    assert (first / "index.html").is_file(), "the earlier explanation was removed"
    pages = sorted((copy.run / "explain").iterdir())
    assert len(pages) == 2 and all(p.parent == copy.run / "explain" for p in pages)


def test_explain_never_empties_a_folder_it_did_not_write(copy, capsys, monkeypatch):
    image = held_out_image(copy.cache)
    user = copy.tmp / "my-folder"
    files = plant_user_files(user)
    assert explain(image, copy.run, "--out", str(user)) == 2
    err = capsys.readouterr().err
    assert "not written by dpnet" in err and "Traceback" not in err
    assert intact(files)
    here = copy.tmp / "cwd"
    here_files = plant_user_files(here)
    monkeypatch.chdir(here)
    (here / "sub").mkdir()
    assert explain(image, copy.run, "--out", "sub/..") == 2
    assert intact(here_files) and intact(files)
    assert not leftovers(copy.tmp)


def test_explain_replaces_its_own_earlier_output(copy):
    image, out = held_out_image(copy.cache), copy.tmp / "expl"
    assert explain(image, copy.run, "--out", str(out)) == 0
    stamp = (out / "index.html").stat().st_mtime_ns
    time.sleep(0.01)
    assert explain(image, copy.run, "--out", str(out)) == 0
    assert (out / "index.html").stat().st_mtime_ns != stamp and not leftovers(copy.tmp)


def test_explaining_an_image_with_a_254_character_name(copy, capsys):
    long = copy.tmp / ("b" * 250 + ".png")
    Image.open(held_out_image(copy.cache)).save(long)
    assert explain(long, copy.run) == 0, capsys.readouterr().err
    (page,) = (copy.run / "explain").iterdir()
    assert len(page.name) <= 100 and (page / "index.html").is_file()


def test_training_never_writes_into_a_users_folder(copy, capsys):
    user = copy.tmp / "Documents"
    files = plant_user_files(user)
    (user / "model.pt").write_bytes(b"my own model")
    files[user / "model.pt"] = b"my own model"
    argv = ["--cache", str(copy.cache), "--run-dir", str(user), "--q", "2", "--epochs", "1", "--val-fraction", "0",
            "--no-baselines", "--no-progress"]
    assert main("train", argv) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "Traceback" not in err
    assert intact(files) and sorted(p.name for p in user.iterdir()) == ["model.pt", "notes", "thesis.txt"]
    empty = copy.tmp / "empty"
    empty.mkdir()
    assert main("train", argv[:3] + [str(empty)] + argv[4:]) == 0  # an empty folder is fine
    assert main("train", argv[:3] + [str(empty)] + argv[4:]) == 0  # and it is dpnet's from then on


def test_extraction_never_writes_into_a_users_folder(tmp_path, capsys):
    user = tmp_path / "cache" / "photos"
    files = plant_user_files(user)
    assert main("extract", extract_argv(tmp_path, "--name", "photos")) == 2
    assert "did not write" in capsys.readouterr().err and intact(files)
    assert sorted(p.name for p in user.iterdir()) == ["notes", "thesis.txt"]


def test_an_unknown_dataset_creates_no_folder(tmp_path, capsys):
    assert main("extract", ["--dataset", "nope", "--out-root", str(tmp_path / "cache"), "--no-progress"]) == 2
    assert "DATASET" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_a_temporary_name_never_passes_the_file_name_limit(tmp_path):
    from dpnet.files import temp_path

    for name in ("x" * 255, "é" * 127, "short"):
        tmp = temp_path(tmp_path / name)
        assert len(tmp.name.encode()) <= 255 and tmp.name.endswith(f".tmp-{os.getpid()}")
        tmp.write_text("ok")
    assert temp_path(tmp_path / ("x" * 255)) != temp_path(tmp_path / ("x" * 254 + "y"))


# ============================================================== locks and folders (3, 13, 16, 21)
def test_a_lock_file_planted_as_a_link_is_never_written_through(copy, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (copy.run / ".lock").unlink(missing_ok=True)
    (copy.run / ".lock").symlink_to(victim)
    assert report(copy.run) == 2
    assert "symbolic link" in capsys.readouterr().err
    lock = copy.cache / ".lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    argv = ["--dataset", "synth", "--data-dir", str(Path(RegionCache(copy.cache).manifest["dataset_root"])),
            "--weights", "random", "--regions", "12", "--image-size", "64", "--out-root", str(copy.tmp / "cache"),
            "--name", copy.cache.name, "--no-progress"]
    assert main("extract", argv) == 2
    assert victim.read_text() == "precious"


def test_a_folder_anyone_may_write_in_is_warned_about(copy, caplog):
    os.chmod(copy.run, 0o777)
    with FolderLock(copy.run, "report"):
        pass
    assert any("writable by every user" in r.getMessage() for r in caplog.records)


def test_a_refusal_names_the_holder_not_the_requester(copy, capsys):
    with FolderLock(copy.run, "training"):
        assert report(copy.run) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} (training)" in err and "(report)" not in err


def test_training_into_a_dangling_link_says_so(copy, capsys):
    link = copy.tmp / "gone-run"
    link.symlink_to(copy.tmp / "nowhere")
    argv = ["--cache", str(copy.cache), "--run-dir", str(link), "--q", "2", "--epochs", "1", "--inner-epochs", "1",
            "--val-fraction", "0", "--no-baselines", "--no-progress"]
    assert main("train", argv) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "does not exist" in err and "Traceback" not in err


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for this test (a read-only bind mount: root ignores file modes)."""
    mounted = []

    def make(folder: Path) -> Path:
        done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here ({done.stderr.decode().strip()})")
        mounted.append(folder)
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({done.stderr.decode().strip()})")
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_run_is_read_and_explained_elsewhere(copy, read_only, capsys):
    image = held_out_image(copy.cache)
    read_only(copy.run)
    read_only(copy.cache)
    assert explain(image, copy.run, "--out", str(copy.tmp / "elsewhere")) == 0
    assert (copy.tmp / "elsewhere" / "index.html").is_file()
    assert explain(image, copy.run) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "--out" in err and "Traceback" not in err
    assert report(copy.run) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and str(copy.run) in err and "Traceback" not in err


def test_a_report_reads_a_read_only_cache(copy, read_only, capsys):
    read_only(copy.cache)
    assert report(copy.run) == 0, capsys.readouterr().err


# ================================================================ runs whose pieces moved (9, 14, 15)
def test_a_run_finds_its_cache_from_any_working_folder(tmp_path, monkeypatch, capsys):
    from dpnet.extract.pipeline import run_extraction

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    run_extraction(tiny_config(Path("."), out_root="data/cache", data_dir="data/raw/synth"))
    argv = ["--dataset", "synth", "--q", "2", "--epochs", "1", "--inner-epochs", "1", "--val-fraction", "0",
            "--no-baselines", "--no-progress"]
    assert main("train", argv) == 0
    run = next((work / "data" / "runs").iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert report(run) == 0, capsys.readouterr().err
    assert explain(held_out_image(RegionCache(work / "data" / "cache" / run.name).path), run) == 0
    shutil.move(str(work), str(tmp_path / "moved"))  # run and cache moved together
    assert report(tmp_path / "moved" / "data" / "runs" / run.name) == 0, capsys.readouterr().err


def test_a_run_killed_before_its_metrics_says_how_to_finish(copy, capsys):
    (copy.run / "metrics.json").unlink()
    assert report(copy.run) == 2
    assert explain(held_out_image(copy.cache), copy.run) == 2
    err = capsys.readouterr().err
    assert err.count("did not finish") == 2 and "make train" in err and "Traceback" not in err


def test_a_report_draws_what_it_can_when_an_image_is_gone(copy, capsys, caplog):
    c = RegionCache(copy.cache)
    gone = [c.image_file(r["path"]) for r in c.image_table()]
    for path in gone:
        path.unlink()
    assert main("analyze", ["report", "--run", str(copy.run), "--no-progress", "--pixel-images", "4"]) == 0, \
        capsys.readouterr().err
    assert (copy.run / "report" / "index.html").is_file()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot draw" in text and any(str(p) in text for p in gone)


def test_a_report_survives_its_dataset_moving(copy, capsys):
    root = Path(RegionCache(copy.cache).manifest["dataset_root"])
    shutil.move(str(root), str(root.with_name("moved")))
    assert report(copy.run) == 0, capsys.readouterr().err


def test_a_full_disk_during_the_report_is_named_and_keeps_the_old_report(copy, monkeypatch, capsys):
    assert report(copy.run) == 0
    old = (copy.run / "report" / "index.html").read_bytes()

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    assert report(copy.run) == 2
    err = capsys.readouterr().err
    assert "no space left" in err.lower() and "Traceback" not in err
    assert (copy.run / "report" / "index.html").read_bytes() == old and not leftovers(copy.run)


# ========================================================================= dataset files (4, 5, 18, 22, 24)
def folder_set(root: Path, classes: dict[str, tuple[int, int]], names=None, size: int = 64) -> Path:
    """train/<class>/ and test/<class>/ with (n_train, n_test) small PNGs per class."""
    rng = np.random.default_rng(0)
    for cname, (n_train, n_test) in classes.items():
        for split, n in (("train", n_train), ("test", n_test)):
            folder = root / split / cname
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = (names or {}).get((cname, split, i), f"im{i}.png")
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return root


def folder_cfg(tmp: Path, root: Path, **kw):
    return tiny_config(tmp, dataset="folder", data_dir=str(root), **kw)


def test_a_class_called_images_is_found_everywhere(tmp_path, capsys, caplog):
    from dpnet.extract.pipeline import run_extraction
    from dpnet.train.run import train_run

    root = folder_set(tmp_path / "set", {"images": (3, 2), "birds": (3, 2)})
    (root / "images").mkdir()  # a stray folder beside train/ and test/
    cache = run_extraction(folder_cfg(tmp_path, root)).cache_dir
    c = RegionCache(cache)
    assert all(c.image_file(r["path"]).is_file() for r in c.image_table())
    run = tmp_path / "run"
    train_run(train_config(cache=str(cache), run_dir=str(run), parts_per_class=2, epochs=1, inner_epochs=1,
                           batch_size=4, val_fraction=0.0, baselines=False, progress=False))
    assert main("analyze", ["report", "--run", str(run), "--no-progress", "--pixel-images", "2"]) == 0
    assert "cannot draw" not in " ".join(r.getMessage() for r in caplog.records)
    assert explain(held_out_image(cache), run) == 0


@pytest.mark.parametrize("char", ["\n", "\u2028", "\u0085", "\t", "\r"])
def test_a_file_name_with_a_line_break_or_tab_is_refused_before_anything_is_written(tmp_path, char, capsys):
    from dpnet.extract.pipeline import run_extraction

    root = folder_set(tmp_path / "set", {"a": (2, 1), "b": (2, 1)}, names={("a", "train", 1): f"odd{char}name.png"})
    with pytest.raises(DatasetLayoutError) as err:
        run_extraction(folder_cfg(tmp_path, root))
    assert ascii(f"odd{char}name.png")[1:-1] in str(err.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("plan.json"))


def _cub(root: Path, label_lines: list[str]) -> Path:
    (root / "images" / "c").mkdir(parents=True)
    for i in (1, 2):
        Image.new("RGB", (32, 32)).save(root / "images" / "c" / f"{i}.jpg")
    (root / "images.txt").write_text("1 c/1.jpg\n2 c/2.jpg\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    (root / "image_class_labels.txt").write_text("\n".join(label_lines) + "\n")
    return root


@pytest.mark.parametrize("lines, says", [(["1 0", "2 1"], "class ids start at 1"),
                                         (["1 one", "2 1"], "expected an image id and a class id"),
                                         (["x 1", "2 1"], "expected an image id and a class id")])
def test_a_cub_class_id_out_of_range_names_its_line(tmp_path, lines, says):
    from dpnet.extract.datasets import read_cub

    with pytest.raises(DatasetLayoutError, match=says) as err:
        read_cub(_cub(tmp_path, lines))
    assert "image_class_labels.txt:1" in str(err.value)


def test_classes_without_training_images_are_warned_about(tmp_path, caplog):
    from dpnet.extract.pipeline import run_extraction
    from dpnet.train.run import warn_thin_classes

    root = folder_set(tmp_path / "set", {"full": (3, 1), "single": (1, 1), "testonly": (0, 2)})
    (root / "train" / "empty").mkdir()
    cache = RegionCache(run_extraction(folder_cfg(tmp_path, root)).cache_dir)
    (msg,) = warn_thin_classes(cache)
    assert "'single' (1)" in msg and "'testonly' (0)" in msg and "'empty' (0)" in msg and "'full'" not in msg


def exif_jpeg(path: Path, orientation: int) -> None:
    """64 x 32 stored (left half red, right half blue) with an EXIF orientation tag."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())


def test_exif_rotation_is_applied_alike_by_the_model_and_the_pictures(tmp_path):
    from dpnet.analyze import draw
    from dpnet.extract.images import load_rgb

    path = tmp_path / "turned.jpg"
    exif_jpeg(path, 6)  # shown turned 90 degrees clockwise: 32 wide, 64 high, red on top
    pixels, size = load_rgb(path, 32)
    assert size == (32, 64)
    assert pixels[2, 16, 0] > 200 and pixels[29, 16, 2] > 200  # red on top, blue below
    shown = np.asarray(draw.open_rgb(path))
    assert shown.shape[:2] == (64, 32) and shown[4, 16, 0] > 200 and shown[60, 16, 2] > 200


def test_pictures_are_drawn_at_a_bounded_size(tmp_path):
    from dpnet.analyze import draw
    from dpnet.analyze.draw import DRAW_SIDE

    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(big)
    img = draw.open_rgb(big)
    assert max(img.size) == DRAW_SIDE and img.size[0] > img.size[1]
    assert draw.open_rgb(big, (1500, 1000, 300, 200)).size == (300, 200)  # a box in the file's pixels
    assert max(draw.open_rgb(big, (100, 100, 2500, 1500)).size) == DRAW_SIDE


def test_explaining_a_huge_image_draws_a_bounded_page(copy, capsys):
    from dpnet.analyze.draw import DRAW_SIDE

    huge = copy.tmp / "huge.png"
    Image.open(held_out_image(copy.cache)).resize((4000, 3000)).save(huge)
    assert explain(huge, copy.run) == 0, capsys.readouterr().err
    (page,) = (copy.run / "explain").iterdir()
    assert max(Image.open(page / "heatmap.png").size) <= DRAW_SIDE


# ================================================================================ options (7, 11, 17, 20, 23)
def extract_argv(tmp: Path, *extra: str) -> list[str]:
    return ["--dataset", "synth", "--data-dir", str(tmp / "raw"), "--weights", "random", "--regions", "12",
            "--image-size", "64", "--out-root", str(tmp / "cache"), "--synth-classes", "3", "--synth-per-class", "4",
            "--synth-image-size", "64", "--no-progress", *extra]


@pytest.mark.parametrize("extra, says", [
    (["--batch-size", "-3"], "BATCH"), (["--regions", "0"], "REGIONS"), (["--regions", "-1"], "REGIONS"),
    (["--image-size", "0"], "IMAGE_SIZE"), (["--image-size", "7"], "IMAGE_SIZE"),
    (["--test-fraction", "2"], "TEST_FRACTION"), (["--dense", "abc"], "DENSE"), (["--dense", "0"], "DENSE"),
    (["--dense", "100"], "DENSE"), (["--seed", "-1"], "SEED"), (["--device", "tpu"], "DEVICE"),
    (["--device", "cuda"], "DEVICE"), (["--weights", "/etc/passwd"], "/etc/passwd"), (["--weights", "PICKLE"], "never run"),
])
def test_an_absurd_extraction_option_gets_one_clear_line(tmp_path, capsys, extra, says):
    if extra[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if extra[-1] == "PICKLE":
        extra = [extra[0], str(tmp_path / "weights.pt")]
        torch.save({"model": SimpleNamespace(a=1)}, extra[1])
    argv = extract_argv(tmp_path, *extra)
    argv.remove("random") if "--weights" in extra else None
    if "--weights" in extra:
        argv.remove("--weights")
    assert main("extract", argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and err.count("\n") <= 3
    assert not any((tmp_path / "cache").rglob("*.zarr"))


@pytest.mark.parametrize("extra, says", [
    (["--lr-step", "0"], "lr_step"), (["--val-fraction", "-0.5"], "val_fraction"), (["--lr", "0"], "lr"),
    (["--seed", "-1"], "seed"), (["--device", "tpu"], "DEVICE"), (["--device", "cuda"], "DEVICE"),
])
def test_an_absurd_training_option_gets_one_clear_line(copy, capsys, extra, says):
    if extra[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--cache", str(copy.cache), "--run-dir", str(copy.tmp / "r"), "--q", "2", "--epochs", "1",
            "--no-baselines", "--no-progress", *extra]
    assert main("train", argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_boolean_option_takes_only_true_or_false(copy, capsys):
    argv = ["--cache", str(copy.cache), "--run-dir", str(copy.tmp / "r"), "--centre", "maybe"]
    assert main("train", argv) == 2  # returned, not raised into the caller
    err = capsys.readouterr().err
    assert "--centre" in err and "expected true or false" in err and err.count("\n") <= 2


@pytest.mark.parametrize("extra, says", [(["--pixel-steps", "0"], "--pixel-steps"),
                                         (["--pixel-images", "-1"], "--pixel-images"),
                                         (["--boxes-csv", "/no/such.csv"], "no such file")])
def test_an_absurd_analysis_option_gets_one_clear_line(copy, capsys, extra, says):
    assert report(copy.run, *extra) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("text, says", [("image_name,xmin\n", "lacks ymin"), ("image_name,xmin,ymin,xmax,ymax\n{name},1,2,x,4\n",
                                                                              "expected four numbers")])
def test_a_malformed_boxes_csv_names_its_line(copy, capsys, text, says):
    name = Path(RegionCache(copy.cache).image_table()[0]["path"]).name
    csv = copy.tmp / "boxes.csv"
    csv.write_text(text.format(name=name))
    assert report(copy.run, "--boxes-csv", str(csv)) == 2
    err = capsys.readouterr().err
    assert says in err and str(csv) in err and "Traceback" not in err


def _make_line(*args: str) -> list[str]:
    done = subprocess.run(["make", "-n", "-s", *args], cwd=ROOT, capture_output=True, text=True)
    module = {"explain": "analyze", "report": "analyze"}.get(args[0], args[0])  # the stage's own line, not setup's
    line = next(ln for ln in done.stdout.splitlines() if f" -m dpnet.{module} " in ln)
    return shlex.split(line)


def test_paths_with_spaces_pass_through_make_whole():
    assert "my data/set" in _make_line("extract", "DATA_DIR=my data/set", "WEIGHTS=my w.pt")
    assert "my w.pt" in _make_line("extract", "DATA_DIR=x", "WEIGHTS=my w.pt")
    words = _make_line("explain", "IMG=a photo.jpg", "RUN=my run", "OUT=an out")
    assert {"a photo.jpg", "my run", "an out"} <= set(words)


def test_make_train_and_report_pick_the_cache_of_the_options_given(tmp_path):
    from dpnet.train.cli import pick_cache

    for name, bb, r in (("cub-a", "efficientnet_lite0", 500), ("cub-b", "resnet50", 100), ("cub-c", "resnet50", 500)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"backbone": bb, "R": r, "image_size": 544}))
        time.sleep(0.01)
    args = SimpleNamespace(cache=None, dataset="cub", cache_root=str(tmp_path), backbone="resnet50", regions=100,
                           image_size=None)
    assert pick_cache(args).name == "cub-b"
    args.regions = None
    assert pick_cache(args).name == "cub-c"
    words = _make_line("train", "DATASET=cub", "BACKBONE=resnet50", "REGIONS=100")
    assert words[words.index("--backbone") + 1] == "resnet50" and words[words.index("--regions") + 1] == "100"
    words = _make_line("report", "DATASET=cub", "IMAGE_SIZE=448")
    assert words[words.index("--image-size") + 1] == "448" and "--backbone" not in words


def test_a_run_of_another_cache_says_the_fix(copy, tmp_path, capsys):
    from dpnet.extract.pipeline import run_extraction

    other = run_extraction(tiny_config(tmp_path / "o", regions=14)).cache_dir
    argv = ["--cache", str(other), "--run-dir", str(copy.run), "--q", "2", "--epochs", "4", "--val-fraction", "0",
            "--no-baselines", "--no-progress"]
    assert main("train", argv) == 2
    err = capsys.readouterr().err
    assert f"rm -r {copy.run}" in err and "--run-dir" in err


# ================================================================= a resumed frozen extraction (10)
FROZEN_CHILD = """
import sys, pathlib
sys.path.insert(0, {root!r})
from tests.helpers import tiny_config
from dpnet.extract.pipeline import run_extraction
run_extraction(tiny_config(pathlib.Path({tmp!r}), weights=None, regions=20, image_size=192, runtime="frozen",
                           batch_size=4, shard_mb=10 * 20 * 1280 * 2 / 2**20, data_dir={raw!r},
                           synth={{"n_classes": 3, "per_class": 10, "image_size": 96}}))
"""


@pytest.mark.slow
def test_a_resumed_frozen_extraction_equals_an_unbroken_one(tmp_path):
    """Each in a fresh process: the frozen graph's first calls of a shape ran unfused kernels."""
    raw = str(tmp_path / "raw")
    for name in ("a", "b"):
        python(FROZEN_CHILD.format(root=str(ROOT), tmp=str(tmp_path / name), raw=raw), check=True)
    cache_b = next((tmp_path / "b" / "cache").iterdir())
    shutil.rmtree(cache_b / "shards" / "00001.zarr")
    (cache_b / "manifest.json").unlink()
    python(FROZEN_CHILD.format(root=str(ROOT), tmp=str(tmp_path / "b"), raw=raw), check=True)
    a, b = RegionCache(next((tmp_path / "a" / "cache").iterdir())), RegionCache(cache_b)
    assert a.n_shards == b.n_shards == 3
    for s in range(a.n_shards):
        assert np.array_equal(np.asarray(a.load_shard(s)["regions"]), np.asarray(b.load_shard(s)["regions"])), s


# ============================================================================ signals (12)
CLI_CHILD = """
import sys
sys.path.insert(0, {root!r})
from {stage}.cli import main
sys.exit(main({argv!r}))
"""


def _stop_and_rerun(stage: str, argv: list[str], ready, rng: random.Random,
                    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Start the command once per signal, send it a random moment after ``ready(pid)``; check each stop's
    one line; returns the stops made."""
    stops = 0
    for sig in signals:
        proc = spawn(CLI_CHILD.format(root=str(ROOT), stage=stage, argv=argv))
        wait_for(lambda: ready(proc.pid) or proc.poll() is not None, what="the child to start")
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(sig)
            stops += 1
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 128 + sig:
            assert "stopped; run the same command to resume" in err and "Traceback" not in err, err
        else:
            assert proc.returncode == 0, err
    return stops


EXTRACT_ARGS = ["--dataset", "synth", "--weights", "random", "--regions", "20", "--image-size", "64",
                "--shard-mb", str(12 * 1280 * 2 * 5 / 2**20), "--batch-size", "3", "--workers", "0",
                "--synth-classes", "3", "--synth-per-class", "10", "--synth-image-size", "64", "--no-progress"]


def holds(folder: Path, pid: int) -> bool:
    """Whether process ``pid`` holds a dpnet lock under ``folder`` (it is then at work, its handlers set)."""
    for lock in folder.rglob(".lock"):
        try:
            if lock.read_text().split()[:1] == [str(pid)]:
                return True
        except OSError:
            pass
    return False


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    c = RegionCache(cache)
    return {f"{s}/{k}": np.asarray(v) for s in range(c.n_shards) for k, v in c.load_shard(s).items()}


@pytest.mark.slow
def test_extraction_stopped_by_sigint_and_sigterm_ends_identical(tmp_path):
    raw = str(tmp_path / "raw")
    python(CLI_CHILD.format(root=str(ROOT), stage="extract",
                            argv=EXTRACT_ARGS + ["--data-dir", raw, "--out-root", str(tmp_path / "ref")]), check=True)
    argv = EXTRACT_ARGS + ["--data-dir", raw, "--out-root", str(tmp_path / "k")]
    stops = _stop_and_rerun("extract", argv, lambda pid: holds(tmp_path / "k", pid), random.Random(0))
    assert stops >= 1
    python(CLI_CHILD.format(root=str(ROOT), stage="extract", argv=argv), check=True)
    a = _arrays(next((tmp_path / "ref").glob("synth-*")))
    b = _arrays(next((tmp_path / "k").glob("synth-*")))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not leftovers(tmp_path / "k")


@pytest.mark.slow
def test_training_stopped_by_sigint_and_sigterm_ends_identical(copy):
    from dpnet.train.estimator import DPNetClassifier

    args = ["--cache", str(copy.cache), "--q", "2", "--epochs", "8", "--inner-epochs", "2", "--lr", "1e-2",
            "--batch-size", "4", "--val-fraction", "0", "--no-baselines", "--no-progress"]
    python(CLI_CHILD.format(root=str(ROOT), stage="train", argv=args + ["--run-dir", str(copy.tmp / "ref")]), check=True)
    work = copy.tmp / "k"
    argv = args + ["--run-dir", str(work)]
    stops = _stop_and_rerun("train", argv, lambda pid: holds(work, pid), random.Random(0))
    assert stops >= 1
    python(CLI_CHILD.format(root=str(ROOT), stage="train", argv=argv), check=True)
    ref = DPNetClassifier.load(copy.tmp / "ref" / "model.pt").module_.state_dict()
    got = DPNetClassifier.load(work / "model.pt").module_.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not leftovers(work)


@pytest.mark.slow
def test_a_report_stopped_by_sigint_and_sigterm_ends_identical(copy):
    argv = ["report", "--run", str(copy.run), "--no-progress", "--pixel-images", "4"]
    python(CLI_CHILD.format(root=str(ROOT), stage="analyze", argv=argv), check=True)
    ref = json.loads((copy.run / "report" / "analysis.json").read_text())
    shutil.rmtree(copy.run / "report")
    stops = _stop_and_rerun("analyze", argv, lambda pid: holds(copy.run, pid), random.Random(0))
    assert stops >= 1
    assert not leftovers(copy.run)
    python(CLI_CHILD.format(root=str(ROOT), stage="analyze", argv=argv), check=True)
    assert json.loads((copy.run / "report" / "analysis.json").read_text()) == ref


ZARR_READS_STOPPED = """
import asyncio, os, signal, sys, time
sys.path.insert(0, {root!r})
from dpnet.stop import run_command
from zarr.core.sync import _get_loop

def body():
    async def reads():  # zarr's sync(): reads in flight on its event loop, one failed, when the stop lands
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(FileNotFoundError("shards/00006.zarr/.zattrs"))
        await asyncio.sleep(3600)

    asyncio.run_coroutine_threadsafe(reads(), _get_loop())
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    return 0

sys.exit(run_command(body))
"""


def test_a_stop_during_a_zarr_read_ends_with_one_line():
    """CI: a training stopped while zarr's event loop read a shard printed the stop line, then asyncio's
    complaints about the reads left behind ("Task was destroyed but it is pending!", "Future exception was
    never retrieved" with a traceback) when zarr closed its loop at exit."""
    from dpnet.stop import STOP_LINE

    out = python(ZARR_READS_STOPPED.format(root=str(ROOT)), timeout=60)
    assert out.returncode == 128 + signal.SIGINT
    assert out.stderr.strip() == STOP_LINE


class _SetNameStops:
    """A descriptor whose ``__set_name__`` meets a stop signal, as torch's lazy imports' ``cached_property`` did in
    CI: Python 3.11 wraps what ``__set_name__`` raises in a RuntimeError, whose cause is the :class:`Stopped`."""

    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_that_python_wraps_in_another_error_still_ends_with_one_line(capsys):
    from dpnet.stop import STOP_LINE, run_command

    def body() -> int:
        type("Lazy", (), {"attr": _SetNameStops()})  # a class made mid-import when the signal lands
        return 0

    before = signal.getsignal(signal.SIGINT)  # what this test worker had (not always Python's default)
    assert run_command(body) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == STOP_LINE
    assert signal.getsignal(signal.SIGINT) is before

    def cleanup_fails() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            raise OSError("the cleanup failed too")

    assert run_command(cleanup_fails) == 128 + signal.SIGTERM
    assert STOP_LINE in capsys.readouterr().err


def test_a_latest_file_dpnet_did_not_write_is_left_alone(tmp_path, caplog):
    from dpnet.extract.pipeline import run_extraction

    (tmp_path / "cache").mkdir()
    mine = tmp_path / "cache" / "LATEST"
    mine.write_text("my notes, not a cache name\nsecond line\n")
    run_extraction(tiny_config(tmp_path))
    assert mine.read_text() == "my notes, not a cache name\nsecond line\n"
    assert any("not a file dpnet wrote" in r.getMessage() for r in caplog.records)
    mine.unlink()
    cache = run_extraction(tiny_config(tmp_path, regions=14)).cache_dir
    assert mine.read_text() == cache.name + "\n"
    run_extraction(tiny_config(tmp_path))  # dpnet's own LATEST is moved on
    assert mine.read_text() == tiny_config(tmp_path).cache_name() + "\n"
