"""Public datasets: downloads (resume, checksums, offline message) and the MIT-67 / ImageNet / CUB
readers, each on a tiny fixture in its exact layout, made here from solid-colour images."""

from __future__ import annotations

import functools
import hashlib
import http.server
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpnet.extract import sources
from dpnet.extract.datasets import DatasetOptions, load_dataset
from dpnet.extract.download import DownloadError, fetch
from dpnet.errors import DatasetLayoutError
from dpnet.extract.pipeline import run_extraction
from tests.helpers import tiny_config


def solid(path: Path, colour: tuple[int, int, int], size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- downloads
def test_fetch_file_url_checks_the_checksum(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    with pytest.raises(DownloadError, match=r"md5 is .*expected 0+.*delete it"):
        fetch(src.as_uri(), tmp_path / "out" / "a.bin", "md5:" + "0" * 32, "HINT", progress=False)
    assert not (tmp_path / "out" / "a.bin").exists() and not (tmp_path / "out" / "a.bin.part").exists()
    got = fetch(src.as_uri(), tmp_path / "out" / "a.bin", md5(src), "HINT", progress=False)
    assert got.read_bytes() == src.read_bytes()


def test_fetch_offline_names_the_manual_route(tmp_path):
    with pytest.raises(DownloadError, match=r"could not download .*\nput it in /somewhere"):
        fetch("http://127.0.0.1:9/nothing.tgz", tmp_path / "x.tgz", None, "put it in /somewhere", progress=False)


@pytest.fixture
def http_server(tmp_path):
    handler = functools.partial(_RangeHandler, directory=str(tmp_path / "www"))
    (tmp_path / "www").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single-range requests (206), as real servers do."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        start = int(rng.split("=")[1].split("-")[0])
        data = path.read_bytes()[start:]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_fetch_resumes_a_partial_download_over_http(tmp_path, http_server):
    www, base = http_server
    payload = np.random.default_rng(0).bytes(300_000)
    (www / "big.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "big.bin"
    dest.parent.mkdir()
    dest.with_name("big.bin.part").write_bytes(payload[:123_456])  # an interrupted earlier run
    checksum = "sha256:" + hashlib.sha256(payload).hexdigest()
    assert fetch(f"{base}/big.bin", dest, checksum, "HINT", progress=False).read_bytes() == payload


# ----------------------------------------------------------------------------- CUB download
def make_cub(root: Path) -> None:
    """A 2-class CUB-200-2011 folder with 4 solid-colour images."""
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for i in range(1, 5):
        cls = 1 + (i - 1) % 2
        rel = f"00{cls}.Bird_{cls}/img_{i}.jpg"
        solid(root / "images" / rel, (60 * i, 200 - 40 * i, 90))
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {cls}")
        lines["train_test_split.txt"].append(f"{i} {int(i <= 2)}")
        lines["bounding_boxes.txt"].append(f"{i} 2.0 3.0 30.0 20.0")
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("1 001.Bird_1\n2 002.Bird_2\n")


def test_cub_downloads_unpacks_and_extracts(tmp_path, monkeypatch):
    make_cub(tmp_path / "src" / "CUB_200_2011")
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
    monkeypatch.chdir(tmp_path)  # data/raw/cub is relative to the working folder
    remote = sources.RemoteFile(archive.as_uri(), "CUB_200_2011.tgz", "md5:" + "1" * 32, unpack=True)
    monkeypatch.setitem(sources.SOURCES, "cub", sources.Source((remote,), "CUB_200_2011/images.txt", "CUB_200_2011"))
    with pytest.raises(DownloadError, match="DATA_DIR="):
        load_dataset("cub")
    remote = sources.RemoteFile(archive.as_uri(), "CUB_200_2011.tgz", md5(archive), unpack=True)
    monkeypatch.setitem(sources.SOURCES, "cub", sources.Source((remote,), "CUB_200_2011/images.txt", "CUB_200_2011"))
    index = load_dataset("cub")
    assert [r.is_train for r in index.records] == [True, True, False, False]
    assert index.classes == ["001.Bird_1", "002.Bird_2"] and index.bboxes[3] == (2.0, 3.0, 30.0, 20.0)
    summary = run_extraction(tiny_config(tmp_path, dataset="cub", data_dir=None, out_root=str(tmp_path / "cache")))
    assert summary.images == 4
    # DATA_DIR may name the archive's top folder or the CUB_200_2011 folder inside it
    assert len(load_dataset("cub", DatasetOptions(data_dir=str(tmp_path / "src"))).records) == 4


# -------------------------------------------------------------------------------------- MIT-67
def make_mit67(root: Path) -> None:
    rows = {"TrainImages.txt": [], "TestImages.txt": []}
    for c, cname in enumerate(["bakery", "living room"[:6] + "_room"]):
        for i in range(3):
            rel = f"{cname}/photo {i} of {cname}.jpg"  # spaces in file names, as in the real set
            solid(root / "Images" / rel, (80 * c, 40 * i, 120))
            rows["TrainImages.txt" if i < 2 else "TestImages.txt"].append(rel)
    solid(root / "Images" / "bakery" / "not in any list.jpg", (1, 2, 3))
    for name, r in rows.items():
        (root / name).write_text("\n".join(r) + "\n")


def test_mit67_split_files_decide_and_spaces_work(tmp_path):
    make_mit67(tmp_path / "mit")
    index = load_dataset("mit67", DatasetOptions(data_dir=str(tmp_path / "mit")))
    assert index.classes == ["bakery", "living_room"]
    assert len(index.records) == 6 and sum(r.is_train for r in index.records) == 4
    assert all(" " in r.path for r in index.records)
    summary = run_extraction(tiny_config(tmp_path, dataset="mit67", data_dir=str(tmp_path / "mit")))
    assert summary.images == 6


def test_mit67_bad_layout_names_the_fix(tmp_path):
    (tmp_path / "mit" / "Images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="missing TrainImages.txt, TestImages.txt"):
        load_dataset("mit67", DatasetOptions(data_dir=str(tmp_path / "mit")))


# ------------------------------------------------------------------------------------ ImageNet
def test_imagenet_val_helper_and_reader(tmp_path):
    from scipy.io import savemat

    from dpnet.extract.imagenet_val import arrange_val

    root = tmp_path / "ILSVRC2012"
    wnids = ["n02000002", "n01000001"]  # meta.mat order is not sorted order
    for w in wnids:
        for i in range(2):
            solid(root / "train" / w / f"{w}_{i}.JPEG", (10, 20 * i, 30))
    truth = [1, 2, 2, 1]
    for k in range(4):
        solid(root / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG", (200, 10 * k, 10))
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, truth)) + "\n")
    synsets = np.array([(i + 1, w) for i, w in enumerate(wnids)], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    savemat(devkit / "meta.mat", {"synsets": synsets})
    with pytest.raises(DatasetLayoutError, match="imagenet_val"):
        load_dataset("imagenet", DatasetOptions(data_dir=str(root)))
    assert arrange_val(root / "val", tmp_path / "devkit") == 4
    assert sorted(p.name for p in (root / "val" / "n02000002").iterdir()) == ["ILSVRC2012_val_00000001.JPEG",
                                                                            "ILSVRC2012_val_00000004.JPEG"]
    index = load_dataset("imagenet", DatasetOptions(data_dir=str(root)))
    assert index.classes == sorted(wnids)  # class index follows sorted WNIDs
    val = [r for r in index.records if not r.is_train]
    assert len(val) == 4 and {r.label for r in val if "00000001" in r.path} == {1}


# ------------------------------------------------------------------------------ CUB box crop
def test_crop_box_and_pixel_mapping():
    from dpnet.extract.regions import boxes_to_pixels, crop_box

    assert crop_box((10.4, 5.6, 20.0, 30.0), (100, 50)) == (10, 5, 31, 36)
    assert crop_box((95.0, -3.0, 20.0, 2.0), (100, 50)) == (92, 0, 100, 8)  # clipped, grown to 8 px
    boxes = np.array([[[0, 0, 4, 4], [1, 2, 3, 4]]])
    crops = np.array([[10.0, 20.0, 50.0, 100.0]])  # a 40 x 80 crop at (10, 20)
    px = boxes_to_pixels(boxes, (4, 4), np.array([[999, 999]]), crops)
    np.testing.assert_allclose(px[0, 0], [10, 20, 50, 100])
    np.testing.assert_allclose(px[0, 1], [20, 60, 40, 100])


def test_load_rgb_crops_to_the_box_before_resizing(tmp_path):
    from dpnet.extract.images import load_rgb

    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (20, 10, 44, 30))  # a red 24 x 20 block
    img.save(tmp_path / "a.png")
    arr, orig = load_rgb(tmp_path / "a.png", 16, bbox=(20, 10, 24, 20))
    assert orig == (60, 40) and arr.shape == (16, 16, 3)
    assert (arr[..., 0] > 200).all() and (arr[..., 2] < 50).all()


def test_crop_option_extracts_recorded_and_refused_without_boxes(tmp_path):
    plain = run_extraction(tiny_config(tmp_path / "p"))
    cropped = run_extraction(tiny_config(tmp_path / "p", crop=True))
    assert cropped.cache_dir.name.endswith("-crop") and cropped.cache_dir != plain.cache_dir
    import json

    manifest = json.loads((cropped.cache_dir / "manifest.json").read_text())
    assert manifest["config"]["crop"] is True
    from dpnet.extract.cache import RegionCache

    a, b = RegionCache(plain.cache_dir).load_shard(0), RegionCache(cropped.cache_dir).load_shard(0)
    assert np.array_equal(a["boxes"], b["boxes"]) and not np.array_equal(a["regions"], b["regions"])
    make_mit67(tmp_path / "mit")
    with pytest.raises(DatasetLayoutError, match="CROP=1 needs an object box"):
        run_extraction(tiny_config(tmp_path, dataset="mit67", data_dir=str(tmp_path / "mit"), crop=True))
