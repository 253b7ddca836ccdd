"""Training under torchrun as ranks grow, on a generated ImageNet-shaped cache (issue 18).

ImageNet's shapes per image (R = 100 regions of D = 1280, Lite0) with C classes scaled to this
machine. For each rank count the same fit (default model, two epochs) runs under ``torchrun
--nproc_per_node=N -m dpnet.train``'s own code path (``dpnet.train.distributed``), the cores split evenly
between the ranks. Prints, side by side in one run: the second epoch's seconds, images per
second in all and per rank, each rank's peak resident memory, the speed-up over one rank, and
an epoch of ImageNet-1k's 1,281,167 training images projected from the measured rate (at this
model's size: ImageNet's 1,000 classes make P, and so the step, larger). One JSON line
follows; ``--write-readme`` puts the table in the README between ``<!-- ranks:start -->`` and
``<!-- ranks:end -->``.

    python benchmarks/bench_ranks.py --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IMAGENET_TRAIN = 1_281_167


def worker(cache: str) -> None:
    """One rank: fit, then print its epoch seconds and peak memory as a JSON line."""
    import torch

    from dpnet.extract.cache import RegionCache
    from dpnet.train import distributed
    from dpnet.train.estimator import DPNetClassifier

    distributed.init_from_env()
    rank, ranks = distributed.world()
    seconds = []
    est = DPNetClassifier(epochs=2, inner_epochs=1, val_fraction=0.0, patience=0)
    est.fit(RegionCache(cache), on_epoch=lambda row: seconds.append(row["seconds"]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rank": rank, "ranks": ranks, "epoch_s": seconds[-1], "peak_rss_mb": round(peak_mb, 1),
                      "threads": torch.get_num_threads()}), flush=True)
    distributed.close()


def run(cache: Path, ranks: int, cores: int) -> list[dict]:
    threads = max(1, cores // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    me = [str(Path(__file__).resolve()), "--worker", str(cache)]
    if ranks == 1:
        cmd = [sys.executable] + me
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"] + me
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    from bench_train import write_cache

    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "cache", args.images, 256, 100, 1280, args.classes).path
        for ranks in args.ranks:
            per = run(cache, ranks, cores)
            epoch = max(r["epoch_s"] for r in per)
            rows.append({"ranks": ranks, "threads_per_rank": per[0]["threads"], "epoch_s": epoch,
                         "images_per_s": args.images / epoch, "images_per_s_per_rank": args.images / epoch / ranks,
                         "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in per),
                         "imagenet_epoch_h": IMAGENET_TRAIN / (args.images / epoch) / 3600})
    base = rows[0]["epoch_s"]
    cpu = platform.processor() or platform.machine()
    lines = [f"{args.images} generated images, R=100, D=1280, {args.classes} classes, default model; {cores} cores "
             f"({cpu}), split evenly between the ranks:", "",
             "| ranks | threads per rank | epoch, s | images/s | images/s per rank | speed-up | peak memory per rank, MiB "
             "| 1.28 M images (ImageNet-1k's train split) at this rate, h |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['ranks']} | {r['threads_per_rank']} | {r['epoch_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['images_per_s_per_rank']:.0f} | {base / r['epoch_s']:.2f} | {r['peak_rss_mb_per_rank']:.0f} | "
              f"{r['imagenet_epoch_h']:.1f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"rows": rows, "cores": cores}))
    if args.write_readme:
        from readme_block import write_block

        write_block("<!-- ranks:start -->", "<!-- ranks:end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
