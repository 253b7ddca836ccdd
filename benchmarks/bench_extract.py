"""Extraction overhead: whole stage 1 against the bare backbone, on the same K images.

(a) bare: the backbone's forward pass on already-decoded, already-resized tensors.
(b) whole: ``run_extraction`` from JPEG files (decode, resize, forward, region means, shard write).
Each is timed ``--repeats`` times, interleaved, and the best run of each is kept.
Prints a table, then one JSON line with ``ratio`` = b / a (goal: <= 1.10 on a 2-core CPU).

    python benchmarks/bench_extract.py [--images 64] [--image-size 544] [--regions 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract.backbones import create_backbone
from extract.datasets import read_cub
from extract.images import load_rgb
from extract.pipeline import ExtractConfig, run_extraction
from extract.synth import SynthSpec, ensure_synth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=544)
    p.add_argument("--regions", type=int, default=500)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is kept")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        per_class = max(2, args.images // 8)
        root = ensure_synth(work / "raw", SynthSpec(n_classes=8, per_class=per_class, image_size=256))
        index = read_cub(root)
        paths = [root / "images" / r.path for r in index.records]
        bare = [time_bare(args, paths)]
        cfg = ExtractConfig(dataset="synth", data_dir=str(root), backbone=args.backbone, regions=args.regions,
                            image_size=args.image_size, batch_size=args.batch_size, out_root=str(work / "cache"),
                            progress=False, synth={"n_classes": 8, "per_class": per_class, "image_size": 256})
        run_extraction(cfg)  # warm-up: page cache, allocator, worker start
        whole = []
        for _ in range(args.repeats):  # interleaved with the bare runs, best of each (2 noisy cores)
            shutil.rmtree(work / "cache")
            t0 = time.perf_counter()
            summary = run_extraction(cfg)
            whole.append(time.perf_counter() - t0)
            bare.append(time_bare(args, paths))
        report(args, summary.images, min(bare), min(whole), summary.bytes_on_disk)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def time_bare(args: argparse.Namespace, paths: list[Path]) -> float:
    """Seconds of the backbone alone on pre-decoded uint8 batches (normalisation included).

    The bare run gets the same best layout as the extractor (channels_last model and input).
    """
    bb = create_backbone(args.backbone)
    bb.body.to(memory_format=torch.channels_last)
    pixels = torch.from_numpy(np.stack([load_rgb(p, args.image_size)[0] for p in paths])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(bb.mean).view(1, 3, 1, 1), torch.tensor(bb.std).view(1, 3, 1, 1)

    def run() -> None:
        with torch.no_grad():
            for i in range(0, len(pixels), args.batch_size):
                x = pixels[i:i + args.batch_size].contiguous(memory_format=torch.channels_last)
                bb.body((x.float() / 255 - mean) / std)

    run()  # warm-up
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def report(args: argparse.Namespace, n: int, bare_s: float, whole_s: float, nbytes: int) -> None:
    rows = [("images", f"{n}"), ("image size", f"{args.image_size}"), ("regions R", f"{args.regions}"),
            ("torch threads", f"{torch.get_num_threads()}"),
            ("(a) bare backbone s", f"{bare_s:.2f}"), ("(b) whole extraction s", f"{whole_s:.2f}"),
            ("ratio b/a", f"{whole_s / bare_s:.3f}"), ("images/s (whole)", f"{n / whole_s:.2f}"),
            ("MB per image on disk", f"{nbytes / n / 1e6:.3f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps({"ratio": round(whole_s / bare_s, 4), "images_per_s": round(n / whole_s, 3),
                      "mb_per_image": round(nbytes / n / 1e6, 4), "bare_s": round(bare_s, 3),
                      "whole_s": round(whole_s, 3), "images": n, "image_size": args.image_size,
                      "regions": args.regions, "backbone": args.backbone}))


if __name__ == "__main__":
    main()
