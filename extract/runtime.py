"""How stage 1 runs the backbone on this machine: the feature extractor (eager, or frozen TorchScript
with oneDNN fusion on the CPU), its decoding workers, and the processes of ``RANKS=N``.

The plan of a cache and its shard loop live in :mod:`dpnet.extract.pipeline`; they call this.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from pathlib import Path

import numpy as np
import torch

from dpnet.errors import CacheMismatchError

from .backbones import Backbone, create_backbone
from .config import RUNTIMES, ExtractConfig
from .images import ImageFiles, collate
from .regions import global_means, image_boxes, region_means

log = logging.getLogger(__name__)


FROZEN_WARMUP_CALLS = 2  # the profiling executor's runs of a new shape before its optimised graph


FROZEN_MIN_IMAGES = 64


class FeatureExtractor:
    """Backbone + region pooling for decoded uint8 batches, on one device.

    ``runtime="frozen"`` (CPU) runs the backbone as a frozen TorchScript graph with oneDNN's
    operator fusion: EfficientNet-Lite0 at 544 px ran 1.5x faster than eager on the 2-core
    reference machine, its maps within 2e-5 of eager's (relative), far inside float16's
    precision. It is made on the first batch (a few seconds); a backbone that cannot be traced
    runs eager, with a warning.

    ``batch``: the batch size of the run. The frozen graph pads a shorter batch (a shard's last) to it:
    each new input shape costs it profiling runs and a compilation (1.1 s for Lite0 at 544 px on
    2 cores, against 0.2 s for a batch of 8), and a cache's shards end on many different ones.
    """

    def __init__(self, bb: Backbone, grid: tuple[int, int], n_regions: int, seed: int, device: torch.device,
                 runtime: str = "eager", dense: tuple[int, ...] = (), flip: bool = False, batch: int | None = None):
        self.bb, self.grid, self.n_regions, self.seed, self.device = bb, grid, n_regions, seed, device
        self.dense, self.flip, self.batch = tuple(dense), flip, batch
        self.cuda = device.type == "cuda"
        # channels_last on both devices: measured 1.7x faster on CPU (oneDNN) for Lite0 at 544 px.
        self.body = bb.body.to(device).to(memory_format=torch.channels_last)
        self.runtime = "eager" if self.cuda else runtime
        self._frozen = None
        self._warm: set[tuple[int, ...]] = set()
        std = torch.tensor(bb.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # (x / 255 - mean) / std = x * scale - shift
        self.neg_shift = -torch.tensor(bb.mean, device=device).view(1, 3, 1, 1) / std

    def boxes(self, image_ids: list[int]) -> np.ndarray:
        """int16 (N, R, 4) boxes of these images; with ``flip``, each the mirror (left-right) of the
        unflipped cache's box of the same index, so region r of a flipped image shows what region r
        of the image shows."""
        h, w = self.grid
        boxes = np.stack([image_boxes(self.seed, i, self.n_regions, h, w, self.dense) for i in image_ids])
        return mirror_boxes(boxes, w) if self.flip else boxes

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, S, S) and (N, R, 4) -> float16 regions (N, R, D) and global (N, D); with
        ``flip`` the images are mirrored left-right first (``boxes`` are then the mirrored ones)."""
        if self.flip:
            pixels = pixels.flip(-1)
        regions, glob = self.pool(self.features(self.normalise(pixels)), boxes)
        return regions.half().cpu().numpy(), glob.half().cpu().numpy()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (N, 3, S, S) -> the backbone's map, float32 (N, D, H, W)."""
        if self.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.body(x).float()
        return self._cpu_body(x).float()

    @torch.no_grad()
    def pool(self, fmap: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (N, D, H, W) and grid boxes (N, R, 4) -> float32 region means (N, R, D) and global means (N, D)."""
        return region_means(fmap, torch.from_numpy(boxes).to(self.device)), global_means(fmap)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32 (x / 255 - mean) / std on the device, in two passes.

        Laid out channels_last for eager convolutions (1.7x faster on CPU for Lite0); the frozen
        graph takes planar input (oneDNN reorders it once itself: 1.1 ms per image less at 544 px).
        """
        layout = torch.contiguous_format if self.runtime == "frozen" else torch.channels_last
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=layout)
        return torch.addcmul(self.neg_shift, x.float(), self.scale)

    def _cpu_body(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime == "frozen" and self._frozen is None:
            self._frozen = frozen_body(self.body, x) or self.body
        body = self._frozen if self._frozen is not None else self.body
        n = len(x)
        if self._frozen is not None and self.batch is not None and n < self.batch:
            x = torch.cat([x, x.new_zeros((self.batch - n,) + tuple(x.shape[1:]))])  # one shape for every batch
        if self._frozen is not None and tuple(x.shape) not in self._warm:
            # TorchScript's profiling executor runs the first calls of each input shape through other
            # (unfused) kernels, whose float rounding differs: a resumed cache would differ from an
            # unbroken one in the first and last batch of its first shard. Every real call is a warm one.
            for _ in range(FROZEN_WARMUP_CALLS):
                body(x)
            self._warm.add(tuple(x.shape))
        return body(x)[:n]


def mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Grid boxes (..., 4) ``(x0, y0, x1, y1)`` (half-open cells) mirrored left-right on a grid ``width`` wide."""
    out = boxes.copy()
    out[..., 0], out[..., 2] = width - boxes[..., 2], width - boxes[..., 0]
    return out


def extractor_for(manifest: dict[str, Any], where: str, device: torch.device | None = None,
                  runtime: str = "eager") -> FeatureExtractor:
    """The extraction stage of a cache, again: its backbone (with the same weights, or an error),
    input size, grid, R and seed, so images described now match the cached ones.

    Raises:
        CacheMismatchError: the backbone weights found here are not those the cache was made with.
    """
    weights = manifest["weights"] if manifest["weights"] == "random" or Path(str(manifest["weights"])).is_file() else None
    bb = create_backbone(manifest["backbone"], weights, manifest["image_size"],
                         bool(manifest.get("config", {}).get("hypercolumn", False)))
    if bb.weights_sha256 != manifest.get("weights_sha256"):
        raise CacheMismatchError(f"the {manifest['backbone']} weights found here ({bb.weights}) are not those the cache "
                                 f"{where} was extracted with ({manifest['weights']}): the same weights are needed")
    config = manifest.get("config", {})
    return FeatureExtractor(bb, tuple(manifest["grid"]), manifest["R"], manifest["seed"], device or torch.device("cpu"),
                            runtime, tuple(config.get("dense", ())), bool(config.get("flip", False)))


def frozen_body(body: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module | None:
    """``body`` traced on ``example``, frozen, with oneDNN fusion on; None (with a warning) when it cannot be."""
    import warnings

    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated for torch.compile, which ran Lite0 slower here (25-30 img/s
            # against 35 at 544 px, 2 cores): keep it while that holds
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
            return torch.jit.freeze(torch.jit.trace(body.eval(), example[:1], check_trace=False))
    except Exception as exc:  # noqa: BLE001 - any model TorchScript cannot trace runs eager instead
        log.warning("the backbone cannot be frozen for the CPU (%s: %s); it runs eager (slower)",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def resolve_runtime(runtime: str, device: torch.device, n_images: int) -> str:
    """"eager" or "frozen" for ``runtime`` = "auto" | "eager" | "frozen".

    auto: frozen on the CPU for caches of at least FROZEN_MIN_IMAGES images (its few seconds of
    set-up pay for themselves), eager otherwise and on CUDA (which runs bfloat16 autocast).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    return "frozen" if device.type == "cpu" and n_images >= FROZEN_MIN_IMAGES else "eager"


def default_workers(cuda: bool, cores: int) -> int:
    """Decoding processes when ``workers=-1``.

    On CUDA the CPU only decodes: up to 8 workers. On CPU the backbone already uses every
    core, and an extra decoding process oversubscribes them: on the 2-core reference machine
    decoding in the main process was 0.2-0.3 s faster per 64 images at 544 px than one worker.
    So CPU runs decode in-process unless there are cores to spare.
    """
    if cuda:
        return min(8, cores)
    return 0 if cores <= 4 else min(4, cores // 4)


def _loader(files: ImageFiles, batches: list[list[int]], workers: int, pin: bool):
    if workers == 0 and not pin:  # in-process decoding: a plain loop, without DataLoader's machinery
        return (collate([files[i] for i in batch]) for batch in batches)
    return torch.utils.data.DataLoader(files, batch_sampler=batches, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin,
                                       persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


def _rank_main(cfg: ExtractConfig, threads: int, parent: int) -> None:
    """One rank of ``RANKS=N``: dies with its parent, takes the parent's thread count, extracts its shards."""
    from .pipeline import run_extraction

    _die_with_parent(parent)
    # Each rank uses the parent's torch thread count: the CPU kernels' results can depend on
    # it (and a spawned child would otherwise read OMP_NUM_THREADS afresh), and the cache must
    # not depend on how many ranks made it.
    torch.set_num_threads(threads)
    run_extraction(cfg)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux), so a killed ``RANKS=N``
    run leaves no rank working on; exit at once if the parent is already gone."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("no prctl here: ranks outlive a killed parent")
    if os.getppid() != parent:
        os._exit(1)
