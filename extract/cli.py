"""Command line of stage 1: ``python -m dpnet.extract --dataset synth``."""

from __future__ import annotations

import argparse
import logging

from dpnet.options import Parser, add_arguments, given, parse
from dpnet.stop import run_command

from .backbones import list_backbones
from .config import DATASET_DEFAULTS, GENERAL_DEFAULTS, ExtractConfig
from .datasets import list_datasets
from .pipeline import run_extraction


# the synthetic set's options: ExtractConfig.synth's keys and their flags
SYNTH_FLAGS = {"n_classes": "--synth-classes", "per_class": "--synth-per-class", "image_size": "--synth-image-size"}


def build_parser() -> argparse.ArgumentParser:
    """The options of :class:`ExtractConfig`, made from its fields (their defaults are the config's: an
    option left out is unset here, so the config, and its per-dataset defaults, decide)."""
    d = ExtractConfig.__dataclass_fields__
    p = Parser(prog="python -m dpnet.extract", description=__doc__, argument_default=None)
    add_arguments(p, ExtractConfig, defaults=_default)
    for key, flag in SYNTH_FLAGS.items():
        p.add_argument(flag, type=int, dest=f"synth_{key}",
                       help=f"the synthetic set's {key} (default {d['synth'].default_factory()[key]})")
    p.add_argument("--no-progress", action="store_true")
    p.epilog = f"datasets: {', '.join(list_datasets())}; backbones: {', '.join(list_backbones())}"
    return p


def _default(f) -> str:
    """A field's default in its help, naming the per-dataset ones (from the config)."""
    if f.name not in GENERAL_DEFAULTS:
        return repr(f.default)
    per = ", ".join(f"{o[f.name]!r} for {k}" for k, o in DATASET_DEFAULTS.items() if f.name in o)
    return f"{GENERAL_DEFAULTS[f.name]!r}{'; ' + per if per else ''}"


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The config of the options given; the others are the config's own defaults (per dataset)."""
    options = given(args, ExtractConfig)
    synth = {**ExtractConfig().synth, **{k: getattr(args, f"synth_{k}") for k in SYNTH_FLAGS
                                         if getattr(args, f"synth_{k}") is not None}}
    return ExtractConfig(**options, synth=synth, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> int:
        print(run_extraction(config_from_args(args)).line())
        return 0

    return run_command(body)
