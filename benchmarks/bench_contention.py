"""A training epoch alone and beside a competing busy torch process, side by side in one run.

Users run a report beside a training, and CI machines are shared. An OpenMP runtime whose idle
threads spin for a core they do not get slows every small op; a fair share of 2 cores between
two busy processes costs about 2x. For each OpenMP wait policy this times the second epoch of
the default fit (on a synthetic cache of the paper's shapes) in a fresh process, alone and with
a competitor (a torch process multiplying matrices on every core it may use), and prints
``contention_slowdown`` = epoch with competitor / epoch alone, per policy, in one JSON line.
The policy dpnet sets by default (see dpnet/__init__.py) is the one reported first. It then times
make train's global baselines the same way, in one torch thread and in all of the process's
(``baselines_one_thread_over_all_alone`` / ``_contended``): their matrices are small.

    python benchmarks/bench_contention.py [--images 160] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

EPOCH_CHILD = """
import sys, json
sys.path.insert(0, {root!r})
import dpnet  # sets the thread defaults before torch starts its OpenMP runtime
from dpnet.extract.cache import RegionCache
from dpnet.train.estimator import DPNetClassifier
rows = []
DPNetClassifier(parts_per_class=20, epochs=2, inner_epochs=1, val_fraction=0.0, device="cpu").fit(
    RegionCache({cache!r}), on_epoch=rows.append)
print(json.dumps({{"epoch_s": rows[1]["seconds"]}}))
"""

BASELINES_CHILD = """
import sys, json, time
sys.path.insert(0, {root!r})
import dpnet  # sets the thread defaults before torch starts its OpenMP runtime
import numpy as np
from dpnet.train import baselines as B
rng = np.random.default_rng(0)
n, d, c = 640, 1280, 50
x = {{k: rng.standard_normal((m, d)).astype(np.float32) for k, m in (("fit", n), ("val", n // 8), ("test", n // 8))}}
y = {{k: rng.integers(0, c, len(v)).astype(np.int64) for k, v in x.items()}}
data = B.GlobalData(x, y, c, np.zeros(d, np.float32), np.ones(d, np.float32))
import torch
B.BASELINE_THREADS = {threads} or torch.get_num_threads()
t0 = time.perf_counter()
for kind in ("linear", "mlp"):
    B.fit_torch_baseline(data, kind, 230, epochs=8, passes=2, lr=1e-2, lr_step=4, batch_size=32, seed=0)
print(json.dumps({{"baselines_s": time.perf_counter() - t0}}))
"""

COMPETITOR = """
import torch
a = torch.randn(512, 512)
while True:
    for _ in range(8):
        b = a @ a
    c = torch.softmax(a, 1).sum()  # small ops too, as a report or a second training runs
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def epoch(cache: Path, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", EPOCH_CHILD.format(root=str(ROOT), cache=str(cache))],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["epoch_s"]


def baselines(threads: int | None) -> float:
    """Seconds of the linear and MLP global baselines (make train's, on global descriptors of
    cub50-dev's shape) in a fresh process; ``threads``: their torch threads (None: the process's)."""
    out = subprocess.run([sys.executable, "-c", BASELINES_CHILD.format(root=str(ROOT), threads=threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["baselines_s"]


def side_by_side(timed: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Best of ``repeats`` seconds of ``timed()`` alone, and beside the competitor (a fresh one each time,
    on OpenMP's own wait policy)."""
    alone, busy = [], []
    for _ in range(repeats):
        alone.append(timed())
        rival = subprocess.Popen([sys.executable, "-c", COMPETITOR], env={k: v for k, v in os.environ.items()
                                                                          if k != "OMP_WAIT_POLICY"})
        try:
            time.sleep(1.0)
            busy.append(timed())
        finally:
            rival.kill()
            rival.wait()
    return min(alone), min(busy)


def measure_baselines(repeats: int) -> dict[str, dict[str, float]]:
    """The baselines alone and beside the competitor, in one thread and in the process's threads."""
    out = {}
    for name, threads in (("one thread", 1), ("all threads", None)):
        a, b = side_by_side(lambda: baselines(threads), repeats)
        out[name] = {"alone_s": round(a, 3), "contended_s": round(b, 3), "contention_slowdown": round(b / a, 2)}
    return out


def measure(cache: Path, policy: str | None, repeats: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DPNET_OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy is not None:
        env["DPNET_OMP_WAIT_POLICY"] = policy
    a, b = side_by_side(lambda: epoch(cache, env), repeats)
    return {"epoch_alone_s": round(a, 3), "epoch_contended_s": round(b, 3), "contention_slowdown": round(b / a, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write-readme", action="store_true", help="put the tables in the README (contention blocks)")
    ap.add_argument("--baselines-only", action="store_true", help="time only the global baselines")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import dpnet

    line = {"cpu": cpu_name(), "cores": dpnet.cpus()}
    if not args.baselines_only:
        line.update(policies_line(args.images, args.repeats))
    line.update(baselines_line(args.repeats))
    print(json.dumps(line))
    if args.write_readme:
        from benchmarks.readme_block import write_block

        if not args.baselines_only:
            write_block("<!-- contention:start -->", "<!-- contention:end -->", table(line, args))
        write_block("<!-- contention-baselines:start -->", "<!-- contention-baselines:end -->",
                    baselines_table(line, args))


def policies_line(images: int, repeats: int) -> dict:
    """The default fit's epoch under each wait policy, and "auto"'s, with the headline ratios."""
    import dpnet
    from benchmarks.bench_train import write_cache

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        write_cache(cache, images, 32, 500, 1280, 10)
        results = {p: measure(cache, p, repeats) for p in ("passive", "runtime", "brief")}
    # "auto" takes passive when the CPUs are already busy as a job starts, else runtime: its alone figure
    # is runtime's, its contended one passive's when the competitor came first (as a running report does)
    auto = {"epoch_alone_s": results["runtime"]["epoch_alone_s"],
            "epoch_contended_s": results["passive"]["epoch_contended_s"]}
    auto["contention_slowdown"] = round(auto["epoch_contended_s"] / auto["epoch_alone_s"], 2)
    results["auto"] = auto
    return {"default_policy": dpnet.OMP_WAIT_POLICY_DEFAULT, "contention_slowdown": auto["contention_slowdown"],
            "passive_alone_over_runtime_alone": round(results["passive"]["epoch_alone_s"] /
                                                      results["runtime"]["epoch_alone_s"], 2),
            "auto_picks_here_now": dpnet.wait_policy("auto"), "policies": results}


def baselines_line(repeats: int) -> dict:
    """The baselines' timings and their two ratios (one thread over all, alone and contended)."""
    b = measure_baselines(repeats)
    return {"baselines": b,
            "baselines_one_thread_over_all_alone": round(b["one thread"]["alone_s"] / b["all threads"]["alone_s"], 2),
            "baselines_one_thread_over_all_contended": round(b["one thread"]["contended_s"] /
                                                             b["all threads"]["contended_s"], 2)}


def timing_table(intro: str, columns: tuple[str, str], results: dict[str, dict[str, float]], alone: str,
                 busy: str) -> str:
    """A README table of timings alone and beside the competitor, a row per setting, under ``intro``;
    ``columns``: the headers of the settings and of the time alone."""
    rows = [intro, "", f"| {columns[0]} | {columns[1]} | beside a busy torch process, s | contention_slowdown |",
            "| --- | --- | --- | --- |"]
    for name, r in results.items():
        rows.append(f"| {name} | {r[alone]:.2f} | {r[busy]:.2f} | {r['contention_slowdown']:.2f} |")
    return "\n".join(rows)


def table(line: dict, args) -> str:
    """The README's table of the wait policies (its CPU named)."""
    intro = (f"Measured by `python benchmarks/bench_contention.py --images {args.images} --repeats {args.repeats}` on "
             f"{line['cpu']} ({line['cores']} CPUs): the default fit's second epoch, best of {args.repeats}.")
    return timing_table(intro, ("OpenMP wait policy", "epoch alone, s"), line["policies"], "epoch_alone_s", "epoch_contended_s")


def baselines_table(line: dict, args) -> str:
    """The README's table of the global baselines' timings (its CPU named)."""
    intro = (f"Measured by `python benchmarks/bench_contention.py --baselines-only --repeats {args.repeats}` on "
             f"{line['cpu']} ({line['cores']} CPUs): `make train`'s linear and MLP global baselines (four weight "
             f"decays each, on global descriptors of cub50-dev's shape), best of {args.repeats}.")
    return timing_table(intro, ("torch threads", "alone, s"), line["baselines"], "alone_s", "contended_s")


if __name__ == "__main__":
    main()
