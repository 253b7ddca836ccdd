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
import logging
import os
import stat
import zlib
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CacheIncompleteError, DiskFullError, DpnetError, InUseError, NotWritableError, OutputExistsError

log = logging.getLogger(__name__)

TEMP_NAME = re.compile(r"\.(?:tmp|unpack|old)-(\d+)$")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
LOW_SPACE = 16 << 20  # a failed write with less than this left on its disk is taken as a full disk


NAME_MAX = 255  # bytes in one path component on the filesystems dpnet meets


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """The temporary sibling this process writes ``path`` through: ``<name>.<kind>-<pid>``.

    A name so long that the suffix would pass the file-name limit is cut first and keeps a hash
    of the whole, so two long names never share a temporary path.
    """
    path = Path(path)
    suffix = f".{kind}-{os.getpid()}"
    name = path.name
    if len(name.encode()) + len(suffix) > NAME_MAX:
        tag = f"~{zlib.crc32(name.encode()):08x}"
        room = NAME_MAX - len(suffix) - len(tag)
        name = name.encode()[:room].decode(errors="ignore") + tag
    return path.with_name(name + suffix)


def safe_name(text: str, limit: int = 100) -> str:
    """A file-name component made from ``text`` (an image's stem, a user's label) that is always one
    plain entry of a folder: never empty, ``.`` or ``..``, no separators or control characters, at
    most ``limit`` characters (a longer one keeps a hash of the whole)."""
    name = re.sub(r"[^\w.+-]+", "_", text, flags=re.UNICODE).strip("._") or "image"
    if len(name) > limit:
        name = name[:limit - 9] + f"~{zlib.crc32(text.encode()):08x}"
    return name


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


def not_writable_error(path: Path, exc: BaseException, fix: str) -> NotWritableError | None:
    """A :class:`NotWritableError` when ``exc`` is a write refused by permissions or a read-only disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = getattr(exc, "filename", None) or path
        a, b = Path(where).absolute(), Path(path).absolute()
        if not (a == b or b in a.parents or a in b.parents):
            return None  # a file read elsewhere (an image, a dataset file): not an output
        return NotWritableError(f"cannot write {where} ({exc.strerror}): {fix}")
    return None


@contextlib.contextmanager
def output_errors(path: Path, fix: str = "make it writable, or write elsewhere") -> Iterator[None]:
    """Writes inside the block that fail for lack of space or permission become clear errors naming ``path``."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        err = disk_full_error(path, exc) or not_writable_error(path, exc, fix)
        if err is None:
            raise
        raise err from exc


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


# ---------------------------------------------------------------------------- owned folders
OWNER_MARK = ".dpnet-output"


def mark_owned(folder: Path, what: str) -> None:
    """Mark ``folder`` (being written) as an output of dpnet's ``what``: only such folders are ever replaced."""
    (Path(folder) / OWNER_MARK).write_text(f"{what}\n", encoding="utf-8")


def owned_by(folder: Path, what: str, legacy: str = "") -> bool:
    """Whether ``folder`` is a real folder that dpnet's ``what`` wrote: it holds the mark, or (made by an
    older version, before marks) only entries whose names match the pattern ``legacy``."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    mark = folder / OWNER_MARK
    if mark.is_file() and not mark.is_symlink():
        return mark.read_text(encoding="utf-8", errors="replace").strip() == what
    names = {p.name for p in folder.iterdir()}
    return bool(legacy) and bool(names) and all(re.fullmatch(legacy, n) or TEMP_NAME.search(n) for n in names)


def claim_folder(folder: Path, what: str, legacy: str = "") -> Path:
    """Make sure ``folder`` is dpnet's to write in for ``what``, before anything is written there.

    A missing or empty folder is fine (it is marked once created); so is one that ``what`` wrote
    (:func:`owned_by`, ``legacy`` naming what an older version left). Anything else is a user's
    folder: refused, untouched.

    Raises:
        OutputExistsError: the folder holds files dpnet did not write (names a few).
    """
    folder = Path(folder)
    _refuse_dangling_link(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} exists and is not a folder: pass another path")
    if folder.is_dir() and any(folder.iterdir()) and not owned_by(folder, what, legacy):
        theirs = sorted(p.name for p in folder.iterdir())[:5]
        raise OutputExistsError(f"{folder} already holds files dpnet's {what} did not write ({', '.join(theirs)}"
                                f"{', ...' if len(theirs) == 5 else ''}): nothing there was touched. Pass a new "
                                f"folder (or an empty one).")
    return folder


def keep_mark(folder: Path, what: str) -> None:
    """Mark a claimed folder (see :func:`claim_folder`) once it exists, unless it is marked already."""
    mark = Path(folder) / OWNER_MARK
    if not mark.exists():
        mark_owned(folder, what)


def replace_owned_folder(tmp: Path, final: Path, what: str, legacy: str = "") -> None:
    """Move the finished folder ``tmp`` to ``final``. An existing ``final`` is replaced only when it is an
    output of ``what`` (see :func:`owned_by`); anything else there is left alone and refused.

    Raises:
        OutputExistsError: ``final`` exists and dpnet did not write it (``tmp`` is removed).
    """
    tmp, final = Path(tmp), Path(final)
    if final.is_symlink() or final.exists():
        if not owned_by(final, what, legacy):
            remove(tmp)
            raise OutputExistsError(f"{final} exists and was not written by dpnet's {what}: it is left as it is. "
                                    f"Pass a new folder (one that does not exist yet), or remove it yourself.")
        old = temp_path(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        remove(old)
    else:
        os.replace(tmp, final)


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
        _check_folder(self.folder)
        with output_errors(self.folder, "make it writable, or copy it somewhere writable"):
            self.folder.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(self.folder / self.name, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise InUseError(f"{self.folder} is in use by {holder}. Wait for it to finish or stop it (kill "
                             f"{holder.split()[1]}); a stopped job resumes where it left off.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.what}\n".encode(), 0)
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


def _refuse_dangling_link(folder: Path) -> None:
    """A folder given as a link to nothing is refused (making it would make the link's target)."""
    if folder.is_symlink() and not folder.exists():
        raise OutputExistsError(f"{folder} is a symbolic link to {os.readlink(folder)}, which does not exist: "
                                f"remove the link, or make the folder it points to")


def _check_folder(folder: Path) -> None:
    """Refuse a folder given as a dangling link; warn when anyone may write in it."""
    _refuse_dangling_link(folder)
    if folder.is_dir():
        mode = folder.stat().st_mode
        if mode & stat.S_IWOTH:
            log.warning("warning: %s is writable by every user: another user could plant or replace files there; "
                        "chmod o-w %s", folder, folder)


def _open_lock(path: Path, flags: int) -> int:
    """Open a lock file without following a link (a planted link would make dpnet write a file it points to)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputExistsError(f"{path} is a symbolic link, not a lock file dpnet made: nothing was written "
                                    f"through it. Remove the link (rm {path}) and run again.") from None
        err = not_writable_error(path, exc, "make the folder writable, or copy it somewhere writable")
        if err is None:
            raise
        raise err from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputExistsError(f"{path} is not a regular file: remove it and run again")
    return fd


def _read_holder(fd: int) -> str:
    """"pid N (what)" from what the holder wrote (it may be writing it right now: read a few times)."""
    import time

    for _ in range(20):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            pid, _, what = text.partition(" ")
            return f"pid {pid}" + (f" ({what})" if what else "")
        time.sleep(0.01)
    return "pid unknown"
