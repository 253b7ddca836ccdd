"""Localisation checks where the dataset has keypoints or object boxes (CUB layout, synth).

All positions are in original-image pixels. Glossary: N images, P parts, K keypoints.
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


def part_consistency(best_boxes: np.ndarray, kp: np.ndarray, labels: np.ndarray, parts_per_class: int,
                     threshold: float = 0.8) -> tuple[float, np.ndarray]:
    """EvalProtoPNet's consistency: a part is consistent when its best region covers the same
    keypoint in >= ``threshold`` of the test images of its class (where that keypoint is visible).

    Args:
        best_boxes: (N, P, 4) pixel boxes of each part's best region. kp: (N, K, 3). labels: (N,).

    Returns:
        The share of consistent parts (percent, higher is better) and each part's best hit rate (P,).
    """
    n, p, _ = best_boxes.shape
    rate = np.zeros(p)
    for part in range(p):
        mine = labels == part // parts_per_class
        if not mine.any():
            continue
        hit = inside(kp[mine, :, :2], best_boxes[mine, part][:, None, :])  # (n_c, K)
        vis = kp[mine, :, 2] > 0
        per_kp = (hit & vis).sum(0) / np.maximum(vis.sum(0), 1)
        rate[part] = per_kp.max()
    return float(100 * (rate >= threshold).mean()), rate


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
