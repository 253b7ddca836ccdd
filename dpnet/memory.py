"""glibc's allocator, tuned while dpnet runs for tensors of tens of MB freed and re-made at every step.

By default glibc serves every block above a (dynamic) threshold with a fresh ``mmap`` and gives
it back with ``munmap`` when freed. A CNN forward pass at 544 px makes activations of ~75 MB at
every batch, so each batch maps new pages and takes a page fault on every one of them: on the
2-core reference machine EfficientNet-Lite0 ran at 9.6 img/s with 44% of its CPU time in the
kernel, and at 21.2 img/s with none once blocks come from the heap and freed memory stays there
(benchmarks/bench_extract.py prints the share of system time).

:func:`large_buffers_reused` sets that for the duration of a job (extraction, a fit), then puts
glibc's defaults back and asks glibc to return the heap's free memory to the system
(``malloc_trim``; usually all of it, not always). It does nothing when the user set ``MALLOC_*`` variables (their
choice wins), with ``DPNET_MALLOC=0``, or on a C library without ``mallopt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from typing import Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
TUNED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024}

_lock = threading.Lock()
_state = {"depth": 0, "applied": False}


def _mallopt():
    if os.environ.get("DPNET_MALLOC", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def _apply(values: dict[int, int]) -> bool:
    fn = _mallopt()
    return fn is not None and all(fn(k, v) == 1 for k, v in values.items())


def _release() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim)."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def reusing() -> bool:
    """Whether the setting of :func:`large_buffers_reused` is on now."""
    with _lock:
        return _state["depth"] > 0 and _state["applied"]


@contextlib.contextmanager
def large_buffers_reused() -> Iterator[bool]:
    """Within the block, large blocks come from the heap and freed memory is kept for reuse.

    Yields whether the setting applied. Nested blocks keep it until the outermost one ends.
    """
    with _lock:
        if _state["depth"] == 0:
            _state["applied"] = _apply(TUNED)
        _state["depth"] += 1
    try:
        yield _state["applied"]
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0 and _state["applied"]:
                _apply(GLIBC_DEFAULTS)
                _release()
