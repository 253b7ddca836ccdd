"""The compiled pool + entropy kernel (train/pool_entropy.c) against the torch path, side by side.

Issue 17 asks to keep the kernel only if the torch path does not come within 20% of it. On a
generated cache (R=500 regions of D=1280, C classes, q=20) the same fit runs in fresh processes
with the kernel and with ``DPNET_NATIVE=0``, interleaved and repeated (the best of each counts), in the default mode (gather backward, entropy on 32
sampled regions, PCA 256) and the exact mode (dense backward, entropy on every region, float32,
no PCA). Prints the mean epoch (after the first) of each, the torch / kernel ratio, and one JSON
line; ``--write-readme`` puts the table between ``<!-- kernel:start -->`` and ``<!-- kernel:end -->``.

    python benchmarks/bench_kernel.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = {"default": {}, "exact": dict(similarity="dot", constraints=("orth", "assign", "cs"), backward="dense",
                                      entropy_regions=0, pca_dim=0, gemm_dtype="float32")}


def worker(cache: str, mode: str, epochs: int) -> None:
    from dpnet.extract.cache import RegionCache
    from dpnet.train import native
    from dpnet.train.estimator import DPNetClassifier

    rows: list[dict] = []
    DPNetClassifier(epochs=epochs, inner_epochs=1, val_fraction=0.0, patience=0, **MODES[mode]).fit(
        RegionCache(cache), on_epoch=rows.append)
    later = [r["seconds"] for r in rows[1:]]
    print(json.dumps({"epoch_s": sum(later) / len(later), "kernel": native.load() is not None}), flush=True)


def run(cache: Path, mode: str, native_on: bool, epochs: int) -> dict:
    env = {**os.environ, "DPNET_NATIVE": "1" if native_on else "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(cache), "--mode", mode,
                          "--epochs", str(epochs)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--classes", type=int, default=50, help="C (P = 20 C): 50 is cub50-dev's part count")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per setting, interleaved; the best counts")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.mode, args.epochs)
        return 0
    from bench_train import write_cache

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "cache", args.images, 128, 500, 1280, args.classes).path
        for mode in MODES:
            on, off = [], []
            for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
                on.append(run(cache, mode, True, args.epochs))
                off.append(run(cache, mode, False, args.epochs))
            if not all(r["kernel"] for r in on):
                raise SystemExit("the kernel did not load here (no compiler?): nothing to compare")
            k, t = min(r["epoch_s"] for r in on), min(r["epoch_s"] for r in off)
            rows.append({"mode": mode, "kernel_s": k, "torch_s": t, "torch_over_kernel": t / k})
    cpu = platform.processor() or platform.machine()
    lines = [f"{args.images} generated images, R=500, D=1280, {args.classes} classes, q=20; mean epoch after the "
             f"first, best of {args.repeats} fresh processes each, interleaved; {len(os.sched_getaffinity(0))} cores ({cpu}):", "",
             "| mode | kernel, s | torch path (DPNET_NATIVE=0), s | torch / kernel |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['kernel_s']:.2f} | {r['torch_s']:.2f} | {r['torch_over_kernel']:.2f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"rows": rows}))
    if args.write_readme:
        from readme_block import write_block

        write_block("<!-- kernel:start -->", "<!-- kernel:end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
