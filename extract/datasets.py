"""Dataset readers, created by name: each lists its images with labels and split.

A reader returns a :class:`DatasetIndex`: the class names and one :class:`ImageRecord` per
image. ``synth`` is generated on first use and read through exactly the CUB reader.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dpnet.errors import DatasetLayoutError, UnknownNameError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageRecord:
    """One image. ``path`` is relative to the dataset root; ``label`` is 0-based."""

    image_id: int
    path: str
    label: int
    is_train: bool


@dataclass
class DatasetIndex:
    """Everything a dataset says about its images.

    Attributes:
        name: registry name of the dataset.
        root: folder the record paths are relative to.
        classes: class names, index = label.
        records: one per image, in the dataset's own order.
        bboxes: optional {image_id: (x, y, w, h)} object box in original pixels.
        part_names: optional names of annotated keypoints.
        part_locs: optional {image_id: array (K, 3) of x, y, visible}.
    """

    name: str
    root: Path
    classes: list[str]
    records: list[ImageRecord]
    bboxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    part_names: list[str] = field(default_factory=list)
    part_locs: dict[int, np.ndarray] = field(default_factory=dict)
    image_dir: str = ""  # the folder under ``root`` that record paths start in ("images" in the CUB layout)

    def image_file(self, rel: str) -> Path:
        """The file of a record's ``path``."""
        return Path(self.root) / self.image_dir / rel  # an empty image_dir adds nothing


@dataclass
class DatasetOptions:
    """Options shared by the readers (each uses the ones it needs)."""

    data_dir: str | None = None
    test_fraction: float = 0.5
    synth_classes: int = 10
    synth_per_class: int = 60
    synth_image_size: int = 256
    synth_seed: int = 0


_REGISTRY: dict[str, Callable[[DatasetOptions], DatasetIndex]] = {}


def register_dataset(name: str) -> Callable:
    """Decorator adding a reader ``fn(options) -> DatasetIndex`` to the registry."""

    def wrap(fn: Callable[[DatasetOptions], DatasetIndex]) -> Callable[[DatasetOptions], DatasetIndex]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def load_dataset(name: str, options: DatasetOptions | None = None) -> DatasetIndex:
    """Read (or, for ``synth``, generate then read) a dataset by name."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    index = _REGISTRY[name](options or DatasetOptions())
    refuse_unsafe_names(index)
    return index


def refuse_unsafe_names(index: DatasetIndex) -> None:
    """Image paths holding a tab, a line break of any kind (``\\n``, ``\\r``, U+0085, U+2028, ...) or
    another control character cannot be stored one per line in a cache's image table: refused here,
    before anything is written, naming every such file."""
    _refuse_files([ascii(r.path) for r in index.records if _unsafe(r.path)],
                  f"image path(s) under {index.root} hold a tab, a line break or another control character, which a "
                  f"cache's image table cannot store", "rename them (or move them out), then run again.")


def _refuse_files(bad: list[str], what: str, fix: str) -> None:
    """A DatasetLayoutError listing (up to 20 of) the files in ``bad``, when there are any."""
    if bad:
        shown = "\n".join(f"  {b}" for b in bad[:20])
        raise DatasetLayoutError(f"{len(bad)} {what}:\n{shown}\n{fix}")


def _unsafe(path: str) -> bool:
    import unicodedata

    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in path) or len(path.splitlines()) != 1


def default_root(name: str) -> Path:
    """``data/raw/<name>`` under the current directory: where raw datasets live."""
    return Path("data") / "raw" / name


# ----------------------------------------------------------------------------- CUB layout

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def checked_relative(rel: str, where: str) -> str:
    """``rel`` when it is a relative path that stays inside the dataset folder, else a clear error.

    Dataset files are read as ``root / rel``; an absolute path or a ``..`` step would read files
    outside the dataset, so both are refused, naming the line they came from.
    """
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith(("/", "\\")) or ".." in parts or (len(rel) > 1 and rel[1] == ":"):
        raise DatasetLayoutError(f"{where}: image path {rel!r} leaves the dataset folder (absolute, or with a "
                                 f"'..' step). Paths must be relative to the dataset folder: fix that line.")
    return rel


def _read_table(path: Path, n_fields: int, what: str) -> list[list[str]]:
    """Split each non-empty line of a CUB text file into n_fields (the last keeps its spaces)."""
    return [parts for _, parts in _read_lines(path, n_fields, what)]


def _read_lines(path: Path, n_fields: int, what: str) -> list[tuple[int, list[str]]]:
    """Like :func:`_read_table`, each row with its line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetLayoutError(f"{path} is not UTF-8 text ({exc}): save it as UTF-8") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=n_fields - 1)
        if len(parts) != n_fields:
            raise DatasetLayoutError(f"{path}:{lineno}: expected {what}, got {line!r}")
        rows.append((lineno, parts))
    return rows


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetLayoutError(f"{where}: expected an integer id, got {text!r}") from None


def _read_labels(path: Path) -> dict[int, int]:
    """``image_class_labels.txt``: image id -> 0-based label, from 1-based integer class ids."""
    out = {}
    for lineno, (i, c) in _read_lines(path, 2, '"id class"'):
        try:
            image_id, class_id = int(i), int(c)
        except ValueError:
            raise DatasetLayoutError(f"{path}:{lineno}: expected an image id and a class id (integers), got "
                                     f"{i!r} {c!r}") from None
        if class_id < 1:
            raise DatasetLayoutError(f"{path}:{lineno}: class ids start at 1 in the CUB layout, got {class_id}: "
                                     f"number the classes 1, 2, ... (classes.txt names them)")
        out[image_id] = class_id - 1
    return out


def read_cub(root: str | Path, name: str = "cub") -> DatasetIndex:
    """Read a folder in the CUB-200-2011 layout.

    Files: ``images.txt`` "id path", ``image_class_labels.txt`` "id class" (1-based),
    ``train_test_split.txt`` "id is_train", optional ``classes.txt`` "class name",
    ``bounding_boxes.txt`` "id x y w h", ``parts/parts.txt`` "part_id name",
    ``parts/part_locs.txt`` "id part_id x y visible".
    """
    root = Path(root)
    missing = [f for f in CUB_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{root} is not a CUB-200-2011 folder: missing {', '.join(missing)}. Point DATA_DIR at the "
            f"folder that holds images.txt and images/ (for the official archive: CUB_200_2011/).")
    paths = {_int(i, f"{root / 'images.txt'}:{lineno}"): checked_relative(p, f"{root / 'images.txt'}:{lineno}")
             for lineno, (i, p) in _read_lines(root / "images.txt", 2, '"id relative/path.jpg"')}
    labels = _read_labels(root / "image_class_labels.txt")
    split = {_int(i, f"{root / 'train_test_split.txt'}:{n}"): t.strip() == "1"
             for n, (i, t) in _read_lines(root / "train_test_split.txt", 2, '"id is_train"')}
    for fname, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        lacking = sorted(set(paths) - set(table))
        if lacking:
            raise DatasetLayoutError(f"{root / fname} has no line for image id(s) {lacking[:10]}")
    n_classes = max(labels.values()) + 1
    classes = [str(c) for c in range(1, n_classes + 1)]
    if (root / "classes.txt").is_file():
        for cid, cname in _read_table(root / "classes.txt", 2, '"class_id name"'):
            if 1 <= int(cid) <= n_classes:
                classes[int(cid) - 1] = cname
    records = [ImageRecord(i, paths[i], labels[i], split[i]) for i in sorted(paths)]
    index = DatasetIndex(name, root, classes, records, image_dir="images")
    _read_cub_annotations(root, index)
    return index


def _read_cub_annotations(root: Path, index: DatasetIndex) -> None:
    """Boxes and keypoints, when the folder has them."""
    if (root / "bounding_boxes.txt").is_file():
        for row in _read_table(root / "bounding_boxes.txt", 5, '"id x y w h"'):
            index.bboxes[int(row[0])] = tuple(float(v) for v in row[1:])
    parts_file, locs_file = root / "parts" / "parts.txt", root / "parts" / "part_locs.txt"
    if parts_file.is_file() and locs_file.is_file():
        index.part_names = [n for _, n in _read_table(parts_file, 2, '"part_id name"')]
        k = len(index.part_names)
        for row in _read_table(locs_file, 5, '"id part_id x y visible"'):
            img, part = int(row[0]), int(row[1]) - 1
            locs = index.part_locs.setdefault(img, np.zeros((k, 3), np.float32))
            locs[part] = [float(row[2]), float(row[3]), float(row[4])]


@register_dataset("cub")
def _cub(options: DatasetOptions) -> DatasetIndex:
    if options.data_dir:
        root = Path(options.data_dir)
        inner = root / "CUB_200_2011"
        return read_cub(inner if not (root / "images.txt").is_file() and (inner / "images.txt").is_file() else root)
    if (default_root("cub") / "images.txt").is_file():  # unpacked there by hand
        return read_cub(default_root("cub"))
    from .sources import ensure_downloaded

    return read_cub(ensure_downloaded("cub", default_root("cub")), "cub")


@register_dataset("synth")
def _synth(options: DatasetOptions) -> DatasetIndex:
    from .synth import SynthSpec, ensure_synth

    root = Path(options.data_dir) if options.data_dir else default_root("synth")
    spec = SynthSpec(options.synth_classes, options.synth_per_class, options.synth_image_size, options.synth_seed)
    ensure_synth(root, spec)
    return read_cub(root, "synth")


# -------------------------------------------------------------------------- folder layout

def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _refuse_undecodable(paths: list[Path], root: Path) -> None:
    """File names that are not UTF-8 cannot be listed in a cache's image table: name them all."""
    bad = []
    for p in paths:
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            bad.append(str(os.fsencode(p)))
    _refuse_files(bad, f"file name(s) under {root} are not valid UTF-8",
                  f"rename them (for example with `convmv -f latin1 -t utf8 -r --notest {root}`) or move them out, "
                  f"then run again.")


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) from a string (crc32), for splits that never reshuffle."""
    return zlib.crc32(text.encode("utf-8")) / 2**32


def read_folder(root: str | Path, test_fraction: float = 0.5, name: str = "folder",
                test_dir: str = "test") -> DatasetIndex:
    """Read an ImageFolder layout: ``train/<class>/*`` and ``test/<class>/*``, or ``<class>/*``.

    Without ``train/`` and ``test/``, each class is split on its own: an image goes to test
    when the hash of its file name falls below ``test_fraction``, so adding images never
    moves the others. Image ids are 1-based positions in sorted path order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"DATA_DIR {root} does not exist or is not a folder")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    presplit = (root / "train").is_dir() and (root / test_dir).is_dir()
    bases = [root / "train", root / test_dir] if presplit else [root]
    _refuse_undecodable([d for b in bases for d in b.iterdir()], root)
    classes = sorted({d.name for b in bases for d in b.iterdir() if d.is_dir()})
    if not classes:
        raise DatasetLayoutError(
            f"{root} holds no class folders. Expected <class>/<image> or train/<class>/<image> and "
            f"test/<class>/<image> (the ImageFolder layout).")
    entries = []
    for base in bases:
        for label, cname in enumerate(classes):
            found = _images_in(base / cname)
            _refuse_undecodable(found, root)
            for p in found:
                rel = p.relative_to(root).as_posix()
                is_train = base.name == "train" if presplit else hash_fraction(p.name) >= test_fraction
                entries.append((rel, label, is_train))
    if not entries:
        raise DatasetLayoutError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    entries.sort()
    records = [ImageRecord(i + 1, rel, label, tr) for i, (rel, label, tr) in enumerate(entries)]
    return DatasetIndex(name, root, classes, records)


@register_dataset("folder")
def _folder(options: DatasetOptions) -> DatasetIndex:
    if not options.data_dir:
        raise DatasetLayoutError("DATASET=folder needs DATA_DIR=/path/to/class/folders")
    return read_folder(options.data_dir, options.test_fraction)


# --------------------------------------------------------------------------------- MIT-67

def read_mit67(root: str | Path) -> DatasetIndex:
    """MIT Indoor 67: ``Images/<class>/<file>`` plus ``TrainImages.txt`` / ``TestImages.txt``
    (lines "class/file.jpg"; file names may hold spaces). The split files decide the split;
    images in neither are left out. Classes are the sorted folder names."""
    root = Path(root)
    missing = [f for f in ("Images", "TrainImages.txt", "TestImages.txt") if not (root / f).exists()]
    if missing:
        raise DatasetLayoutError(f"{root} is not an MIT Indoor 67 folder: missing {', '.join(missing)}. Point "
                                 f"DATA_DIR at the folder holding Images/, TrainImages.txt and TestImages.txt.")
    classes = sorted(d.name for d in (root / "Images").iterdir() if d.is_dir())
    label = {c: i for i, c in enumerate(classes)}
    entries = []
    for fname, is_train in (("TrainImages.txt", True), ("TestImages.txt", False)):
        for lineno, line in enumerate((root / fname).read_text().splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            cname = rel.split("/", 1)[0]
            checked_relative(rel, f"{root / fname}:{lineno}")
            if cname not in label or "/" not in rel:
                raise DatasetLayoutError(f"{root / fname}:{lineno}: expected class/file.jpg with a class of Images/, "
                                         f"got {rel!r}")
            entries.append((f"Images/{rel}", label[cname], is_train))
    entries.sort()
    records = [ImageRecord(i + 1, rel, lab, tr) for i, (rel, lab, tr) in enumerate(entries)]
    return DatasetIndex("mit67", root, classes, records)


@register_dataset("mit67")
def _mit67(options: DatasetOptions) -> DatasetIndex:
    if options.data_dir:
        return read_mit67(options.data_dir)
    from .sources import ensure_downloaded

    return read_mit67(ensure_downloaded("mit67", default_root("mit67")))


# ------------------------------------------------------------------------------- ImageNet

def read_imagenet(root: str | Path) -> DatasetIndex:
    """ILSVRC-2012 as ``train/<wnid>/*`` and ``val/<wnid>/*`` (see ``python -m dpnet.extract.imagenet_val``
    to arrange the flat validation folder). Class index = position of the WNID in sorted order."""
    root = Path(root)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise DatasetLayoutError(f"{root} needs train/<wnid>/ and val/<wnid>/ folders. For the official flat val "
                                 f"folder run: python -m dpnet.extract.imagenet_val {root / 'val'} --devkit <devkit folder>")
    flat = [p for p in (root / "val").iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if flat:
        raise DatasetLayoutError(f"{root / 'val'} holds {len(flat)} images directly (the official flat layout): run "
                                 f"python -m dpnet.extract.imagenet_val {root / 'val'} --devkit <devkit folder> first")
    return read_folder(root, name="imagenet", test_dir="val")


@register_dataset("imagenet")
def _imagenet(options: DatasetOptions) -> DatasetIndex:
    if not options.data_dir:
        raise DatasetLayoutError("DATASET=imagenet needs DATA_DIR=/path/to/ILSVRC2012 (train/ and val/); "
                                 "ImageNet cannot be downloaded without an account")
    return read_imagenet(options.data_dir)
