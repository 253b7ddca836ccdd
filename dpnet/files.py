"""Files every stage writes: atomically, under a folder lock, with clear errors.

- Writes go to a temporary sibling ``<name>.tmp-<pid>`` that is renamed over the target, so a
  killed process never leaves a half-written file under the real name.
- :func:`remove_stale_temps` removes the temporary files of processes that have died.
- :class:`FolderLock` keeps a second process out of a cache or run folder while one works in it.
- A write that fails for lack of space becomes a :class:`~dpnet.errors.DiskFullError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CacheIncompleteError, DiskFullError, DpnetError, InUseError

TEMP_NAME = re.compile(r"\.(?:tmp|unpack|old)-(\d+)$")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
LOW_SPACE = 16 << 20  # a failed write with less than this left on its disk is taken as a full disk


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """The temporary sibling this process writes ``path`` through: ``<name>.<kind>-<pid>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{kind}-{os.getpid()}")


def remove(path: Path) -> None:
    """Remove a file or a folder tree; nothing when it is absent."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def disk_full_error(path: Path, exc: BaseException) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``path`` when ``exc`` is a write that ran out of space, else None.

    ``OSError`` carries its errno; torch's zip writer raises a plain ``RuntimeError`` ("file write
    failed"), taken as a full disk when little space is left where it wrote.
    """
    full = isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
    if not full and isinstance(exc, RuntimeError) and re.search(r"write|unexpected pos|iostream", str(exc)):
        full = _free_bytes(Path(path).parent) < LOW_SPACE
    if not full:
        return None
    path = getattr(exc, "filename", None) or path  # the file that failed, when the error says
    free = _free_bytes(Path(path).parent)
    return DiskFullError(f"no space left on the disk to write {path} ({free / 2**20:.1f} MiB free there): free "
                         f"some space, then run the same command again. What was finished before is kept.")


def _free_bytes(folder: Path) -> float:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return float(shutil.disk_usage(folder).free)
    except OSError:
        return float("inf")


@contextlib.contextmanager
def disk_full_as_error(path: Path) -> Iterator[None]:
    """Turn an out-of-space error raised inside the block into a DiskFullError naming ``path``."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(path, exc)
        if full is None:
            raise
        raise full from exc


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; renamed into place on success, removed on failure."""
    path = Path(path)
    tmp = temp_path(path)
    remove(tmp)
    try:
        with disk_full_as_error(path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: Path, fix: str, error: Callable[[str], DpnetError] = CacheIncompleteError) -> Any:
    """Parse a JSON file; a damaged one raises ``error`` naming it and ``fix`` (missing: FileNotFoundError)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{path} is damaged ({type(exc).__name__}: {exc}): {fix}") from exc


# ------------------------------------------------------------------------------- dead temps
def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, prefix: str = "") -> list[Path]:
    """Remove the entries of ``folder`` named ``<prefix>...(.tmp|.unpack|.old)-<pid>`` whose process is dead.

    Only ``folder`` itself is listed (not its sub-folders): callers name each folder where their
    temporary files live. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in list(folder.iterdir()):
        found = TEMP_NAME.search(entry.name)
        if found and entry.name.startswith(prefix):
            pid = int(found.group(1))
            if pid != os.getpid() and not pid_alive(pid):
                remove(entry)
                removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------ locks
class FolderLock:
    """An exclusive lock on a folder, held from ``acquire`` (or ``with``) to ``release``.

    It is an ``flock`` on ``<folder>/<name>``, which the kernel drops when the holder dies, so a
    killed process never leaves its folder locked. The holder's pid is written in the file, so a
    second process is told who holds it. The lock file itself stays (it is not garbage).

    Args:
        folder: the folder to lock (created when missing).
        what: what the holder does there, for the message ("extraction", "training").
        name: the lock file's name (ranks of one job each lock a name of their own).
    """

    def __init__(self, folder: Path, what: str, name: str = ".lock"):
        self.folder, self.what, self.name = Path(folder), what, name
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / self.name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise InUseError(f"{self.folder} is in use by pid {holder} ({self.what}). Wait for it to finish or "
                             f"stop it (kill {holder}); a stopped run resumes where it left off.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The pid the holder wrote (it may be writing it right now: read a few times)."""
    import time

    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"
