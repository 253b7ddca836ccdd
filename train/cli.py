"""Command line of stage 2: ``python -m train [--cache NAME] [--ablation]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from extract.cache import cache_name, resolve_cache
from extract.errors import DpnetError

from .losses import CONSTRAINTS
from .run import TrainConfig, run_ablation, train_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--cache", default=None, help="cache folder or name under data/cache (default: LATEST)")
    p.add_argument("--dataset", default=None, help="use the cache data/cache/<dataset>-* most recently made")
    p.add_argument("--cache-root", default="data/cache")
    p.add_argument("--runs-root", default="data/runs")
    p.add_argument("--run-dir", default=None, help="default <runs-root>/<cache name>")
    p.add_argument("--q", type=int, default=None, help="parts per class (preset: 20; 10 for ImageNet)")
    p.add_argument("--epochs", type=int, default=None, help="outer epochs (preset: 40; 4 for ImageNet)")
    p.add_argument("--inner-epochs", type=int, default=None, help="passes over each loaded shard (preset: 32; 10)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-step", type=int, default=10, help="divide the lr by 10 every this many epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--constraints", default="orth,assign,cs", help=f"comma list of {', '.join(CONSTRAINTS)}, or none")
    p.add_argument("--lambda-orth", type=float, default=1e-2)
    p.add_argument("--lambda-assign", type=float, default=1e-3)
    p.add_argument("--lambda-cs", type=float, default=1e-3)
    p.add_argument("--init", default="random", choices=("random", "regions"),
                   help="random (default; measured better on synth) or regions (each part at a training region of its class)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--memory-budget-mb", type=float, default=None, help="hold the training split when it fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--ablation", action="store_true", help="train the 8 constraint settings of Table 2")
    p.add_argument("--no-progress", action="store_true")
    return p


def pick_cache(args: argparse.Namespace) -> Path | str:
    if args.cache or not args.dataset:
        return resolve_cache(args.cache, args.cache_root)
    found = sorted(Path(args.cache_root).glob(f"{args.dataset}-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DpnetError(f"no finished cache for dataset {args.dataset!r} in {args.cache_root}: "
                         f"run `make extract DATASET={args.dataset}` first")
    return found[-1].parent


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cache = pick_cache(args)
    constraints = () if args.constraints in ("", "none") else tuple(args.constraints.split(","))
    return TrainConfig(cache=str(cache), run_dir=args.run_dir or str(Path(args.runs_root) / cache_name(cache)),
                       parts_per_class=args.q, epochs=args.epochs, inner_epochs=args.inner_epochs, lr=args.lr,
                       lr_step=args.lr_step, batch_size=args.batch_size, constraints=constraints,
                       lambdas={"orth": args.lambda_orth, "assign": args.lambda_assign, "cs": args.lambda_cs},
                       init=args.init, val_fraction=args.val_fraction, memory_budget_mb=args.memory_budget_mb,
                       seed=args.seed, device=args.device, baselines=not args.no_baselines,
                       progress=not args.no_progress)


def summary_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in ("dpnet", "global_linear", "global_mlp", "global_logreg") if k in metrics]
    lines = [f"{'model':<14} {'top-1':>7} {'mean-class':>11}"]
    lines += [f"{k:<14} {m['top1']:>7.2f} {m['mean_class']:>11.2f}" for k, m in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.ablation:
            rows = run_ablation(cfg)
            print((Path(cfg.run_dir) / "ablation.md").read_text())
            return 0 if rows else 1
        metrics = train_run(cfg)
    except (DpnetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(metrics))
    print(f"run: {cfg.run_dir} (metrics.json, model.pt, log.csv); config: "
          f"{json.dumps({k: metrics['config'][k] for k in ('parts_per_class', 'epochs', 'inner_epochs', 'lr')})}")
    return 0
