"""Localisation checks where the dataset has keypoints or object boxes (CUB layout, synth).

All positions are in original-image pixels. Glossary: N images, P parts, K keypoints, k top regions.

EvalProtoPNet (Huang et al., ICCV 2023) and PIP-Net (Nauta et al., CVPR 2023) judge a part by the
keypoints inside a fixed-size box around its peak: 72 px in their 224 px crops of the bird, i.e.
0.32 of the bird box's side (:data:`EVAL_BOX`). A part's peak is :func:`part_peaks` (the mean
centre of its 10 best regions in the image); :func:`peak_boxes` draws that box around it, sized by
the object box when there is one (as their crops are), else by the image.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import Ridge

from dpnet.extract.regions import boxes_to_pixels


def box_centres(pixel_boxes: np.ndarray) -> np.ndarray:
    """(..., 4) x0, y0, x1, y1 (pixels or grid cells) -> (..., 2) centres."""
    return np.stack([(pixel_boxes[..., 0] + pixel_boxes[..., 2]) / 2, (pixel_boxes[..., 1] + pixel_boxes[..., 3]) / 2], -1)


def inside(points: np.ndarray, pixel_boxes: np.ndarray) -> np.ndarray:
    """Whether points (..., 2) lie in boxes (..., 4), broadcast."""
    x, y = points[..., 0], points[..., 1]
    return (x >= pixel_boxes[..., 0]) & (x < pixel_boxes[..., 2]) & (y >= pixel_boxes[..., 1]) & (y < pixel_boxes[..., 3])


def normalise_to_box(points: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Points (N, ..., 2) in pixels -> coordinates in units of each image's object box (N, 4) x, y, w, h."""
    shape = (len(obj),) + (1,) * (points.ndim - 2) + (2,)
    return (points - obj[:, :2].reshape(shape)) / np.maximum(obj[:, 2:], 1e-6).reshape(shape)


def landmark_error(train_parts: np.ndarray, train_kp: np.ndarray, train_box: np.ndarray,
                   test_parts: np.ndarray, test_kp: np.ndarray, test_box: np.ndarray, alpha: float = 1.0) -> float:
    """Region grouping's landmark regression error, x 100 (lower is better).

    Features: the centres of every part's best region, normalised by the object box (2P);
    one ridge regression per keypoint, fitted on the training images where it is visible;
    the mean L2 error on the visible test keypoints, in box units, times 100.

    Args:
        *_parts: (N, P, 2) best-region centres. *_kp: (N, K, 3) x, y, visible. *_box: (N, 4).
    """
    xtr = normalise_to_box(train_parts, train_box).reshape(len(train_parts), -1)
    xte = normalise_to_box(test_parts, test_box).reshape(len(test_parts), -1)
    ytr, yte = normalise_to_box(train_kp[..., :2], train_box), normalise_to_box(test_kp[..., :2], test_box)
    errors = []
    for k in range(train_kp.shape[1]):
        fit, use = train_kp[:, k, 2] > 0, test_kp[:, k, 2] > 0
        if fit.sum() < 2 or not use.any():
            continue
        model = Ridge(alpha=alpha).fit(xtr[fit], ytr[fit, k])
        errors.append(np.linalg.norm(model.predict(xte[use]) - yte[use, k], axis=1))
    return float(100 * np.concatenate(errors).mean()) if errors else float("nan")


PEAK_REGIONS = 10  # a part is where its 10 best regions of the image are (PIP-Net's top-k, as purity)


def best_regions(scores: np.ndarray, k: int = PEAK_REGIONS) -> np.ndarray:
    """Each part's ``k`` best-scoring regions (in no order): scores (..., R, P) -> indices (..., min(k, R), P)."""
    k = min(int(k), scores.shape[-2])
    return torch.topk(torch.as_tensor(np.asarray(scores)), k, dim=-2, sorted=False).indices.numpy()


def part_peaks(scores: np.ndarray, boxes: np.ndarray, k: int = PEAK_REGIONS) -> np.ndarray:
    """Where each part is in each image: the mean centre of its ``k`` best-scoring regions there.

    The one definition of a part's place that the report, ``explain`` and every localisation
    measure use. Among hundreds of overlapping random regions the single best one is a near-tie
    with many others, and its centre jumps with them; the mean of the k best is the centre of
    mass of the part's activation (each of its k best regions one unit of it).

    Args:
        scores: (N, R, P) raw part scores of every region.
        boxes: (N, R, 4) grid boxes ``(x0, y0, x1, y1)``.
        k: regions averaged (all R when k >= R; k = 1 gives the best region's centre).

    Returns:
        float64 (N, P, 2) grid points ``(x, y)``.
    """
    top = best_regions(scores, k)  # (N, k, P)
    centres = box_centres(np.asarray(boxes, np.float64))  # (N, R, 2)
    return np.take_along_axis(centres[:, :, None, :], top[..., None], 1).mean(1)


def peaks_to_pixels(points: np.ndarray, grid_hw: tuple[int, int], image_wh: np.ndarray,
                    crops: np.ndarray | None = None) -> np.ndarray:
    """Grid points (N, P, 2) -> original-image pixel points (N, P, 2) (see :func:`dpnet.extract.regions.boxes_to_pixels`)."""
    return boxes_to_pixels(np.concatenate([points, points], -1), grid_hw, image_wh, crops)[..., :2].astype(np.float64)


CONSISTENT = 0.8  # EvalProtoPNet's rule: a part is consistent above this hit rate
EVAL_BOX = 0.32  # EvalProtoPNet's 72 px box at 224 px, as a share of the (bird's) side


def peak_boxes(centres: np.ndarray, frame_wh: np.ndarray, share: float = EVAL_BOX) -> np.ndarray:
    """Boxes (..., 4) x0, y0, x1, y1 of ``share`` of the frame's width and height around ``centres`` (..., 2).

    Args:
        centres: (N, ..., 2) pixel points (a part's peak, :func:`part_peaks`).
        frame_wh: (N, 2) the width and height the box is a share of: the object box, or the image.
    """
    half = (share / 2) * np.asarray(frame_wh, np.float64).reshape((len(centres),) + (1,) * (centres.ndim - 2) + (2,))
    return np.concatenate([centres - half, centres + half], -1)


def keypoint_hits(boxes: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """Which visible keypoints lie in each box: boxes (N, P, 4), kp (N, K, 3) -> bool (N, P, K)."""
    return inside(kp[:, None, :, :2], boxes[:, :, None, :]) & (kp[:, None, :, 2] > 0)


def consistency_rates(part_boxes: np.ndarray, kp: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each part's hit rate on each keypoint: the share of its class's test images where the
    keypoint is visible whose part box holds it.

    Args:
        part_boxes: (N, P, 4) pixel boxes of each part (see :func:`part_consistency`).
        kp: (N, K, 3). labels: (N,). classes: (P,), each part's class (the model's part_classes).

    Returns:
        float64 (P, K); zero for a part whose class has no image here.
    """
    n, p, _ = part_boxes.shape
    rates = np.zeros((p, kp.shape[1]))
    for part in range(p):
        mine = labels == classes[part]
        if not mine.any():
            continue
        hit = inside(kp[mine, :, :2], part_boxes[mine, part][:, None, :])  # (n_c, K)
        vis = kp[mine, :, 2] > 0
        rates[part] = (hit & vis).sum(0) / np.maximum(vis.sum(0), 1)
    return rates


def part_consistency(part_boxes: np.ndarray, kp: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                     threshold: float = CONSISTENT) -> tuple[float, np.ndarray]:
    """EvalProtoPNet's consistency: a part is consistent when its box covers the same keypoint in
    >= ``threshold`` of the test images of its class where that keypoint is visible.

    Args:
        part_boxes: (N, P, 4) pixel boxes of each part: its best region (the region-box variant),
            or :func:`peak_boxes` around its peak (EvalProtoPNet's protocol).
        kp: (N, K, 3). labels: (N,). classes: (P,), each part's class.

    Returns:
        The share of consistent parts (percent, higher is better) and each part's best hit rate (P,).
    """
    rates = consistency_rates(part_boxes, kp, labels, classes)
    return consistent_share(rates, threshold), rates.max(1)


def consistent_share(rates: np.ndarray, threshold: float = CONSISTENT) -> float:
    """Percent of parts whose best keypoint hit rate (rates (P, K), :func:`consistency_rates`) reaches ``threshold``."""
    return float(100 * (rates.max(1) >= threshold).mean())


def activation_map(scores: np.ndarray, boxes: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A part's activation over the grid: each cell takes the best score of the regions covering it
    (cells no region covers take the lowest score).

    Args:
        scores: (R,) the part's score of each region. boxes: (R, 4) grid boxes. grid: (H, W).

    Returns:
        float64 (H, W).
    """
    scores, boxes = np.asarray(scores, np.float64), np.asarray(boxes)
    ys, xs = np.arange(grid[0]), np.arange(grid[1])
    rows = (boxes[:, 1, None] <= ys) & (ys < boxes[:, 3, None])  # (R, H) the rows each region covers
    cols = (boxes[:, 0, None] <= xs) & (xs < boxes[:, 2, None])  # (R, W)
    cover = rows[:, :, None] & cols[:, None, :]  # (R, H, W)
    return np.where(cover, scores[:, None, None], -np.inf).max(0, initial=-np.inf).clip(min=scores.min())


def part_stability(hits: np.ndarray, noisy_hits: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
    """EvalProtoPNet's stability: for each part, the share of its class's test images whose set of
    keypoints in its box is the same with the input perturbed; the mean over parts, percent.

    Args:
        hits, noisy_hits: (N, P, K) bool, from :func:`keypoint_hits` on clean and perturbed images.
        labels: (N,). classes: (P,), each part's class. Parts whose class has no image here are left out.
    """
    same = (hits == noisy_hits).all(-1)  # (N, P)
    rates = [same[labels == classes[p], p].mean() for p in range(hits.shape[1]) if (labels == classes[p]).any()]
    return float(100 * np.mean(rates)) if rates else float("nan")


def part_purities(hits: np.ndarray) -> np.ndarray:
    """PIP-Net's purity of each part: the share of its top-k training regions holding the keypoint most of
    them hold, in [0, 1].

    Args:
        hits: (P, k, K) bool, which visible keypoints lie in the box of each of a part's top-k regions.

    Returns:
        float64 (P,).
    """
    return (hits.sum(1).max(-1) / max(hits.shape[1], 1)).astype(np.float64)


def part_purity(hits: np.ndarray) -> float:
    """PIP-Net's purity: :func:`part_purities`' mean over parts, in [0, 1] (nan for no part)."""
    return float(part_purities(hits).mean()) if hits.size else float("nan")


def on_part_share(boxes: np.ndarray, kp: np.ndarray) -> float:
    """Percent of evidence peak boxes (N, M, 4) holding at least one of their image's visible keypoints (N, K, 3):
    evidence that sits on the bird's parts, not beside them (on water inside a cropped box, say)."""
    return float(100 * keypoint_hits(boxes, kp).any(-1).mean()) if boxes.size else float("nan")


def on_object_share(centres: np.ndarray, obj: np.ndarray) -> float:
    """Percent of region centres (N, M, 2) inside their image's object box (N, 4 as x, y, w, h)."""
    box = np.concatenate([obj[:, :2], obj[:, :2] + obj[:, 2:]], -1)[:, None, :]  # (N, 1, 4)
    return float(100 * inside(centres, box).mean()) if centres.size else float("nan")


def pointing_game(heat: np.ndarray, grid: tuple[int, int], sizes_wh: np.ndarray, obj: np.ndarray,
                  crops: np.ndarray | None = None) -> float:
    """Percent of images whose heatmap peak (the centre of the top grid cell) is inside the object box.

    Args:
        heat: (N, H, W). sizes_wh: (N, 2) original sizes. obj: (N, 4) x, y, w, h boxes.
        crops: (N, 4) pixel boxes the images were cropped to before resizing (CROP=1), if any.
    """
    h, w = grid
    flat = heat.reshape(len(heat), -1).argmax(1)
    cy, cx = (flat // w + 0.5) / h, (flat % w + 0.5) / w
    if crops is None:
        px, py = cx * sizes_wh[:, 0], cy * sizes_wh[:, 1]
    else:
        px = crops[:, 0] + cx * (crops[:, 2] - crops[:, 0])
        py = crops[:, 1] + cy * (crops[:, 3] - crops[:, 1])
    hit = (px >= obj[:, 0]) & (px < obj[:, 0] + obj[:, 2]) & (py >= obj[:, 1]) & (py < obj[:, 1] + obj[:, 3])
    return float(100 * hit.mean()) if len(hit) else float("nan")


def defining_part_hits(top_boxes: np.ndarray, all_boxes: np.ndarray, kp: np.ndarray, defining: list[int]) -> tuple[float, float]:
    """How often the top part's best region covers a class-defining keypoint, and the chance rate.

    Args:
        top_boxes: (N, 4) pixel box of the top part's best region per image.
        all_boxes: (N, M, 4) the boxes chance draws from: chance = the share of them covering one.
            Pass every part's best region (N, P, 4): same size distribution as the top part's
            (best regions are small; all R random regions are larger and would cover more).
        kp: (N, K, 3) keypoints; ``defining`` lists the keypoint indices that define the class.

    Returns:
        (hit rate, chance rate), both percent.
    """
    pts = kp[:, defining, :2]  # (N, k, 2)
    vis = kp[:, defining, 2] > 0
    hit = (inside(pts, top_boxes[:, None, :]) & vis).any(1)
    chance = (inside(pts[:, None, :, :], all_boxes[:, :, None, :]) & vis[:, None, :]).any(2).mean(1)
    return float(100 * hit.mean()), float(100 * chance.mean())
