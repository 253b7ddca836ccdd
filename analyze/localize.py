"""Localisation checks where the dataset has keypoints or object boxes (CUB layout, synth).

All positions are in original-image pixels. Glossary: N images, P parts, K keypoints, k top regions.

EvalProtoPNet (Huang et al., ICCV 2023) and PIP-Net (Nauta et al., CVPR 2023) judge a part by the
keypoints inside a fixed-size box around its peak: 72 px in their 224 px crops of the bird, i.e.
0.32 of the bird box's side (:data:`EVAL_BOX`). :func:`peak_boxes` draws that box around the
centre of a part's best region, sized by the object box when there is one (as their crops are),
else by the image.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge


def box_centres(pixel_boxes: np.ndarray) -> np.ndarray:
    """(..., 4) x0, y0, x1, y1 -> (..., 2) centres."""
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


EVAL_BOX = 0.32  # EvalProtoPNet's 72 px box at 224 px, as a share of the (bird's) side


def peak_boxes(centres: np.ndarray, frame_wh: np.ndarray, share: float = EVAL_BOX) -> np.ndarray:
    """Boxes (..., 4) x0, y0, x1, y1 of ``share`` of the frame's width and height around ``centres`` (..., 2).

    Args:
        centres: (N, ..., 2) pixel points (a part's peak: the centre of its best region).
        frame_wh: (N, 2) the width and height the box is a share of: the object box, or the image.
    """
    half = (share / 2) * np.asarray(frame_wh, np.float64).reshape((len(centres),) + (1,) * (centres.ndim - 2) + (2,))
    return np.concatenate([centres - half, centres + half], -1)


def keypoint_hits(boxes: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """Which visible keypoints lie in each box: boxes (N, P, 4), kp (N, K, 3) -> bool (N, P, K)."""
    return inside(kp[:, None, :, :2], boxes[:, :, None, :]) & (kp[:, None, :, 2] > 0)


def part_consistency(part_boxes: np.ndarray, kp: np.ndarray, labels: np.ndarray, parts_per_class: int,
                     threshold: float = 0.8) -> tuple[float, np.ndarray]:
    """EvalProtoPNet's consistency: a part is consistent when its box covers the same keypoint in
    >= ``threshold`` of the test images of its class where that keypoint is visible.

    Args:
        part_boxes: (N, P, 4) pixel boxes of each part: its best region (the region-box variant),
            or :func:`peak_boxes` around its best region's centre (EvalProtoPNet's protocol).
        kp: (N, K, 3). labels: (N,).

    Returns:
        The share of consistent parts (percent, higher is better) and each part's best hit rate (P,).
    """
    n, p, _ = part_boxes.shape
    rate = np.zeros(p)
    for part in range(p):
        mine = labels == part // parts_per_class
        if not mine.any():
            continue
        hit = inside(kp[mine, :, :2], part_boxes[mine, part][:, None, :])  # (n_c, K)
        vis = kp[mine, :, 2] > 0
        per_kp = (hit & vis).sum(0) / np.maximum(vis.sum(0), 1)
        rate[part] = per_kp.max()
    return float(100 * (rate >= threshold).mean()), rate


def part_stability(hits: np.ndarray, noisy_hits: np.ndarray, labels: np.ndarray, parts_per_class: int) -> float:
    """EvalProtoPNet's stability: for each part, the share of its class's test images whose set of
    keypoints in its box is the same with the input perturbed; the mean over parts, percent.

    Args:
        hits, noisy_hits: (N, P, K) bool, from :func:`keypoint_hits` on clean and perturbed images.
        labels: (N,). Parts whose class has no image here are left out.
    """
    same = (hits == noisy_hits).all(-1)  # (N, P)
    owner = np.arange(hits.shape[1]) // parts_per_class
    rates = [same[labels == owner[p], p].mean() for p in range(hits.shape[1]) if (labels == owner[p]).any()]
    return float(100 * np.mean(rates)) if rates else float("nan")


def part_purity(hits: np.ndarray) -> float:
    """PIP-Net's purity: for each part, the share of its top-k training regions holding the keypoint
    most of them hold; the mean over parts, in [0, 1].

    Args:
        hits: (P, k, K) bool, which visible keypoints lie in the box of each of a part's top-k regions.
    """
    if not hits.size:
        return float("nan")
    return float((hits.sum(1).max(-1) / hits.shape[1]).mean())


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
