"""Where the public datasets come from, and getting them into ``data/raw/<dataset>/``.

Each source lists files (URL, local name, checksum) and the folder the reader wants once
they are unpacked. Tests point ``SOURCES`` at ``file://`` fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .download import fetch, unpack


@dataclass(frozen=True)
class RemoteFile:
    url: str
    name: str
    checksum: str | None  # "md5:..." / "sha256:..."; None when no checksum is published
    unpack: bool = False


@dataclass(frozen=True)
class Source:
    files: tuple[RemoteFile, ...]
    ready: str  # a path, relative to the dataset root, that exists once everything is in place
    reader_root: str  # the folder (relative to the dataset root) to hand to the reader


SOURCES: dict[str, Source] = {
    # The Caltech data repository's CUB-200-2011 archive (1.1 GB); md5 as the common loaders pin it.
    "cub": Source((RemoteFile("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                              "CUB_200_2011.tgz", "md5:97eceeb196236b17998738112f37df78", unpack=True),),
                  "CUB_200_2011/images.txt", "CUB_200_2011"),
    # MIT Indoor 67 (2.4 GB) and the official split lists; no checksums are published for them.
    "mit67": Source((RemoteFile("http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar",
                                "indoorCVPR_09.tar", None, unpack=True),
                     RemoteFile("http://web.mit.edu/torralba/www/TrainImages.txt", "TrainImages.txt", None),
                     RemoteFile("http://web.mit.edu/torralba/www/TestImages.txt", "TestImages.txt", None)),
                    "Images", "."),
}


def manual_hint(name: str, root: Path) -> str:
    files = ", ".join(f.url for f in SOURCES[name].files)
    return (f"Offline or blocked? Download {files} yourself and put the file(s) in {root}/ (they are unpacked "
            f"and checked on the next run), or pass DATA_DIR=/path/to/the/unpacked/{name} folder.")


def ensure_downloaded(name: str, root: Path, progress: bool = True) -> Path:
    """The reader's folder for dataset ``name`` under ``root``, downloading and unpacking what is missing."""
    src = SOURCES[name]
    root = Path(root)
    if not (root / src.ready).exists():
        for f in src.files:
            local = fetch(f.url, root / f.name, f.checksum, manual_hint(name, root), progress)
            if f.unpack:
                unpack(local, root)
    return root / src.reader_root
