"""Where a cache lives: a local folder, or any fsspec location zarr reads (file://, s3://, ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def is_url(path: Any) -> bool:
    """Whether ``path`` names an fsspec location (``proto://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path


class Location:
    """A cache folder's root: joins relative names, tests and reads files, opens shard stores."""

    def __init__(self, path: str | os.PathLike):
        self.fs = None
        if is_url(path):
            import fsspec

            self.path: Path | str = str(path).rstrip("/")
            self.fs, self._root = fsspec.core.url_to_fs(self.path)
        else:
            self.path = Path(path)

    @property
    def local(self) -> bool:
        return self.fs is None

    def join(self, rel: str) -> Path | str:
        return self.path / rel if self.local else f"{self.path}/{rel}"

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists() if self.local else self.fs.exists(f"{self._root}/{rel}")

    def read_text(self, rel: str) -> str:
        if self.local:
            return (self.path / rel).read_text(encoding="utf-8")
        return self.fs.cat_file(f"{self._root}/{rel}").decode("utf-8")

    def files_under(self, rel: str) -> set[str]:
        """Paths (relative to ``rel``) of every file below the folder ``rel``."""
        if self.local:
            base = self.path / rel
            out = set()
            for folder, _, files in os.walk(base):
                prefix = Path(folder).relative_to(base).as_posix()
                out.update(f if prefix == "." else f"{prefix}/{f}" for f in files)
            return out
        root = f"{self._root}/{rel}".rstrip("/")
        return {p[len(root) + 1:] for p in self.fs.find(root)}

    def open_store(self, rel: str, store: str):
        """A read-only zarr group or h5py file of the shard at ``rel``."""
        path = self.join(rel)
        if store == "zarr":
            import zarr

            return zarr.open_group(str(path), mode="r")
        import h5py

        return h5py.File(self.fs.open(str(path).split("://", 1)[-1], "rb") if not self.local else path, "r")
