"""Command line of stage 2: ``python -m dpnet.train [--cache NAME] [--preset paper] [--ablation]``.

Every hyper-parameter of DPNetClassifier is an option (``--parts-per-class``/``--q``,
``--epochs``, ``--lr``, ...); those not given take the preset's value, then the default.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dpnet.errors import ConfigError
from dpnet.options import Parser, parse
from dpnet.stop import run_command
from dpnet.extract.cache import cache_name, resolve_cache
from dpnet.extract.cache.reader import find_cache

from . import distributed
from .config import PRESETS, SCHEDULES, TrainConfig, add_fit_arguments, fit_options
from .run import run_ablation, train_run


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpnet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(p)
    p.add_argument("--runs-root", default="data/runs")
    p.add_argument("--run-dir", default=None, help="default <runs-root>/<cache name>")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="default: the measured defaults; paper: the paper's model and schedule")
    p.add_argument("--schedule", default="default", choices=sorted(SCHEDULES),
                   help="paper: the paper's schedule (lr 1e-3, 40 x 32 batch-level epochs) on the preset's model")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--ablation", action="store_true", help="train the 8 constraint settings of Table 2")
    p.add_argument("--no-progress", action="store_true")
    add_fit_arguments(p)
    return p


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """The options that pick a cache (train and analyze share them)."""
    p.add_argument("--cache", default=None, help="cache folder or name under data/cache (default: LATEST)")
    p.add_argument("--dataset", default=None, help="use the cache data/cache/<dataset>-* most recently made")
    p.add_argument("--backbone", default=None, help="with --dataset: only caches of this backbone")
    p.add_argument("--regions", type=int, default=None, help="with --dataset: only caches of R regions")
    p.add_argument("--image-size", type=int, default=None, help="with --dataset: only caches of this input size")
    p.add_argument("--cache-root", default="data/cache")
    p.add_argument("--views", default=None,
                   help="the cache's view cache (the same extraction with FLIP=1: every image mirrored), for the "
                        "agree constraint (--constraints ...,agree)")


def pick_cache(args: argparse.Namespace) -> Path | str:
    """The cache the options name (:func:`dpnet.extract.cache.reader.find_cache`): --cache, else the
    newest of --dataset with the --backbone, --regions and --image-size asked for, else LATEST."""
    want = {k: v for k, v in (("backbone", getattr(args, "backbone", None)), ("R", getattr(args, "regions", None)),
                              ("image_size", getattr(args, "image_size", None))) if v is not None}
    return find_cache(args.cache, args.dataset, args.cache_root, want)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cache = pick_cache(args)
    return TrainConfig(cache=str(cache), run_dir=args.run_dir or str(Path(args.runs_root) / cache_name(cache)),
                       options=fit_options(args), preset=args.preset, baselines=not args.no_baselines,
                       progress=not args.no_progress, schedule=args.schedule,
                       views=str(resolve_cache(args.views, args.cache_root)) if args.views else None)


def summary_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in ("dpnet", "global_linear", "global_mlp", "global_logreg") if k in metrics]
    lines = [f"{'model':<14} {'top-1':>7} {'mean-class':>11}"]
    lines += [f"{k:<14} {m['top1']:>7.2f} {m['mean_class']:>11.2f}" for k, m in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    return run_command(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if distributed.init_from_env():  # started by torchrun with several ranks
            rank = distributed.world()[0]
            try:
                metrics = train_run(cfg)
            finally:
                distributed.close()
            if rank > 0:
                return 0
        elif args.ablation:
            rows = run_ablation(cfg)
            print((Path(cfg.run_dir) / "ablation.md").read_text())
            return 0 if rows else 1
        else:
            metrics = train_run(cfg)
    except ValueError as exc:  # a hyper-parameter the estimator refused
        raise ConfigError(str(exc)) from None
    print(summary_table(metrics))
    shown = {k: metrics["config"][k] for k in ("preset", "schedule", "parts_per_class", "epochs", "inner_epochs", "lr")
             if k in metrics["config"]}
    print(f"run: {cfg.run_dir} (metrics.json, model.pt, log.csv); config: {json.dumps(shown)}")
    return 0
