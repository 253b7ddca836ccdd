"""The README's size and time table, measured here: cache bytes and extraction time per backbone.

For each backbone (EfficientNet-Lite0, ResNet-50, VGG-19; random weights: the arithmetic, and
so the time, is the same as with trained ones) this script
  - extracts ``--images`` synthetic images at 544 px, R = 500, and times it (per 1,000 images);
  - measures the bytes on disk per image of a cache at R = 500 and at R = 100 (tiny runs at
    64 px: the stored arrays do not depend on the image size);
then scales both to CUB-200-2011, MIT Indoor 67 and ImageNet (R = 100 there, as in the paper),
and says what the trainer does with caches larger than a quarter of this machine's RAM.

    python benchmarks/size_table.py [--images 8] [--write-readme]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dpnet.extract.pipeline import ExtractConfig, run_extraction

from readme_block import write_block

# images extracted, of which training images, and R. MIT-67: the official split lists 80 + 20
# images per class (6,700 of its 15,620 files); only listed images are extracted.
DATASETS = {"CUB-200-2011": (11_788, 5_994, 500), "MIT Indoor 67 (split lists)": (6_700, 5_360, 500),
            "ImageNet (train + val)": (1_331_167, 1_281_167, 100)}
BACKBONES = ("efficientnet_lite0", "resnet50", "vgg19")
START, END = "<!-- size-table:start -->", "<!-- size-table:end -->"


def extract(work: Path, backbone: str, regions: int, size: int, n: int, tag: str) -> tuple[float, int, int]:
    """(seconds, bytes on disk, images) of one synthetic extraction."""
    per_class = max(2, n // 2)
    cfg = ExtractConfig(dataset="synth", data_dir=str(work / f"raw{n}"), backbone=backbone, weights="random",
                        regions=regions, image_size=size, out_root=str(work / tag), progress=False,
                        synth={"n_classes": 2, "per_class": per_class, "image_size": 256})
    t0 = time.perf_counter()
    s = run_extraction(cfg)
    return time.perf_counter() - t0, s.bytes_on_disk, s.images


def measure(images: int) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="size_table_"))
    out = {}
    try:
        for bb in BACKBONES:
            extract(work, bb, 500, 544, 2, f"warm-{bb}")  # warm-up (allocator, kernels)
            secs, _, n = extract(work, bb, 500, 544, images, f"time-{bb}")
            row = {"s_per_1000": 1000 * secs / n}
            for r in (500, 100):
                _, nbytes, n_small = extract(work, bb, r, 64, 20, f"bytes-{bb}-{r}")
                row[f"bytes_r{r}"] = nbytes / n_small
            out[bb] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def table(rows: dict[str, dict[str, float]]) -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines = [f"Measured by `python benchmarks/size_table.py` on this machine ({os.cpu_count()} CPU cores, "
             f"{ram / 2**30:.0f} GiB RAM, torch {torch.__version__}, {torch.get_num_threads()} threads, 544 px). "
             f"GPU projection: no GPU was lent to the session that ran it, so none was measured.", "",
             "| dataset | images | R | backbone | cache on disk | extraction / 1,000 images (CPU) | whole set (CPU) | trainer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (n, n_train, r) in DATASETS.items():
        for bb in BACKBONES:
            nbytes = rows[bb][f"bytes_r{r}"] * n
            hours = rows[bb]["s_per_1000"] * n / 1000 / 3600
            train_bytes = rows[bb][f"bytes_r{r}"] * n_train  # regions dominate; the trainer's budget is RAM / 4
            mode = (f"holds the training split ({train_bytes / 2**30:.1f} GiB) in RAM" if train_bytes < ram / 4 else
                    f"streams the training split ({train_bytes / 2**30:.0f} GiB) shard by shard (256 MB shards, "
                    f"next shard read in the background, INNER_EPOCHS passes per loaded shard)")
            lines.append(f"| {name} | {n:,} | {r} | {bb} | {nbytes / 2**30:.1f} GiB | "
                         f"{rows[bb]['s_per_1000'] / 60:.1f} min | {hours:.1f} h | {mode} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--write-readme", action="store_true", help="replace the table between the README's markers")
    args = p.parse_args()
    text = table(measure(args.images))
    print(text)
    if args.write_readme:
        write_block(START, END, text)


if __name__ == "__main__":
    main()
