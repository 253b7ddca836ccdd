"""Training speed against this machine's own bounds, measured side by side in one run.

On a synthetic cache at the paper's shapes scaled to this machine (R=500, D=1280, C=10,
P=200), several times larger than the memory budget so the trainer streams it:
(i) the GEMM rate of a torch matmul of the training shapes, (ii) the sequential read rate
of the cache, then (iii) one training epoch. Compute bound = FLOPs of the epoch's GEMMs /
GEMM rate; read bound = bytes read / read rate. Also the epoch with the backbone in the
loop (backbone time per image measured on a few images, scaled) against the cached epoch.
Memory: a warm-up fit on a 2-shard cache runs first (library code paged in, allocator in
steady state); then peak RSS growth during the measured fit, sampled every 10 ms, is compared
with three shards plus the model (anonymous memory, i.e. data without mapped code, is shown too).
Prints a table, then one JSON line with ``ratio`` = epoch / max(compute, read bound).

The exact mode (dense backward, entropy over every region, float32) is measured as above. The
default mode (the estimator's own model and arithmetic: the max-pool's gradient as a gather,
the entropy on a random subset of regions, bfloat16 GEMMs where the CPU has the units) is then
timed on the same cache against ``forward_bound_s``, the forward GEMM S = X U^T alone at the
measured rate of its dtype: ``ratio_forward`` = its epoch / forward_bound_s. When the cache
streams, reading it can be the floor instead: ``ratio_forward_or_read`` = its epoch /
max(forward_bound_s, read bound). With ``pca_dim`` (the default's, on descriptors projected
once) the same is printed against the forward GEMM at D' (``ratio_forward_pca``). Default-mode
epochs are the second of two (the first also projects and warms up).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dpnet.extract.backbones import create_backbone
from dpnet.files import write_json_atomic
from dpnet.extract.cache import RegionCache, open_shard_writer
from dpnet.extract.pipeline import finish_manifest
from dpnet.train import native
from dpnet.train.estimator import DPNetClassifier
from dpnet.train.gemm import resolve_gemm_dtype, training_path


# The exact mode: the paper's model and arithmetic (dense backward, entropy on every region, float32).
EXACT = dict(similarity="dot", constraints=("orth", "assign", "cs"), backward="dense", entropy_regions=0, pca_dim=0,
             gemm_dtype="float32")


def write_cache(path: Path, n: int, shard: int, r: int, d: int, c: int) -> RegionCache:
    """Random float16 descriptors, class-dependent mean so training has signal."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (c, d)).astype(np.float32)
    bounds = [[a, min(a + shard, n)] for a in range(0, n, shard)]
    plan = {"format": "dpnet-cache/1", "dataset": "bench", "classes": [str(i) for i in range(c)], "R": r, "D": d,
            "store": "zarr", "shard_bounds": bounds, "backbone": "none", "image_size": 544}
    for s, (a, b) in enumerate(bounds):
        w = open_shard_writer(path, s, "zarr", b - a, r, d)
        labels = rng.integers(0, c, b - a).astype(np.int32)
        x = rng.normal(0, 1, (b - a, r, d)).astype(np.float32)
        x[:, :5] += centres[labels][:, None]  # a few discriminative regions per image
        w.append({"regions": x.astype(np.float16), "global": x.mean(1).astype(np.float16),
                  "boxes": np.zeros((b - a, r, 4), np.int16), "sizes": np.zeros((b - a, 2), np.int32),
                  "labels": labels, "image_ids": np.arange(a, b) + 1, "is_train": np.ones(b - a, bool)})
        w.commit({"shard": s, "skipped": "[]"})
    write_json_atomic(path / "plan.json", plan)
    finish_manifest(path, plan)
    return RegionCache(path)


def gemm_rate(batch: int, r: int, d: int, p: int, windows: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of (batch*R, D) @ (D, P) in ``dtype``: the best of ``windows`` 0.4 s windows.

    The best window, not the mean: the bound is what the machine can do, and a window slowed
    by something else on the machine would make the ratio look better than it is.
    """
    x, u = torch.randn(batch * r, d).to(dtype), torch.randn(d, p).to(dtype)
    x @ u
    best = 0.0
    for _ in range(windows):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.4:
            x @ u
            reps += 1
        best = max(best, 2 * batch * r * d * p * reps / (time.perf_counter() - t0))
    return best


def read_rate(cache: RegionCache) -> tuple[float, int]:
    """Bytes/s of reading every shard's regions, and the bytes read."""
    t0, total = time.perf_counter(), 0
    for i in range(cache.n_shards):
        total += cache.load_shard(i, "train", ("regions",))["regions"].nbytes
    return total / (time.perf_counter() - t0), total


def rss_mb() -> tuple[float, float]:
    """(resident, resident anonymous) MiB of this process: anonymous excludes mapped library code."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["RssAnon"]


class PeakRSS:
    """Samples this process's resident memory every 10 ms in a thread; peaks after ``stop``."""

    def __init__(self):
        self.peak = self.peak_anon = 0.0
        self._run = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self._run:
            total, anon = rss_mb()
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            time.sleep(0.01)

    def stop(self) -> tuple[float, float]:
        self._run = False
        self.thread.join()
        return self.peak, self.peak_anon


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--shard-images", type=int, default=64)
    ap.add_argument("--budget-mb", type=float, default=256.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--q", type=int, default=20)
    args = ap.parse_args()
    r, d, c = 500, 1280, 10
    p = args.q * c
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        for name, n in (("cache", args.images), ("warm", 2 * args.shard_images)):
            child = ctx.Process(target=write_cache, args=(work / name, n, args.shard_images, r, d, c))
            child.start(), child.join()  # written by a child so its buffers never count in our RSS
        cache = RegionCache(work / "cache")
        rate = gemm_rate(args.batch_size, r, d, p)
        rbps, nbytes = read_rate(cache)

        def estimator(budget: float) -> DPNetClassifier:
            return DPNetClassifier(parts_per_class=args.q, epochs=1, inner_epochs=1, batch_size=args.batch_size,
                                   val_fraction=0.0, memory_budget_mb=budget, device="cpu", **EXACT)

        # Warm-up on a 2-shard cache, streamed: the library code the fit touches is paged in and
        # the allocator is in its steady state, so the growth below is the fit's own data.
        estimator(0.0).fit(RegionCache(work / "warm"))
        rows = []
        rss = PeakRSS()
        time.sleep(0.1)
        before, before_anon = rss_mb()
        estimator(args.budget_mb).fit(cache, on_epoch=rows.append)
        peak, peak_anon = rss.stop()
        epoch_s = rows[0]["seconds"]
        fast = default_mode_epochs(cache, args, r, d, p)
        # GEMMs per step: S = X U^T and its gradient dU = dS^T X (the assignment term reuses S).
        flops = 2 * 2 * args.images * r * d * p
        compute_s, read_s = flops / rate, nbytes / rbps
        per_image = backbone_seconds_per_image()
        mem = {"before": before, "peak": peak, "before_anon": before_anon, "peak_anon": peak_anon}
        report(args, epoch_s, compute_s, read_s, rate, rbps, nbytes, mem, per_image, cache, fast)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def default_mode_epochs(cache: RegionCache, args, r: int, d: int, p: int) -> dict[str, float]:
    """The estimator's default training mode on the same cache: its second epoch against the
    forward GEMM alone, at full D and (with the default ``pca_dim``) at D'."""
    defaults = DPNetClassifier()
    dtype = resolve_gemm_dtype(defaults.gemm_dtype, torch.device("cpu"))
    out = {"backward": defaults.backward, "entropy_regions": defaults.entropy_regions, "pca_dim": defaults.pca_dim,
           "gemm_dtype": str(dtype).replace("torch.", "")}
    for key, dim in (("full", 0), ("pca", defaults.pca_dim)):
        if key == "pca" and not dim:
            continue
        rows: list[dict] = []
        DPNetClassifier(parts_per_class=args.q, epochs=2, inner_epochs=1, batch_size=args.batch_size, val_fraction=0.0,
                        memory_budget_mb=args.budget_mb, device="cpu", pca_dim=dim).fit(cache, on_epoch=rows.append)
        width = dim or d
        out[f"epoch_{key}_s"] = rows[1]["seconds"]
        out[f"forward_bound_{key}_s"] = 2 * args.images * r * width * p / gemm_rate(args.batch_size, r, width, p,
                                                                                   dtype=dtype)
    return out


def backbone_seconds_per_image(n: int = 4) -> float:
    bb = create_backbone("efficientnet_lite0")
    x = torch.randn(n, 3, 544, 544)
    with torch.no_grad():
        bb.body(x[:1])
        t0 = time.perf_counter()
        bb.body(x)
    return (time.perf_counter() - t0) / n


def report(args, epoch_s, compute_s, read_s, rate, rbps, nbytes, mem, per_image, cache, fast) -> None:
    shard_mb = args.shard_images * 500 * 1280 * 2 / 2**20
    model_mb = (args.q * 10 * 1280 + 10 * args.q * 10) * 4 * 3 / 2**20  # params + Adam moments
    end_to_end = args.images * per_image + epoch_s
    kernel = "compiled C" if native.load() is not None else "torch (DPNET_NATIVE=0 or no compiler)"
    rows = [("pool + entropy kernel", kernel), ("images / shards", f"{args.images} / {cache.n_shards}"), ("cache MiB", f"{nbytes / 2**20:.0f}"),
            ("memory budget MiB", f"{args.budget_mb:.0f}"), ("GEMM rate GFLOP/s", f"{rate / 1e9:.1f}"),
            ("read rate MB/s", f"{rbps / 1e6:.0f}"), ("compute bound s", f"{compute_s:.2f}"),
            ("read bound s", f"{read_s:.2f}"), ("epoch s", f"{epoch_s:.2f}"),
            ("ratio epoch / max(bounds)", f"{epoch_s / max(compute_s, read_s):.3f}"),
            ("RSS before fit MiB", f"{mem['before']:.0f}"), ("peak RSS MiB", f"{mem['peak']:.0f}"),
            ("peak RSS growth in fit MiB", f"{mem['peak'] - mem['before']:.0f}"),
            ("peak anonymous RSS growth MiB", f"{mem['peak_anon'] - mem['before_anon']:.0f}"),
            ("3 shards + model MiB", f"{3 * shard_mb + model_mb:.0f}"),
            ("backbone s / image (544)", f"{per_image:.3f}"), ("end-to-end epoch s (est.)", f"{end_to_end:.1f}"),
            ("speedup vs end-to-end", f"{end_to_end / epoch_s:.1f}"),
            ("default mode", f"backward={fast['backward']}, entropy_regions={fast['entropy_regions']}, "
                             f"GEMMs in {fast['gemm_dtype']}"),
            ("default training path", training_path(DPNetClassifier(), torch.device("cpu"))),
            ("default epoch s (full D)", f"{fast['epoch_full_s']:.2f}"),
            (f"forward GEMM bound s (full D, {fast['gemm_dtype']})", f"{fast['forward_bound_full_s']:.2f}"),
            ("ratio_forward", f"{fast['epoch_full_s'] / fast['forward_bound_full_s']:.3f}"),
            ("default epoch / max(forward, read bound)", f"{fast['epoch_full_s'] / max(fast['forward_bound_full_s'], read_s):.3f}")]
    extra = {}
    if "epoch_pca_s" in fast:
        rows += [(f"default epoch s (pca_dim={fast['pca_dim']})", f"{fast['epoch_pca_s']:.2f}"),
                 ("forward GEMM bound s (D')", f"{fast['forward_bound_pca_s']:.2f}"),
                 ("ratio_forward_pca", f"{fast['epoch_pca_s'] / fast['forward_bound_pca_s']:.3f}")]
        extra = {"epoch_pca_s": round(fast["epoch_pca_s"], 3), "forward_bound_pca_s": round(fast["forward_bound_pca_s"], 3),
                 "ratio_forward_pca": round(fast["epoch_pca_s"] / fast["forward_bound_pca_s"], 4)}
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps({"ratio": round(epoch_s / max(compute_s, read_s), 4), "epoch_s": round(epoch_s, 3),
                      "peak_rss_mb": round(mem["peak"], 1), "rss_before_fit_mb": round(mem["before"], 1),
                      "rss_growth_mb": round(mem["peak"] - mem["before"], 1),
                      "anon_rss_growth_mb": round(mem["peak_anon"] - mem["before_anon"], 1),
                      "rss_goal_met": mem["peak"] - mem["before"] <= 3 * shard_mb + model_mb,
                      "shard_mb": round(shard_mb, 1),
                      "compute_bound_s": round(compute_s, 3), "read_bound_s": round(read_s, 3),
                      "gemm_gflops": round(rate / 1e9, 2), "read_mb_s": round(rbps / 1e6, 1),
                      "speedup_vs_end_to_end": round(end_to_end / epoch_s, 2),
                      "three_shards_plus_model_mb": round(3 * shard_mb + model_mb, 1),
                      "kernel": "native" if native.load() is not None else "torch",
                      "training_path": training_path(DPNetClassifier(), torch.device("cpu")),
                      "default_epoch_s": round(fast["epoch_full_s"], 3),
                      "forward_bound_s": round(fast["forward_bound_full_s"], 3),
                      "ratio_forward": round(fast["epoch_full_s"] / fast["forward_bound_full_s"], 4),
                      "ratio_forward_or_read": round(fast["epoch_full_s"] / max(fast["forward_bound_full_s"], read_s), 4),
                      **extra}))


if __name__ == "__main__":
    main()
