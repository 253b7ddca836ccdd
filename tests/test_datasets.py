from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpnet.extract.datasets import DatasetOptions, load_dataset, read_cub, read_folder
from dpnet.errors import DatasetLayoutError, UnknownNameError
from dpnet.extract.synth import HEAD_STYLES, SynthSpec, _HEAD_COLORS, ensure_synth


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s") / "synth"
    ensure_synth(root, SynthSpec(n_classes=10, per_class=4, image_size=128, seed=3))
    return root


def test_synth_parses_with_cub_reader(synth_root):
    idx = read_cub(synth_root)
    assert len(idx.records) == 40 and len(idx.classes) == 10
    assert sorted({r.label for r in idx.records}) == list(range(10))
    assert sum(r.is_train for r in idx.records) == 20
    assert idx.part_names == ["head", "wing", "tail", "marking"]
    assert set(idx.bboxes) == set(idx.part_locs) == {r.image_id for r in idx.records}
    assert all((synth_root / "images" / r.path).is_file() for r in idx.records)


def test_synth_keypoints_fall_inside_drawn_parts(synth_root):
    idx = read_cub(synth_root)
    for r in idx.records:
        img = np.asarray(Image.open(synth_root / "images" / r.path).convert("RGB")).astype(int)
        x, y, w, h = idx.bboxes[r.image_id]
        locs = idx.part_locs[r.image_id]
        for kx, ky, vis in locs:
            assert vis == 1 and x - 1 <= kx <= x + w + 1 and y - 1 <= ky <= y + h + 1
        # the head keypoint sits on the head: near its colour (ringed heads have a colour core)
        colour = np.array(_HEAD_COLORS[HEAD_STYLES[r.label % 5].split("_")[0]])
        hx, hy = int(round(locs[0, 0])), int(round(locs[0, 1]))
        patch = img[max(0, hy - 3):hy + 4, max(0, hx - 3):hx + 4].reshape(-1, 3)
        assert np.abs(patch - colour).sum(1).min() < 90, r.path


def test_synth_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    spec = SynthSpec(n_classes=2, per_class=3, image_size=48, seed=5)
    ensure_synth(a, spec), ensure_synth(b, spec)
    for f in ("images.txt", "bounding_boxes.txt", "parts/part_locs.txt", "train_test_split.txt"):
        assert (a / f).read_text() == (b / f).read_text()
    img = "images/001.red_plain_white_bar/001.red_plain_white_bar_0000.jpg"
    assert (a / img).read_bytes() == (b / img).read_bytes()


def test_synth_refuses_other_spec_in_same_folder(tmp_path):
    ensure_synth(tmp_path / "s", SynthSpec(n_classes=2, per_class=2, image_size=48))
    with pytest.raises(DatasetLayoutError, match="Delete"):
        ensure_synth(tmp_path / "s", SynthSpec(n_classes=3, per_class=2, image_size=48))


def test_cub_missing_layout_files_named(tmp_path):
    (tmp_path / "images.txt").write_text("1 a/b.jpg\n")
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt, train_test_split.txt"):
        read_cub(tmp_path)


def test_cub_malformed_line_named(tmp_path):
    (tmp_path / "images.txt").write_text("1 a.jpg\n2\n")
    (tmp_path / "image_class_labels.txt").write_text("1 1\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DatasetLayoutError, match=r"images.txt:2"):
        read_cub(tmp_path)


def _write_folder(root: Path, names: dict[str, list[str]]) -> None:
    for cls, files in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            Image.new("RGB", (10, 10), (1, 2, 3)).save(root / cls / f)


def test_folder_hash_split_is_stable_when_images_are_added(tmp_path):
    _write_folder(tmp_path, {"a": [f"{i}.png" for i in range(20)], "b": [f"{i}.png" for i in range(20)]})
    before = {r.path: r.is_train for r in read_folder(tmp_path, 0.5).records}
    assert 0 < sum(before.values()) < 40
    _write_folder(tmp_path, {"a": [f"new{i}.png" for i in range(5)]})
    after = {r.path: r.is_train for r in read_folder(tmp_path, 0.5).records}
    assert all(after[p] == t for p, t in before.items())


def test_folder_train_test_subfolders(tmp_path):
    _write_folder(tmp_path / "train", {"x": ["1.png", "2.png"], "y": ["1.png"]})
    _write_folder(tmp_path / "test", {"x": ["3.png"], "y": ["2.png"]})
    idx = read_folder(tmp_path)
    assert idx.classes == ["x", "y"]
    assert sorted((r.path, r.label, r.is_train) for r in idx.records)[0] == ("test/x/3.png", 0, False)
    assert sum(r.is_train for r in idx.records) == 3


def test_folder_without_classes_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        read_folder(tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        read_folder(tmp_path / "nope")


def test_unknown_dataset_lists_known():
    with pytest.raises(UnknownNameError, match="known datasets: cub, folder, imagenet, mit67, synth"):
        load_dataset("imagenet21k", DatasetOptions())
