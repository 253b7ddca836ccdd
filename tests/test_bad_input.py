"""Bad input: every case gets an error naming the file or value and the fix."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpnet.extract.cache import RegionCache
from dpnet.extract.cli import main
from dpnet.errors import BadImagesError, DatasetLayoutError
from dpnet.extract.images import load_rgb
from dpnet.extract.pipeline import run_extraction
from tests.helpers import tiny_config


def _jpeg_bytes(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def make_cub(root: Path, files: dict[str, bytes | None]) -> Path:
    """A CUB-layout folder; a value of None lists the image without writing it."""
    (root / "images").mkdir(parents=True)
    lines = {"images": [], "labels": [], "split": []}
    for i, (name, data) in enumerate(files.items(), 1):
        if data is not None:
            (root / "images" / name).write_bytes(data)
        lines["images"].append(f"{i} {name}")
        lines["labels"].append(f"{i} {1 + i % 2}")
        lines["split"].append(f"{i} {i % 2}")
    for key, fname in (("images", "images.txt"), ("labels", "image_class_labels.txt"), ("split", "train_test_split.txt")):
        (root / fname).write_text("\n".join(lines[key]) + "\n")
    return root


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "1"])
def test_image_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)
    path = tmp_path / f"x.{'png' if mode != 'CMYK' else 'jpg'}"
    img.save(path)
    arr, orig = load_rgb(path, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and orig == (30, 20)


def test_rgba_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "t.png")
    arr, _ = load_rgb(tmp_path / "t.png", 10)
    assert (arr == 255).all()


def test_unreadable_images_have_clear_reasons(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "trunc.jpg").write_bytes(_jpeg_bytes(0)[:300])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_rgb(tmp_path / "garbage.jpg", 32)
    with pytest.raises(ValueError, match="truncated|not a readable"):
        load_rgb(tmp_path / "trunc.jpg", 32)
    with pytest.raises(ValueError, match="1x1 px"):
        load_rgb(tmp_path / "dot.png", 32)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.jpg", 32)


def _bad_set(tmp_path: Path) -> Path:
    files = {f"ok{i}.jpg": _jpeg_bytes(i) for i in range(8)}
    files.update({"gone.jpg": None, "garbage.jpg": b"xx", "trunc.jpg": _jpeg_bytes(9)[:300]})
    return make_cub(tmp_path / "cubish", files)


def test_bad_images_stop_with_full_list_and_keep_good_shards(tmp_path):
    root = _bad_set(tmp_path)
    cfg = tiny_config(tmp_path, dataset="cub", crop=False, dense=(), data_dir=str(root), shard_mb=12 * 1280 * 2 * 2 / 2**20)
    with pytest.raises(BadImagesError) as err:
        run_extraction(cfg)
    msg = str(err.value)
    for name in ("gone.jpg: file not found", "garbage.jpg", "trunc.jpg", "SKIP_BAD=1"):
        assert name in msg
    shards = Path(cfg.out_root) / cfg.cache_name() / "shards"
    kept = {p.name for p in shards.iterdir()}
    assert 0 < len(kept) < 6 and not any(".tmp" in k for k in kept)  # good shards kept, bad ones not
    # the same run with skip_bad resumes: it only redoes the shards that held bad files
    summary = run_extraction(tiny_config(tmp_path, dataset="cub", crop=False, dense=(), data_dir=str(root), skip_bad=True,
                                         shard_mb=cfg.shard_mb))
    assert summary.shards_written == 6 - len(kept)
    manifest = json.loads((summary.cache_dir / "manifest.json").read_text())
    assert sorted(s["path"] for s in manifest["skipped"]) == ["garbage.jpg", "gone.jpg", "trunc.jpg"]
    assert RegionCache(summary.cache_dir).count() == 8 == manifest["n_images"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    rc = main(["--dataset", "cub", "--data-dir", str(tmp_path), "--no-progress", "--out-root", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not a CUB-200-2011 folder" in err and "DATA_DIR" in err and "Traceback" not in err
    assert main(["--dataset", "nope", "--no-progress"]) == 2
    assert "known datasets" in capsys.readouterr().err
    assert main(["--backbone", "alexnet", "--no-progress", "--data-dir", str(tmp_path / "s"),
                 "--synth-per-class", "2", "--synth-classes", "2", "--out-root", str(tmp_path / "c")]) == 2
    assert "known backbones" in capsys.readouterr().err


def test_folder_dataset_needs_data_dir():
    with pytest.raises(DatasetLayoutError, match="DATA_DIR"):
        run_extraction(tiny_config(Path("/nonexistent"), dataset="folder", data_dir=None))
