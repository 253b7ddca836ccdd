"""Measures with the backbone in the loop, on a seeded sample of test images.

- Stability (EvalProtoPNet): Gaussian noise (sigma 0.2, clipped to +-0.25) on the normalised
  image, the image described again with the same backbone and boxes; does each part of the
  image's class still cover the same keypoints?
- Deletion and insertion (RISE): the image's grid cells blanked (deletion) or revealed on a
  blank image (insertion) in the order an explanation ranks them, the class probability after
  each step; the area under that curve. Orders compared on the same model: DP-Net's evidence
  (each part's positive points spread over its best regions), the same number of cells at
  random, and the class activation map of the global linear baseline on the same backbone.
  Every pixel measure comes with a 95% bootstrap interval over the sample's images.

Images go through exactly extraction's path (:func:`dpnet.extract.runtime.extractor_for`); the
forward passes of a sample are batched. Glossary: N images, R regions, D descriptor size,
P parts, C classes, K keypoints, (H, W) the feature grid, S the input side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpnet.extract.cache import RegionCache
from dpnet.extract.images import load_rgb
from dpnet.extract.runtime import extractor_for
from dpnet.extract.regions import crop_box
from dpnet.train.estimator import DPNetClassifier

from .localize import best_regions, keypoint_hits, part_peaks, peak_boxes, peaks_to_pixels

log = logging.getLogger(__name__)

NOISE_STD, NOISE_CLIP = 0.2, 0.25  # EvalProtoPNet's perturbation of the normalised input


@dataclass
class Sample:
    """The test images the pixel measures run on, with what they need to be described again."""

    ids: np.ndarray  # (N,) image ids
    labels: np.ndarray  # (N,)
    boxes: np.ndarray  # (N, R, 4) grid boxes, as cached
    sizes: np.ndarray  # (N, 2) original (width, height)
    paths: list[Path]
    crops: list  # per image, the object box (x, y, w, h) to crop to (CROP=1 caches), or None

    def subset(self, keep: np.ndarray) -> "Sample":
        """The rows where ``keep`` (N,) bool is true."""
        idx = np.flatnonzero(keep)
        return Sample(self.ids[idx], self.labels[idx], self.boxes[idx], self.sizes[idx],
                      [self.paths[i] for i in idx], [self.crops[i] for i in idx])


def sample_test_images(cache: RegionCache, n: int, seed: int, bboxes: dict | None = None) -> Sample:
    """``n`` test images drawn with ``seed`` (all when n >= their number), in cache order."""
    table = {r["image_id"]: r["path"] for r in cache.image_table()}
    parts = [a for _, a in cache.iter_shards("test", ("boxes", "sizes", "labels", "image_ids"))]
    ids = np.concatenate([p["image_ids"] for p in parts]) if parts else np.zeros(0, np.int64)
    pick = np.sort(np.random.default_rng(seed).permutation(len(ids))[:n])
    crop = bool(cache.manifest.get("config", {}).get("crop"))
    chosen = ids[pick]
    joined = {k: np.concatenate([p[k] for p in parts])[pick] for k in ("labels", "boxes", "sizes")}
    return Sample(chosen, joined["labels"], joined["boxes"], joined["sizes"], [cache.image_file(table[int(i)]) for i in chosen],
                  [(bboxes or {}).get(int(i)) if crop else None for i in chosen])


class PixelProbe:
    """Describes sample images again from (perturbed) pixels, as extraction did, and scores them."""

    def __init__(self, est: DPNetClassifier, cache: RegionCache, runtime: str = "frozen"):
        self.est, self.module = est, est.module_
        self.fx = extractor_for(cache.manifest, str(cache.path), runtime=runtime)
        self.size, self.grid = int(cache.manifest["image_size"]), tuple(cache.manifest["grid"])
        self._blank: torch.Tensor | None = None  # the blank image's map (1, D, H, W), made once when needed

    def normalised(self, sample: Sample, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Normalised images (n, 3, S, S) of ``sample`` rows ``idx``, and their original sizes (n, 2)."""
        decoded = [load_rgb(sample.paths[i], self.size, sample.crops[i]) for i in idx]
        pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a, _ in decoded])
        return self.fx.normalise(pixels), np.array([wh for _, wh in decoded], np.float64)

    @torch.no_grad()
    def scores(self, x: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (n, 3, S, S), grid boxes (n, R, 4) -> scores (n, R, P) and the map (n, D, H, W)."""
        fmap = self.fx.features(x)
        return self._map_scores(fmap, boxes), fmap

    @torch.no_grad()
    def blank_scores(self, boxes: np.ndarray) -> torch.Tensor:
        """Scores (1, R, P) of the blank image (0 after normalisation, the dataset's mean colour) in one
        image's grid boxes (R, 4): its map is the same for every image, so the backbone runs once."""
        if self._blank is None:
            self._blank = self.fx.features(torch.zeros(1, 3, self.size, self.size))
        return self._map_scores(self._blank, boxes[None])

    def _map_scores(self, fmap: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """Maps (n, D, H, W) and grid boxes (n, R, 4) -> scores (n, R, P)."""
        regions, _ = self.fx.pool(fmap, boxes)
        return self.module.scores(regions)


# --------------------------------------------------------------------------------- stability
def stability_hits(probe: PixelProbe, sample: Sample, kp: np.ndarray, frames: np.ndarray, seed: int = 0,
                   batch: int = 8, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints in the peak box (around :func:`dpnet.analyze.localize.part_peaks`) of each part of the image's
    class, clean and perturbed: two (N, q, K) bool.

    Args:
        kp: (N, K, 3) keypoints of the sample. frames: (N, 2) the width and height the peak box
            is a share of (the object box; see :func:`dpnet.analyze.localize.peak_boxes`).
    """
    q = probe.est.parts_per_class
    clean, noisy = [], []
    for a in tqdm(range(0, len(sample.ids), batch), desc="stability", unit="batch", disable=not progress):
        idx = np.arange(a, min(a + batch, len(sample.ids)))
        x, sizes = probe.normalised(sample, idx)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(sample.ids[idx[0]]))
        noise = torch.randn(x.shape, generator=gen).mul_(NOISE_STD).clamp_(-NOISE_CLIP, NOISE_CLIP)
        own = torch.from_numpy(sample.labels[idx] * q)[:, None] + torch.arange(q)  # (n, q) the class's parts
        for images, out in ((x, clean), (x + noise, noisy)):
            s, _ = probe.scores(images, sample.boxes[idx])
            mine = s.gather(2, own[:, None, :].expand(-1, s.shape[1], -1)).numpy()  # (n, R, q)
            peaks = peaks_to_pixels(part_peaks(mine, sample.boxes[idx]), probe.grid, sizes, _crops(sample, idx, sizes))
            out.append(keypoint_hits(peak_boxes(peaks, frames[idx]), kp[idx]))
    return np.concatenate(clean), np.concatenate(noisy)


def _crops(sample: Sample, idx: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    if sample.crops[idx[0]] is None:
        return None
    return np.array([crop_box(sample.crops[i], tuple(wh)) for i, wh in zip(idx, sizes)], np.float32)


# ----------------------------------------------------------------------- deletion, insertion
def evidence_map(boxes: np.ndarray, top: np.ndarray, points: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """DP-Net's evidence on the grid: each part's positive points spread over its best regions (the
    regions that say where it is, :func:`dpnet.analyze.localize.best_regions`), each region's share evenly
    over its cells.

    Args:
        boxes: (R, 4) grid boxes. top: (k, P) each part's k best regions. points: (P,) v_cp b_p.

    Returns:
        float64 (H, W), summing to the positive points.
    """
    out = np.zeros(grid)
    for p in np.flatnonzero(points > 0):
        for r in top[:, p]:
            x0, y0, x1, y1 = (int(t) for t in boxes[r])
            out[y0:y1, x0:x1] += points[p] / (len(top) * (x1 - x0) * (y1 - y0))
    return out


def cam_map(fmap: torch.Tensor, linear: dict[str, torch.Tensor], cls: int) -> np.ndarray:
    """The global linear baseline's class activation map: sum_d w_cd F_d(h, w) / std_d. fmap (D, H, W) -> (H, W)."""
    w = linear["weight"][cls] / linear["std"]  # the baseline standardised the global mean of F
    return torch.einsum("d,dhw->hw", w.to(fmap.dtype), fmap).numpy().astype(np.float64)


def cell_order(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grid cells (flat indices) from most to least salient; ties (cells no evidence names) at random."""
    flat = saliency.ravel()
    return np.lexsort((rng.permutation(len(flat)), -flat))


def step_masks(order: np.ndarray, steps: int, grid: tuple[int, int], size: int, insert: bool) -> torch.Tensor:
    """(steps + 1, 1, S, S) keep-masks: after step k the first k/steps of ``order`` is blanked (or,
    inserting, revealed on a blank image)."""
    n = len(order)
    masks = np.ones((steps + 1, n), np.float32) if not insert else np.zeros((steps + 1, n), np.float32)
    for k in range(steps + 1):
        masks[k, order[:round(k * n / steps)]] = 0.0 if not insert else 1.0
    grid_masks = torch.from_numpy(masks).view(steps + 1, 1, *grid)
    return F.interpolate(grid_masks, size=(size, size), mode="nearest")


@torch.no_grad()
def deletion_curves(probe: PixelProbe, sample: Sample, linear: dict[str, torch.Tensor] | None, steps: int = 8,
                    seed: int = 0, batch: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
    """Class probability along deletion and insertion, for each order: name -> (N, steps + 1).

    Names: ``deletion_<order>``, ``insertion_<order>`` with order in dpnet, random, cam (cam
    only with the ``linear`` baseline's weights). Blanked pixels are 0 after normalisation (the
    dataset mean colour). The class is the one the model predicts on the intact image.
    """
    rng = np.random.default_rng(seed)
    orders = ("dpnet", "random", "cam") if linear is not None else ("dpnet", "random")
    curves = {f"{kind}_{o}": [] for kind in ("deletion", "insertion") for o in orders}
    for i in tqdm(range(len(sample.ids)), desc="deletion / insertion", unit="image", disable=not progress):
        x, _ = probe.normalised(sample, np.array([i]))
        s, fmap = probe.scores(x, sample.boxes[i:i + 1])
        pooled = probe.module.pool(s)
        cls = int(probe.module.logits(pooled.b).argmax())
        points = probe.module.contributions(pooled.b)[0, cls].numpy()
        saliency = {"dpnet": evidence_map(sample.boxes[i], best_regions(s[0].numpy()), points, probe.grid),
                    "random": np.zeros(probe.grid)}
        if linear is not None:
            saliency["cam"] = cam_map(fmap[0], linear, cls)
        # the intact and the blank image end or start every curve: the intact one is scored above, the
        # blank one's map is the same for every image; the backbone runs on the inner steps only
        inner = [(f"{kind}_{o}", x * step_masks(cell_order(saliency[o], rng), steps, probe.grid, probe.size,
                                                kind == "insertion")[1:steps])
                 for kind in ("deletion", "insertion") for o in orders]
        intact = _prob(probe, s, cls)[0]
        blank = _prob(probe, probe.blank_scores(sample.boxes[i]), cls)[0]
        probs = _class_probs(probe, torch.cat([imgs for _, imgs in inner]), sample.boxes[i], cls, batch)
        for k, (name, _) in enumerate(inner):
            middle = probs[k * (steps - 1):(k + 1) * (steps - 1)]
            ends = (intact, blank) if name.startswith("deletion") else (blank, intact)
            curves[name].append(np.concatenate([[ends[0]], middle, [ends[1]]]))
    return {k: np.array(c) for k, c in curves.items()}


def _class_probs(probe: PixelProbe, images: torch.Tensor, boxes: np.ndarray, cls: int, batch: int) -> np.ndarray:
    """softmax probability of ``cls`` for each image (all share one image's grid boxes)."""
    out = [np.zeros(0, np.float32)]
    for a in range(0, len(images), batch):
        chunk = images[a:a + batch]
        s, _ = probe.scores(chunk, np.broadcast_to(boxes, (len(chunk),) + boxes.shape).copy())
        out.append(_prob(probe, s, cls))
    return np.concatenate(out)


def _prob(probe: PixelProbe, scores: torch.Tensor, cls: int) -> np.ndarray:
    """Scores (n, R, P) -> the softmax probability of ``cls`` (n,)."""
    return probe.module.logits(probe.module.pool(scores).b).softmax(1)[:, cls].numpy()


def areas(curves: np.ndarray) -> np.ndarray:
    """Area under each of (N, steps + 1) curves over x in [0, 1] (trapezoids): (N,)."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2).mean(1)


def auc(curves: np.ndarray) -> float:
    """Mean area under (N, steps + 1) curves over x in [0, 1] (the mean of :func:`areas`)."""
    return float(areas(curves).mean()) if len(curves) else float("nan")
