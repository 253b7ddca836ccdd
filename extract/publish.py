"""Copy a finished cache to any fsspec location zarr can read (``file://``, ``s3://``, ``gs://``, ...).

    python -m dpnet.extract.publish data/cache/cub-resnet50-r500-s544 s3://bucket/caches/cub-resnet50-r500-s544

``manifest.json`` is written last, so readers never take a half-copied cache for a finished
one. Train or report on it with ``CACHE=s3://bucket/caches/...`` (credentials as fsspec reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dpnet.errors import DpnetError

from .cache import RegionCache


def publish(cache_dir: str | os.PathLike, url: str) -> str:
    """Copy a finished local cache to an fsspec location; ``manifest.json`` goes last, so a
    reader never sees a half-copied cache as finished. Returns the URL."""
    import fsspec

    src = RegionCache(cache_dir)  # refuses an unfinished or damaged cache
    fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    if fs.exists(f"{root}/manifest.json"):
        fs.rm(f"{root}/manifest.json")  # an older copy is no longer finished while we overwrite it
    for f in sorted(p for p in Path(cache_dir).rglob("*") if p.is_file() and p.name not in ("manifest.json", ".lock")):
        rel = f.relative_to(cache_dir).as_posix()
        fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), f"{root}/{rel}")
    fs.pipe_file(f"{root}/manifest.json", json.dumps(src.manifest, indent=1, sort_keys=True).encode())
    return url.rstrip("/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpnet.extract.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir")
    p.add_argument("url")
    args = p.parse_args(argv)
    try:
        print(f"published: {publish(args.cache_dir, args.url)}")
    except DpnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
