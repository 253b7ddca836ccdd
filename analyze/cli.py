"""Command line of stage 3: ``python -m dpnet.analyze report [--run NAME]`` and ``python -m dpnet.analyze explain IMG``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dpnet.extract.cache import cache_name
from dpnet.errors import DpnetError
from dpnet.options import Parser, add_arguments, given, parse
from dpnet.stop import run_command
from dpnet.train.cli import add_cache_arguments, pick_cache
from dpnet.train.run import read_run

from .config import AnalyzeConfig


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpnet.analyze", description=__doc__)
    p.add_argument("command", choices=("report", "explain"))
    p.add_argument("image", nargs="?", help="explain: the image file")
    p.add_argument("--run", default=None, help="run folder or name under data/runs (default: the LATEST cache's run)")
    add_cache_arguments(p)
    p.add_argument("--runs-root", default="data/runs")
    add_arguments(p, AnalyzeConfig)
    p.add_argument("--out", default=None, help="explain: output folder (default <run>/explain/<image name>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> AnalyzeConfig:
    """The config of the options given; the others are the config's defaults."""
    return AnalyzeConfig(**given(args, AnalyzeConfig), progress=not args.no_progress)


def pixel_plan(args: argparse.Namespace) -> tuple[int, int]:
    """(test images, curve steps) of the pixel-space measures the options ask for."""
    return config_from_args(args).pixel_plan()


def check_args(args: argparse.Namespace) -> AnalyzeConfig:
    """The analysis config of the options, refusing values it cannot take (naming the option)."""
    return config_from_args(args).validate()


def resolve_run(args: argparse.Namespace) -> Path:
    """The run folder named by --run, or the run of the cache that --cache/--dataset/LATEST picks."""
    if args.run:
        path = Path(args.run)
        run = path if path.is_dir() or len(path.parts) > 1 else Path(args.runs_root) / path
    else:
        run = Path(args.runs_root) / cache_name(pick_cache(args))
    read_run(run)  # a clear error for a missing model, an unfinished training or a lost cache
    return run


def _dask_client(where: str | None):
    """A context holding a distributed client for ``--dask`` (nothing when it is not given)."""
    import contextlib

    if where is None:
        return contextlib.nullcontext()
    from distributed import Client

    return Client(processes=True, dashboard_address=None) if where == "local" else Client(where)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    return run_command(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    cfg = check_args(args)
    run = resolve_run(args)
    if args.command == "report":
        from .report import build_report

        images, steps = cfg.pixel_plan()
        with _dask_client(cfg.dask):
            page = build_report(run, k=cfg.top_k, n_show=cfg.images, boxes_csv=cfg.boxes_csv, progress=cfg.progress,
                                use_dask=cfg.dask is not None, pixel_images=images, pixel_steps=steps)
        print(f"report: {page}")
        return 0
    if not args.image or not Path(args.image).is_file():  # a missing file; a bad one is named by load_rgb
        raise DpnetError(f"explain needs an existing image file: IMG={args.image!r} (make explain IMG=path/to/photo.jpg)")
    from .single import explain_image

    res = explain_image(args.image, run, args.out)
    print(f"predicted: {res.pred_name} (class {res.pred})")
    print("top parts: " + ", ".join(f"part {p} ({v:+.3f})" for p, v in res.top_parts))
    print(f"page: {res.page}")
    return 0
