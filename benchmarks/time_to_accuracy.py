"""Time to accuracy on a real dataset: extraction, the default fit, the paper's schedule, side by side.

In one run, through the same commands a user runs (``python -m dpnet.extract`` / ``python -m dpnet.train``,
i.e. ``make extract`` / ``make train``), on a dataset given by path:
  1. the extraction of the set with the default options, timed;
  2. the default ``make train`` (preset "default", with the global baselines), its fit time, its wall
     time and top-1; then the default ``make report`` of that run (quick pixel measures), timed;
  3. the default schedule run for twice its epochs without early stopping ("long"): whether the
     default stops before accuracy is reached;
  4. the paper's schedule (preset "paper": lr 1e-3, 40 x 32 batch-level epochs, exact backward)
     for ``--paper-epochs`` of its 40 outer epochs; its full fit time is extrapolated from the
     measured per-epoch time (the top-1 shown is the one reached after those epochs).
Prints a table, then one JSON line with ``train_over_extract`` = default fit / extraction,
``make_train_over_extract`` = the whole ``make train`` / extraction, ``report_over_extract`` and
``accuracy_gap`` = the best top-1 of the schedules run here - the default's, and (for CUB) the
default fit of the full CUB-200-2011 projected from the measured per-pass time: passes cost
in proportion to images x parts (5,994 x 0.85 fitting images, 200 classes). Skipped, with a
message, when the data folder is absent. ``--write-readme`` puts the table in the README
between ``<!-- tta:<data folder name>:start -->`` and its end marker.

    python benchmarks/time_to_accuracy.py --dataset cub --data-dir ../shared/data/cub50-dev
    python benchmarks/time_to_accuracy.py --dataset folder --data-dir ../shared/data/flowers102-dev
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from readme_block import write_block  # noqa: E402

from dpnet.train.estimator import DPNetClassifier  # noqa: E402
from dpnet.train.gemm import training_path  # noqa: E402


def run(cmd: list[str]) -> float:
    """Wall seconds of a command (its output goes to ours); a failure stops the benchmark."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def fit(cache: Path, run_dir: Path, *options: str, baselines: bool = False) -> dict:
    """``python -m dpnet.train`` into ``run_dir`` (with the global baselines: what ``make train`` runs);
    its metrics.json plus the command's wall seconds."""
    wall = run(["-m", "dpnet.train", "--cache", str(cache), "--run-dir", str(run_dir), "--no-progress",
                *([] if baselines else ["--no-baselines"]), *options])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = (run_dir / "log.csv").read_text().strip().splitlines()  # a header, then a row an epoch
    seconds = [float(row.split(",")[log[0].split(",").index("seconds")]) for row in log[1:]]
    classes = json.loads((cache / "manifest.json").read_text())["classes"]
    return {**metrics["dpnet"], "wall_s": wall, "config": metrics["config"], "n_fit": metrics["n_fit"],
            "n_classes": len(classes), "epoch_seconds": sum(seconds),
            "passes": len(seconds) * metrics["config"]["inner_epochs"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=["cub", "folder"])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--paper-epochs", type=int, default=1, help="outer epochs of the paper's 40 to run")
    ap.add_argument("--work", default=None, help="folder for the cache and runs (default: a temporary one, removed)")
    ap.add_argument("--extract-args", default="", help="more options for python -m dpnet.extract, e.g. '--test-fraction 0.5'")
    ap.add_argument("--write-readme", action="store_true", help="put the table in the README between its markers")
    ap.add_argument("--label", default=None, help="the set's name in the table and README marker (default: the folder's)")
    args = ap.parse_args()
    if not Path(args.data_dir).is_dir():
        print(f"time_to_accuracy: skipped, {args.data_dir} is absent (give --data-dir a {args.dataset} dataset folder)")
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tta_"))
    try:
        return measure(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> int:
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    extract_s = run(["-m", "dpnet.extract", "--dataset", args.dataset, "--data-dir", args.data_dir, "--out-root",
                     str(work / "cache"), "--no-progress", *args.extract_args.split()])
    cache = next(p for p in (work / "cache").iterdir() if p.is_dir())
    default = fit(cache, work / "default", baselines=True)  # make train: the fit and the baselines
    report_s = run(["-m", "dpnet.analyze", "report", "--run", str(work / "default"), "--no-progress"])  # make report
    epochs = default["config"]["epochs"]
    long = fit(cache, work / "long", "--epochs", str(2 * epochs), "--patience", "0")
    paper = fit(cache, work / "paper", "--preset", "paper", "--epochs", str(args.paper_epochs),
                "--lr-step", "10")
    paper_full = 40
    paper_full_s = paper["fit_seconds"] / args.paper_epochs * paper_full
    label = args.label or Path(args.data_dir).name
    path = training_path(DPNetClassifier(), torch.device("cpu"))
    rows = [("default", default), ("default, 2x epochs, no early stop", long),
            (f"paper, {args.paper_epochs} of 40 epochs", paper)]
    best = max(m["top1"] for _, m in rows)
    n_fit, n_classes = default["n_fit"], default["n_classes"]
    per_pass = default["epoch_seconds"] / default["passes"]
    full_cub_s = per_pass * (5994 * 0.85 / n_fit) * (200 / n_classes) * default["passes"] if args.dataset == "cub" else None
    again = f" --label {args.label}" if args.label else ""
    table = [f"`python benchmarks/time_to_accuracy.py --dataset {args.dataset} --data-dir {args.data_dir}{again}` "
             f"({label}: {n_fit} fitting images, {n_classes} classes; cache {cache.name}):", "",
             "| step | passes | seconds | top-1 |", "| --- | --- | --- | --- |",
             f"| extraction | | {extract_s:.0f} | |"]
    table += [f"| {name} | {m['passes']} | {m['fit_seconds']:.0f} | {m['top1']:.1f} |" for name, m in rows]
    table.append(f"| paper, 40 epochs (extrapolated) | 1280 | {paper_full_s:.0f} | |")
    if full_cub_s is not None:
        table.append(f"| default on full CUB-200-2011 (projected) | {default['passes']} | {full_cub_s:.0f} | |")
    table.append(f"| make train (default fit + global baselines, wall) | | {default['wall_s']:.0f} | |")
    table.append(f"| make report (the default, quick pixel measures, wall) | | {report_s:.0f} | |")
    table += ["", f"train_over_extract {default['fit_seconds'] / extract_s:.2f} (the fit); make_train_over_extract "
                  f"{default['wall_s'] / extract_s:.2f} (the whole command); report_over_extract "
                  f"{report_s / extract_s:.2f}; accuracy_gap "
                  f"{best - default['top1']:.2f} points. Default training path: {path}."]
    text = "\n".join(table)
    print(text)
    out = {"dataset": args.data_dir, "training_path": path, "extract_s": round(extract_s, 1), "default_fit_s": default["fit_seconds"],
           "default_train_wall_s": round(default["wall_s"], 1), "default_top1": default["top1"],
           "default_passes": default["passes"], "long_fit_s": long["fit_seconds"], "long_top1": long["top1"],
           "paper_epochs": args.paper_epochs, "paper_fit_s": paper["fit_seconds"], "paper_top1": paper["top1"],
           "paper_full_fit_s_extrapolated": round(paper_full_s, 1),
           "full_cub_default_fit_s_projected": None if full_cub_s is None else round(full_cub_s, 1),
           "train_over_extract": round(default["fit_seconds"] / extract_s, 3),
           "make_train_over_extract": round(default["wall_s"] / extract_s, 3),
           "report_s": round(report_s, 1), "report_over_extract": round(report_s / extract_s, 3),
           "accuracy_gap": round(best - default["top1"], 2)}
    if args.write_readme:
        write_block(f"<!-- tta:{label}:start -->", f"<!-- tta:{label}:end -->", text)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
