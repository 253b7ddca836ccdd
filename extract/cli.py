"""Command line of stage 1: ``python -m extract --dataset synth``."""

from __future__ import annotations

import argparse
import logging

from .backbones import list_backbones
from .cache import STORES
from .datasets import list_datasets
from dpnet.errors import ConfigError
from dpnet.stop import run_command
from .pipeline import RUNTIMES, ExtractConfig, run_extraction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extract", description=__doc__)
    p.add_argument("--dataset", default="synth", help=f"one of {', '.join(list_datasets())}")
    p.add_argument("--data-dir", default=None, help="dataset folder (default data/raw/<dataset>)")
    p.add_argument("--backbone", default="efficientnet_lite0", help=f"one of {', '.join(list_backbones())}")
    p.add_argument("--weights", default=None, help="state-dict file, or 'random' (tests only)")
    p.add_argument("--regions", type=int, default=None, help="R, random regions per image (500; 100 for imagenet)")
    p.add_argument("--image-size", type=int, default=544)
    p.add_argument("--store", default="zarr", choices=STORES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=256.0, help="target size of one shard")
    p.add_argument("--batch-size", type=int, default=0, help="0: 8 on CPU, 64 on CUDA")
    p.add_argument("--workers", type=int, default=-1, help="decoding processes (-1: auto)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed in the manifest)")
    p.add_argument("--crop", action=argparse.BooleanOptionalAction, default=None,
                   help="crop each image to its object box first (the CUB protocol; default: on for cub)")
    p.add_argument("--dense", default=None, help="square window sizes (grid cells) laid densely, stride 1, before the "
                                                 "random boxes, e.g. 1,2 (they count in --regions; 'none': no dense "
                                                 "windows; default: 2 for cub, none elsewhere)")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="CPU backbone: frozen TorchScript with oneDNN fusion (1.5x faster), eager, or auto "
                        "(frozen for caches of 64+ images)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="folder datasets without train/ and test/")
    p.add_argument("--synth-classes", type=int, default=10)
    p.add_argument("--synth-per-class", type=int, default=60)
    p.add_argument("--synth-image-size", type=int, default=256)
    p.add_argument("--out-root", default="data/cache")
    p.add_argument("--name", default=None, help="cache folder name (default <dataset>-<backbone>-r<R>-s<size>)")
    p.add_argument("--ranks", type=int, default=1,
                   help="extraction processes on this machine, each writing every ranks-th shard "
                        "(under torchrun, RANK / WORLD_SIZE are read instead)")
    p.add_argument("--no-progress", action="store_true")
    return p


# Per-dataset defaults of the region options, chosen by measurement on cub50-dev (see the README):
# CUB is cropped to the bird box (the protocol the field's part measures use) and gets a dense
# grid of 2x2-cell windows beside the random boxes.
DATASET_DEFAULTS = {"cub": {"crop": True, "dense": "2"}}


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    synth = {"n_classes": args.synth_classes, "per_class": args.synth_per_class, "image_size": args.synth_image_size}
    regions = args.regions if args.regions is not None else (100 if args.dataset == "imagenet" else 500)
    defaults = DATASET_DEFAULTS.get(args.dataset, {})
    crop = args.crop if args.crop is not None else defaults.get("crop", False)
    dense = args.dense if args.dense is not None else defaults.get("dense", "")
    dense = "" if dense.strip().lower() == "none" else dense
    return ExtractConfig(args.dataset, args.data_dir, args.backbone, args.weights, regions, args.image_size,
                         args.store, args.seed, args.shard_mb, args.batch_size, args.workers, args.device,
                         args.skip_bad, args.test_fraction, synth, args.out_root, args.name, not args.no_progress,
                         ranks=args.ranks, crop=crop, runtime=args.runtime,
                         dense=parse_dense(dense))


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
