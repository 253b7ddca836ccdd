"""The compiled CPU kernel of the training step: max-pool over regions + assignment entropy.

Glossary: N images, R regions, P parts. ``pool_entropy.c`` reads each (N, R, P) score once in
the forward and once in the backward, where the torch composition in ``dpnet.train.model`` walks it
about a dozen times; on a 2-core CPU that is most of the training step outside its two GEMMs.

The C file is built on first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$DPNET_BUILD_DIR`` (default ``~/.cache/dpnet/native``), under a name keyed by the source, the
flags, the compiler and this CPU, written to a temporary file and renamed. A library is only
loaded from a folder owned by this user and writable by no one else; when the build folder is
not such a folder (or cannot be made), the kernel is built in a private temporary folder for
this process, loaded, and that folder removed. Without a compiler the kernel is unavailable:
``load`` warns once and returns None, and the trainer uses the torch path, which gives the same
numbers to float32 rounding (tested). ``DPNET_NATIVE=0`` chooses the torch path without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from dpnet.errors import UnsafeFileError

SOURCE = Path(__file__).with_name("pool_entropy.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {}


def build_dir() -> Path:
    """Where compiled kernels are kept: ``$DPNET_BUILD_DIR``, else ``~/.cache/dpnet/native``."""
    env = os.environ.get("DPNET_BUILD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dpnet" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """Model name and feature flags: ``-march=native`` code is only valid on a CPU like this one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def library_name(cc: str) -> str:
    """The file name of the kernel built by ``cc`` from this source, with these flags, for this CPU."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return f"pool_entropy-{key}.so"


def unsafe(path: Path) -> str | None:
    """Why loading code from ``path`` (a folder or a file) is unsafe, or None when it is safe.

    Safe: not a symbolic link, owned by this user, writable by no one else. Anything else could
    have been placed or changed by another user.
    """
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"cannot be inspected ({err})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by other users"
    return None


def _compile(cc: str, out: Path) -> None:
    """Compile the kernel to ``out`` through a temporary file in the same folder (atomic)."""
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cached_build(cc: str, name: str) -> Path:
    """The kernel in the build folder, compiled there unless a safe copy is already there.

    Raises:
        UnsafeFileError: the folder is not this user's alone.
        OSError: the folder cannot be made or written.
    """
    folder = build_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = unsafe(folder)
    if problem:
        raise UnsafeFileError(f"{folder} {problem}")
    lib = folder / name
    if not lib.exists() or unsafe(lib):
        _compile(cc, lib)
    return lib


def _private_build(cc: str, name: str) -> ctypes.CDLL:
    """Build the kernel in a new private folder (mode 0700), load it, remove the folder."""
    folder = Path(tempfile.mkdtemp(prefix="dpnet-native-"))
    try:
        _compile(cc, folder / name)
        return _bind(folder / name)  # a loaded library stays mapped once its file is gone
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    f32, i64, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    lib.dpnet_pool_entropy_forward.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr]
    lib.dpnet_pool_entropy_forward.restype = None
    lib.dpnet_pool_entropy_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, f32, i64, i64, i64, ctypes.c_int,
                                                ptr, ptr]
    lib.dpnet_pool_entropy_backward.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None when disabled or unbuildable (warns once)."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        if os.environ.get("DPNET_NATIVE", "1") != "0":
            torch.get_num_threads()  # torch (and its OpenMP runtime) is loaded first: the kernel shares it
            lib = _load_or_build()
        _state["lib"] = lib
        return lib


def _load_or_build() -> ctypes.CDLL | None:
    cc = _compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc)")
        name = library_name(cc)
        try:
            return _bind(_cached_build(cc, name))
        except (OSError, UnsafeFileError) as err:
            warnings.warn(f"dpnet: the kernel build folder {build_dir()} cannot be used ({err}); dpnet builds the "
                          f"kernel privately for this process instead (set DPNET_BUILD_DIR to a folder of your "
                          f"own to keep the build)", RuntimeWarning, stacklevel=3)
            return _private_build(cc, name)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"dpnet: the compiled training kernel is unavailable, using the slower torch path "
                      f"(set DPNET_NATIVE=0 to silence this): {err}", RuntimeWarning, stacklevel=3)
        return None


def reset() -> None:
    """Forget the loaded kernel, so the next ``load`` looks again (tests switch it on and off)."""
    with _lock:
        _state.clear()


def usable(s: torch.Tensor) -> bool:
    """Whether the kernel takes these scores: float32, contiguous, on the CPU, built."""
    return s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous() and load() is not None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def forward(s: torch.Tensor, inv_norm: torch.Tensor, entropy: bool):
    """s (N, R, P), inv_norm (P,) -> best (N, P), where (N, P) int64 (first argmax region),
    lse (N, R), h (N, R) (the last two empty when entropy is off)."""
    n, r, p = s.shape
    inv = inv_norm.detach().float().contiguous()
    best, where = s.new_empty(n, p), torch.empty(n, p, dtype=torch.int64)
    lse, h = (s.new_empty(n, r), s.new_empty(n, r)) if entropy else (s.new_empty(0), s.new_empty(0))
    load().dpnet_pool_entropy_forward(_ptr(s), _ptr(inv), n, r, p, int(entropy), _ptr(best), _ptr(where), _ptr(lse),
                                      _ptr(h))
    return best, where, lse, h


def backward(s: torch.Tensor, inv_norm: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, best: torch.Tensor,
             g_best: torch.Tensor, k: float, entropy: bool):
    """Overwrites s (N, R, P) with dL/ds; returns it, dL/d inv_norm (P,) and dL/dc (P,) for S = XW^T - c."""
    n, r, p = s.shape
    inv = inv_norm.detach().float().contiguous()
    g = g_best.float().contiguous()
    g_inv, g_c = s.new_empty(p), s.new_empty(p)
    load().dpnet_pool_entropy_backward(_ptr(s), _ptr(inv), _ptr(lse), _ptr(h), _ptr(best), _ptr(g), k, n, r, p,
                                       int(entropy), _ptr(g_inv), _ptr(g_c))
    return s, g_inv, g_c
