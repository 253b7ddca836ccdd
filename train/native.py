"""The compiled CPU kernel of the training step: max-pool over regions + assignment entropy.

Glossary: N images, R regions, P parts. ``pool_entropy.c`` reads each (N, R, P) score once in
the forward and once in the backward, where the torch composition in ``train.model`` walks it
about a dozen times; on a 2-core CPU that is most of the training step outside its two GEMMs.

The C file is built on first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$DPNET_BUILD_DIR`` (default ``~/.cache/dpnet/native``, or a per-user temporary folder when the
home folder is read-only), under a name keyed by the source, the flags, the compiler and this
CPU, written to a temporary file and renamed. Without a compiler, or with ``DPNET_NATIVE=0``,
``load`` returns None after one warning and the trainer uses the torch path, which gives the
same numbers to float32 rounding (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("pool_entropy.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {}


def build_dirs() -> list[Path]:
    """Where compiled kernels live: ``$DPNET_BUILD_DIR``; else ``~/.cache/dpnet/native``, then a
    per-user folder in the temporary directory when the home folder cannot be written."""
    env = os.environ.get("DPNET_BUILD_DIR")
    if env:
        return [Path(env)]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [Path.home() / ".cache" / "dpnet" / "native", Path(tempfile.gettempdir()) / f"dpnet-native-{uid}"]


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


def _build(cc: str) -> Path:
    """Compile ``pool_entropy.c`` (or reuse the cached build); raises on compiler failure."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    name, tried = f"pool_entropy-{key}.so", []
    for folder in build_dirs():
        if (folder / name).exists():
            return folder / name
    for folder in build_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
            break
        except OSError as err:
            tried.append(f"{folder}: {err}")
    else:
        raise RuntimeError(f"no writable build folder ({'; '.join(tried)}); set DPNET_BUILD_DIR")
    os.close(fd)
    out = folder / name
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{done.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    f32, i64, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    lib.dpnet_pool_entropy_forward.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr]
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
            cc = _compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler found (set CC, or install gcc)")
                lib = _bind(_build(cc))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                warnings.warn(f"dpnet: the compiled training kernel is unavailable, using the slower torch path "
                              f"(set DPNET_NATIVE=0 to silence this): {err}", RuntimeWarning, stacklevel=2)
        _state["lib"] = lib
        return lib


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
    """s (N, R, P), inv_norm (P,) -> best (N, P), lse (N, R), h (N, R) (empty when entropy is off)."""
    n, r, p = s.shape
    inv = inv_norm.detach().float().contiguous()
    best = s.new_empty(n, p)
    lse, h = (s.new_empty(n, r), s.new_empty(n, r)) if entropy else (s.new_empty(0), s.new_empty(0))
    load().dpnet_pool_entropy_forward(_ptr(s), _ptr(inv), n, r, p, int(entropy), _ptr(best), _ptr(lse), _ptr(h))
    return best, lse, h


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
