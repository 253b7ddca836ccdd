"""Exceptions that tell the user what was expected, what arrived and how to fix it.

Every error a user can cause is a :class:`DpnetError`; the command lines print its message
(no traceback) and exit with status 2.
"""

from __future__ import annotations


class DpnetError(Exception):
    """Base class of every user-facing error of dpnet; the command line prints it without a trace."""


class ConfigError(DpnetError, ValueError):
    """An option has a value outside what it can take; the message names the option, the value and the range."""


def check_options(checks: list[tuple[str, object, bool, str]]) -> None:
    """Raise :class:`ConfigError` for the first ``(name, value, ok, wanted)`` whose ``ok`` is false:
    "NAME must be WANTED, got VALUE". Every stage's option check goes through here."""
    for name, value, ok, want in checks:
        if not ok:
            raise ConfigError(f"{name} must be {want}, got {value!r}")


class DatasetLayoutError(DpnetError):
    """A dataset folder lacks a file of its layout, or a line of it is malformed."""


class UnknownNameError(DpnetError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsNotFoundError(DpnetError):
    """Pretrained weights are neither at the given path nor in the local torch cache."""


class ImageDecodeError(DpnetError, ValueError):
    """A file is not a readable image (or is too small); the message names it."""


class BadImagesError(DpnetError):
    """Some images could not be decoded; lists every one of them."""

    def __init__(self, bad: list[tuple[str, str]], hint: str):
        self.bad = bad
        lines = "\n".join(f"  {path}: {why}" for path, why in bad)
        super().__init__(f"{len(bad)} image(s) could not be read:\n{lines}\n{hint}")


class CacheMismatchError(DpnetError):
    """A cache does not match what its reader expects (a field of its manifest differs)."""


class CheckpointMismatchError(CacheMismatchError):
    """A training checkpoint was made on another cache, or with other hyper-parameters."""


class CacheIncompleteError(DpnetError):
    """A cache folder has no finished manifest, or a file of it is missing or damaged."""


class NonFiniteError(DpnetError):
    """NaN or inf in the cache or in the loss; names where it appeared."""


class UnsafeFileError(DpnetError):
    """A file would have to run code (a pickle) or be loaded from an unsafe place to be read."""


class InUseError(DpnetError):
    """Another live process holds the folder (a cache being extracted, a run being trained)."""


class DiskFullError(DpnetError):
    """A write failed for lack of space; what was finished before is kept."""


class NotWritableError(DpnetError):
    """A folder dpnet must write in is read-only (or not ours to write in); names it and the way out."""


class OutputExistsError(DpnetError):
    """An output path is taken by something dpnet did not write; dpnet never replaces it."""

