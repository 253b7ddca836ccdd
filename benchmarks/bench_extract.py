"""Extraction overhead: the whole of stage 1 against the fastest bare backbone, on the same K images.

Bare: the backbone's forward pass on already-decoded, already-resized tensors, in each runtime
this machine offers, every one with the allocator setting extraction uses (dpnet.memory):
  - eager (and eager with glibc's default allocator, to show what page faults cost);
  - frozen: TorchScript, frozen, oneDNN fusion (what extraction runs on the CPU);
  - compile: torch.compile (Inductor, weights frozen), unless --no-compile.
Whole: ``run_extraction`` from JPEG files (decode, resize, forward, region means, shard write).
Decode: the JPEG decoding and resizing of the same K images alone, in this process (what the decode
workers do). Extraction can overlap it with the backbone, but where both run on the same CPU cores
its CPU time still has to be paid: with the backbone using every core, the whole extraction
cannot beat ``cpu_floor_ratio`` = 1 + decode / (cores x bare best), whatever the overlap.
Start-up against steady state: the whole extraction is also timed on the first half of the images.
Its fixed cost (building and freezing the backbone, TorchScript's first profiling runs) is
``fixed_s`` = 2 x half - whole, and ``marginal_ratio`` = (whole - half) / (bare best / 2) is the
ratio of the images after the first half: what a large dataset, where the start is paid once, sees.
Every timing is repeated ``--repeats`` times, interleaved, and the best kept. The system share
is the system CPU time of the best whole extraction over its total CPU time (getrusage):
page faults show there on any machine, whatever a fault costs on it.
Prints a table, then one JSON line with ``bare_eager_s``, ``bare_best_s``, ``ratio`` = whole /
bare_best (goal <= 1.10), ``decode_s``, ``cpu_floor_ratio`` and ``sys_share`` (goal <= 0.05).

    python benchmarks/bench_extract.py [--images 256] [--image-size 544] [--regions 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dpnet.memory import large_buffers_reused
from dpnet.extract.backbones import create_backbone
from dpnet.extract.datasets import read_cub
from dpnet.extract.images import load_rgb
from dpnet.extract.config import ExtractConfig
from dpnet.extract.pipeline import run_extraction
from dpnet.extract.runtime import FeatureExtractor, frozen_body
from dpnet.extract.synth import SynthSpec, ensure_synth


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + b.ru_utime, a.ru_stime + b.ru_stime


def bare_runners(args: argparse.Namespace, pixels: torch.Tensor) -> dict[str, Callable[[], None]]:
    """name -> a function running the backbone over every pre-decoded batch once.

    Each normalises its uint8 batch exactly as extraction does (FeatureExtractor.normalise).
    """
    bb = create_backbone(args.backbone)
    eager, frozen = (FeatureExtractor(bb, (1, 1), 1, 0, torch.device("cpu"), rt) for rt in ("eager", "frozen"))
    batches = [pixels[i:i + args.batch_size] for i in range(0, len(pixels), args.batch_size)]

    def runner(model: torch.nn.Module, fx: FeatureExtractor, tuned: bool = True) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), (large_buffers_reused() if tuned else _nothing()):
                for x in batches:
                    model(fx.normalise(x))
        return run

    out = {"eager (glibc default allocator)": runner(eager.body, eager, tuned=False), "eager": runner(eager.body, eager),
           "frozen": runner(frozen_body(frozen.body, frozen.normalise(batches[0])) or frozen.body, frozen)}
    if not args.no_compile:
        import torch._inductor.config as inductor

        inductor.freezing = True
        out["compile"] = runner(torch.compile(eager.body, dynamic=False), eager)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def timed(fn: Callable[[], object]) -> tuple[float, float, float, object]:
    """(seconds, user CPU s, system CPU s, result) of one call."""
    u0, s0 = cpu_times()
    t0 = time.perf_counter()
    result = fn()
    t = time.perf_counter() - t0
    u1, s1 = cpu_times()
    return t, u1 - u0, s1 - s0, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=544)
    p.add_argument("--regions", type=int, default=500)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is kept")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compilation takes a minute)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        per_class = max(2, args.images // 8)
        root = ensure_synth(work / "raw", SynthSpec(n_classes=8, per_class=per_class, image_size=256))
        paths = [root / "images" / r.path for r in read_cub(root).records]
        pixels = torch.from_numpy(np.stack([load_rgb(p, args.image_size)[0] for p in paths])).permute(0, 3, 1, 2)
        bare = bare_runners(args, pixels)
        cfg = ExtractConfig(dataset="synth", data_dir=str(root), backbone=args.backbone, regions=args.regions,
                            image_size=args.image_size, batch_size=args.batch_size, out_root=str(work / "cache"),
                            progress=False, synth={"n_classes": 8, "per_class": per_class, "image_size": 256})

        def whole(config: ExtractConfig = cfg):
            shutil.rmtree(work / "cache", ignore_errors=True)
            return run_extraction(config)

        half_root = work / "half"  # the first half of the images, as a dataset of its own
        shutil.copytree(root, half_root)
        lines = (half_root / "images.txt").read_text().splitlines()[: len(paths) // 2]
        (half_root / "images.txt").write_text("\n".join(lines) + "\n")
        half_cfg = dataclasses.replace(cfg, data_dir=str(half_root))

        def decode():
            for path in paths:
                load_rgb(path, args.image_size)

        def half():
            return whole(half_cfg)

        for fn in list(bare.values()) + [whole, half, decode]:  # warm-up: page cache, allocator, compilation
            fn()
        times = {name: [] for name in bare}
        wholes, halves, decodes = [], [], []
        for _ in range(args.repeats):  # interleaved, best of each (2 noisy cores)
            for name, fn in bare.items():
                times[name].append(timed(fn)[0])
            wholes.append(timed(whole))
            halves.append(timed(half)[0])
            decodes.append(timed(decode)[0])
        report(args, {k: min(v) for k, v in times.items()}, min(wholes, key=lambda w: w[0]), min(decodes), min(halves))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, bare: dict[str, float], whole: tuple, decode_s: float, half_s: float) -> None:
    whole_s, user, system, summary = whole
    fastest = min((k for k in bare if "default allocator" not in k), key=bare.get)
    n = summary.images
    share = system / max(user + system, 1e-9)
    cores = len(os.sched_getaffinity(0))
    floor = 1 + decode_s / (cores * bare[fastest])
    fixed = 2 * half_s - whole_s
    marginal = (whole_s - half_s) / (bare[fastest] / 2)
    rows = [("images", f"{n}"), ("image size / R", f"{args.image_size} / {args.regions}"),
            ("torch threads", f"{torch.get_num_threads()}")]
    rows += [(f"bare {name} s", f"{t:.2f}  ({n / t:.1f} img/s)") for name, t in bare.items()]
    rows += [("bare best", fastest), ("whole extraction s", f"{whole_s:.2f}  ({n / whole_s:.1f} img/s)"),
             ("ratio whole / bare best", f"{whole_s / bare[fastest]:.3f}"),
             ("whole extraction of the first half s", f"{half_s:.2f}"),
             ("fixed start-up s (2 x half - whole)", f"{fixed:.2f}"),
             ("marginal ratio (second half / bare best's half)", f"{marginal:.3f}"),
             ("decode + resize alone s (1 process)", f"{decode_s:.2f}"),
             (f"ratio floor on {cores} shared cores", f"{floor:.3f}"),
             ("system CPU share of whole", f"{share:.3f}"), ("MB per image on disk", f"{summary.bytes_on_disk / n / 1e6:.3f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps({"ratio": round(whole_s / bare[fastest], 4), "sys_share": round(share, 4),
                      "decode_s": round(decode_s, 3), "cpu_floor_ratio": round(floor, 4), "cores": cores,
                      "fixed_s": round(fixed, 3), "marginal_ratio": round(marginal, 4),
                      "bare_eager_s": round(bare["eager"], 3), "bare_best_s": round(bare[fastest], 3),
                      "bare_best": fastest, "bare_eager_default_allocator_s": round(bare["eager (glibc default allocator)"], 3),
                      "whole_s": round(whole_s, 3), "images_per_s": round(n / whole_s, 3), "images": n,
                      "image_size": args.image_size, "regions": args.regions, "backbone": args.backbone,
                      "mb_per_image": round(summary.bytes_on_disk / n / 1e6, 4)}))


if __name__ == "__main__":
    main()
