"""Stopping a job cleanly: SIGINT (Ctrl-C) and SIGTERM end it with one line, never a traceback.

:func:`run_command` runs a command-line body under handlers that turn either signal into
:class:`Stopped`, a ``BaseException`` (so no ``except Exception`` swallows it). Every writer
cleans up on its way out (temporary files are written through ``try/except BaseException``),
so what was finished stays, the half-written goes, and the same command resumes. Further
signals are ignored while that cleanup runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Callable, Iterator

from .errors import DpnetError
from .memory import large_buffers_reused

STOP_LINE = "stopped; run the same command to resume"


class Stopped(BaseException):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Stopped` in the main thread (once; later ones are
    ignored until the block has unwound). Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        raise Stopped(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def stop_behind(exc: BaseException) -> Stopped | None:
    """The :class:`Stopped` that ``exc`` is, or that its chain of causes and contexts holds: Python wraps what
    some hooks raise (``__set_name__``, met by a signal landing mid-import, becomes a RuntimeError), and a
    cleanup that fails on the way out raises its own error over the stop."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_command(body: Callable[[], int]) -> int:
    """Run a command's ``body``: a :class:`DpnetError` prints ``error: ...`` (exit 2); a stop signal prints
    :data:`STOP_LINE` (exit 128 + the signal's number, as a shell reports it), whatever error it surfaced in.

    The whole body runs with large buffers reused (:func:`dpnet.memory.large_buffers_reused`): every stage
    makes and frees tensors of tens of MB at each batch, the report's pixel measures most of all."""
    try:
        with stop_on_signals(), large_buffers_reused():
            return body()
    except KeyboardInterrupt:
        return _stopped(signal.SIGINT)
    except DpnetError as exc:
        if (stop := stop_behind(exc)) is None:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    except BaseException as exc:
        if (stop := stop_behind(exc)) is None:
            raise
    return _stopped(stop.signum)


def _stopped(signum: int) -> int:
    """Say :data:`STOP_LINE`, and only it: work a stop left in flight on an event loop (zarr reads a shard
    on its own loop) is dropped at exit, when zarr closes that loop, and asyncio would log each dropped task
    and each failed read no one awaited, with its traceback. Returns the exit status, 128 + ``signum``."""
    logging.getLogger("asyncio").disabled = True
    print(STOP_LINE, file=sys.stderr)
    return 128 + signum
