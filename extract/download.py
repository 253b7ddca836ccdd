"""Dataset downloads: resumable, checksum-verified, atomic; a clear message when offline.

``fetch(url, dest, checksum)`` continues a partial ``dest.part`` with an HTTP Range request
(or from a ``file://`` URL), verifies ``md5:`` / ``sha256:`` checksums, then renames into
place. ``unpack(archive, into)`` extracts tar/zip archives into a temporary folder first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from dpnet.errors import DpnetError
from dpnet.files import remove_stale_temps

log = logging.getLogger(__name__)


class DownloadError(DpnetError):
    """A download failed or its checksum did not match; says where to put the file instead."""


def file_checksum(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, checksum: str | None) -> None:
    """Raise DownloadError unless ``path`` matches ``checksum`` ("md5:..." or "sha256:..."; None: no check)."""
    if not checksum:
        log.warning("%s: no published checksum to verify against", path)
        return
    algo, _, want = checksum.partition(":")
    got = file_checksum(path, algo)
    if got != want.lower():
        raise DownloadError(f"{path}: {algo} is {got}, expected {want}. The file is damaged or not the "
                            f"official one: delete it and download again.")


def fetch(url: str, dest: Path, checksum: str | None, manual_hint: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify, rename; returns ``dest``.

    Raises:
        DownloadError: offline, HTTP error or checksum mismatch; ``manual_hint`` says what to do.
    """
    dest = Path(dest)
    if dest.is_file():
        verify(dest, checksum)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resumed = start and (getattr(resp, "status", None) == 206 or url.startswith("file:"))
            if url.startswith("file:") and start:
                resp.read(start)  # file:// has no Range: skip what we already have
            total = int(resp.headers.get("Content-Length") or 0) + (start if resumed and not url.startswith("file:") else 0)
            mode = "ab" if resumed else "wb"
            with open(part, mode) as out, tqdm(total=total or None, initial=start if resumed else 0, unit="B",
                                               unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"could not download {url} ({exc}).\n{manual_hint}\n"
                            f"(A partial file {part} is kept; running again resumes it.)") from exc
    try:
        verify(part, checksum)
    except DownloadError as exc:
        part.unlink(missing_ok=True)  # a wrong file is never resumed
        raise DownloadError(f"{exc} (from {url})\n{manual_hint}") from exc
    os.replace(part, dest)
    return dest


def unpack(archive: Path, into: Path) -> Path:
    """Extract a .tar/.tgz/.zip archive into ``into`` (through a temporary sibling; atomic)."""
    if into.parent.is_dir():
        remove_stale_temps(into.parent, prefix=into.name + ".")  # what killed unpacks left
    tmp = into.with_name(into.name + f".unpack-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    into.parent.mkdir(parents=True, exist_ok=True)
    if into.exists():
        for child in tmp.iterdir():
            os.replace(child, into / child.name)
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, into)
    return into
