"""Command line of stage 1: ``python -m dpnet.extract --dataset synth``."""

from __future__ import annotations

import argparse
import logging

from .backbones import list_backbones
from .cache import STORES
from .datasets import list_datasets
from dpnet.errors import ConfigError
from dpnet.stop import run_command
from .config import DATASET_DEFAULTS, GENERAL_DEFAULTS, RUNTIMES, ExtractConfig
from .pipeline import run_extraction


# the synthetic set's options: ExtractConfig.synth's keys and their flags
SYNTH_FLAGS = {"n_classes": "--synth-classes", "per_class": "--synth-per-class", "image_size": "--synth-image-size"}


def build_parser() -> argparse.ArgumentParser:
    """The options of :class:`ExtractConfig` (their defaults are the config's: an option left out is
    unset here, so the config, and its per-dataset defaults, decide)."""
    d = ExtractConfig()
    p = argparse.ArgumentParser(prog="python -m dpnet.extract", description=__doc__, argument_default=None)
    p.add_argument("--dataset", help=f"one of {', '.join(list_datasets())} (default {d.dataset})")
    p.add_argument("--data-dir", help="dataset folder (default data/raw/<dataset>)")
    p.add_argument("--backbone", help=f"one of {', '.join(list_backbones())} (default {d.backbone})")
    p.add_argument("--weights", help="state-dict file, or 'random' (tests only)")
    p.add_argument("--regions", type=int, help=_per_dataset("regions", "R, random regions per image"))
    p.add_argument("--image-size", type=int, help=f"input side in pixels (default {d.image_size})")
    p.add_argument("--store", choices=STORES, help=f"default {d.store}")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--shard-mb", type=float, help=f"target size of one shard (default {d.shard_mb:g})")
    p.add_argument("--batch-size", type=int, help="0: 8 on CPU, 64 on CUDA (default)")
    p.add_argument("--workers", type=int, help="decoding processes (-1: auto, the default)")
    p.add_argument("--device", help=f"default {d.device}")
    p.add_argument("--skip-bad", action="store_true", default=None, help="leave unreadable images out (listed in the manifest)")
    p.add_argument("--crop", action=argparse.BooleanOptionalAction,
                   help=_per_dataset("crop", "crop each image to its object box first (the CUB protocol)"))
    p.add_argument("--dense", help=_per_dataset("dense", "square window sizes (grid cells) laid densely, stride 1, "
                                                         "before the random boxes, e.g. 1,2 (they count in --regions; "
                                                         "'none': no dense windows)"))
    p.add_argument("--hypercolumn", action=argparse.BooleanOptionalAction,
                   help="append the backbone's stride-16 stage, pooled into the same regions (EfficientNets; "
                        "default off)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="extract a view cache: every image mirrored left-right, region r the mirror of region r "
                        "of the same cache without --flip (train's --views takes it; default off)")
    p.add_argument("--runtime", choices=RUNTIMES,
                   help="CPU backbone: frozen TorchScript with oneDNN fusion (1.5x faster), eager, or auto "
                        "(the default: frozen for caches of 64+ images)")
    p.add_argument("--test-fraction", type=float, help=f"folder datasets without train/ and test/ (default {d.test_fraction})")
    for key, flag in SYNTH_FLAGS.items():
        p.add_argument(flag, type=int, dest=f"synth_{key}", help=f"the synthetic set's {key} (default {d.synth[key]})")
    p.add_argument("--out-root", help=f"default {d.out_root}")
    p.add_argument("--name", help="cache folder name (default <dataset>-<backbone>-r<R>-s<size>)")
    p.add_argument("--ranks", type=int,
                   help="extraction processes on this machine, each writing every ranks-th shard "
                        "(under torchrun, RANK / WORLD_SIZE are read instead; default 1)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _per_dataset(name: str, text: str) -> str:
    """Help text naming an option's per-dataset defaults (from the config)."""
    per = ", ".join(f"{v} for {k}" for k, v in ((k, o[name]) for k, o in DATASET_DEFAULTS.items() if name in o))
    return f"{text} (default {GENERAL_DEFAULTS[name]!r}{'; ' + per if per else ''})"




def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The config of the options given; the others are the config's own defaults (per dataset)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("no_progress",)}
    synth = {**ExtractConfig().synth, **{k: given.pop(f"synth_{k}") for k in SYNTH_FLAGS if f"synth_{k}" in given}}
    if "dense" in given:
        given["dense"] = () if given["dense"].strip().lower() == "none" else parse_dense(given["dense"])
    return ExtractConfig(**given, synth=synth, progress=not args.no_progress)


def parse_dense(text: str) -> tuple[int, ...]:
    """"2" or "1,2" -> window sizes; anything else is a ConfigError naming DENSE."""
    try:
        sizes = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"DENSE (--dense) takes window sizes in grid cells, like 2 or 1,2, or none; got {text!r}") from None
    return sizes


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)

    def body() -> int:
        print(run_extraction(config_from_args(args)).line())
        return 0

    return run_command(body)
