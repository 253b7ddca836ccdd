"""Copy a finished cache to any fsspec location zarr can read (``file://``, ``s3://``, ``gs://``, ...).

    python -m extract.publish data/cache/cub-resnet50-r500-s544 s3://bucket/caches/cub-resnet50-r500-s544

``manifest.json`` is written last, so readers never take a half-copied cache for a finished
one. Train or report on it with ``CACHE=s3://bucket/caches/...`` (credentials as fsspec reads them).
"""

from __future__ import annotations

import argparse
import sys

from .cache import publish
from .errors import DpnetError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extract.publish", description=__doc__,
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
