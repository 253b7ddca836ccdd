"""The training GEMMs' dtype on this CPU: the default fit in float32 and in bfloat16, side by side.

On one cache, for each seed, ``python -m dpnet.train --gemm-dtype float32`` and ``--gemm-dtype
bfloat16`` (no baselines), alternated so that both see the same machine state. Prints a table of
fit seconds, test and validation top-1 per seed and their means, then one JSON line with
``bf16_speedup`` (float32 fit seconds / bfloat16's, means over the seeds), ``bf16_top1_cost`` (float32's
mean test top-1 minus bfloat16's) and ``auto`` (what ``--gemm-dtype auto``, the default, takes here).
On a CPU without bfloat16 units (AVX2) the bfloat16 GEMMs are emulated and slow: that is the rule's
other side. ``--write-readme`` puts the table in the README between ``<!-- gemm-dtype:<label>:start -->``
and its end marker.

    python benchmarks/gemm_dtype.py data/cache/cub-efficientnet_lite0-r500-d2-s544-crop --label cub50-dev
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_contention import cpu_name  # noqa: E402
from readme_block import write_block  # noqa: E402
from time_to_accuracy import fit  # noqa: E402

from dpnet.train.gemm import cpu_has_bf16_units, resolve_gemm_dtype  # noqa: E402

DTYPES = ("float32", "bfloat16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label", default=None, help="the README marker's name (default: the cache folder's)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    if not (args.cache / "manifest.json").is_file():
        print(f"skipped: {args.cache} is not a cache (no manifest.json); make one with make extract")
        return 0
    runs: dict[str, list[dict]] = {d: [] for d in DTYPES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for dtype in DTYPES:
                runs[dtype].append(fit(args.cache, Path(tmp) / f"{dtype}-{seed}", "--gemm-dtype", dtype,
                                       "--seed", str(seed)))
    mean = {d: {k: float(np.mean([m[k] for m in runs[d]])) for k in ("fit_seconds", "top1", "val_top1")} for d in DTYPES}
    units = "bfloat16 units (AMX / AVX512-BF16)" if cpu_has_bf16_units() else "no bfloat16 units (AVX2)"
    auto = str(resolve_gemm_dtype("auto", torch.device("cpu"))).replace("torch.", "")
    again = f" --label {args.label}" if args.label else ""
    lines = [f"`python benchmarks/gemm_dtype.py data/cache/{args.cache.name}{again}` ({cpu_name()}, {torch.get_num_threads()} threads, "
             f"{units}; `--gemm-dtype auto` takes {auto} here):", "",
             "| GEMMs | " + " | ".join(f"seed {s}: fit s / top-1 / val top-1" for s in args.seeds) + " | mean |",
             "| --- |" + " --- |" * (len(args.seeds) + 1)]
    for d in DTYPES:
        cells = [f"{m['fit_seconds']:.0f} / {m['top1']:.1f} / {m['val_top1']:.1f}" for m in runs[d]]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {mean[d]['fit_seconds']:.0f} / {mean[d]['top1']:.2f} / "
                     f"{mean[d]['val_top1']:.1f} |")
    speedup = mean["float32"]["fit_seconds"] / mean["bfloat16"]["fit_seconds"]
    cost = mean["float32"]["top1"] - mean["bfloat16"]["top1"]
    lines += ["", f"bf16_speedup {speedup:.2f} (float32 fit seconds / bfloat16's); bf16_top1_cost {cost:.2f} points "
                  f"(float32's mean test top-1 - bfloat16's)."]
    text = "\n".join(lines)
    print(text)
    if args.write_readme:
        label = args.label or args.cache.name
        write_block(f"<!-- gemm-dtype:{label}:start -->", f"<!-- gemm-dtype:{label}:end -->", text)
    print(json.dumps({"cpu": cpu_name(), "bf16_units": cpu_has_bf16_units(), "auto": auto, "seeds": args.seeds,
                      "bf16_speedup": round(speedup, 3), "bf16_top1_cost": round(cost, 2),
                      **{f"{d}_{k}": round(v, 2) for d in DTYPES for k, v in mean[d].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
