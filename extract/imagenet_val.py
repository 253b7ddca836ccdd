"""Arrange ILSVRC-2012's flat validation folder into ``val/<wnid>/`` from the devkit.

    python -m dpnet.extract.imagenet_val /data/ILSVRC2012/val --devkit /data/ILSVRC2012_devkit_t12

The devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` holds one ILSVRC2012_ID per
validation image (in file-name order); ``data/meta.mat`` maps ILSVRC2012_ID to WNID. Files are
moved (renamed), so running it twice is harmless: the second run finds nothing flat.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpnet.errors import DatasetLayoutError


def wnids_by_id(meta_mat: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(str(meta_mat), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}


def arrange_val(val_dir: Path, devkit: Path) -> int:
    """Move each flat ``ILSVRC2012_val_*.JPEG`` into ``val_dir/<wnid>/``; returns how many moved."""
    truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    meta = devkit / "data" / "meta.mat"
    for f in (truth, meta):
        if not f.is_file():
            raise DatasetLayoutError(f"{f} not found: pass --devkit pointing at the unpacked ILSVRC2012_devkit_t12")
    ids = [int(line) for line in truth.read_text().split()]
    wnid = wnids_by_id(meta)
    flat = sorted(p for p in val_dir.iterdir() if p.is_file() and p.name.startswith("ILSVRC2012_val_"))
    if flat and len(flat) != len(ids):
        raise DatasetLayoutError(f"{val_dir} holds {len(flat)} flat validation images but {truth} lists {len(ids)}")
    for path, cid in zip(flat, ids):
        (val_dir / wnid[cid]).mkdir(exist_ok=True)
        os.replace(path, val_dir / wnid[cid] / path.name)
    return len(flat)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpnet.extract.imagenet_val", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("val_dir", type=Path)
    p.add_argument("--devkit", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        n = arrange_val(args.val_dir, args.devkit)
    except DatasetLayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"moved {n} images into {args.val_dir}/<wnid>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
