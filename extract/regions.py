"""Random regions on a feature grid and their exact mean descriptors.

Glossary: N images, R regions, D descriptor size, H x W the feature grid.
Boxes are ``(x0, y0, x1, y1)`` in feature-grid cells, half-open: a box covers the cells
``x0 <= x < x1`` and ``y0 <= y < y1`` (torchvision's corner order, integer cells).
"""

from __future__ import annotations

import numpy as np
import torch


def sample_boxes(seed: int, image_id: int, n_regions: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Draw ``n_regions`` random boxes for one image, reproducibly from ``(seed, image_id)``.

    Both corners of each side are drawn uniformly among the ``W + 1`` (resp. ``H + 1``) grid
    lines, distinct, so that every box is at least one cell wide and high. The draw depends on
    nothing but the two integers, so batch size, worker count and rank cannot change it.

    Args:
        seed: the extraction seed.
        image_id: the dataset's integer id of the image.
        n_regions: R.
        grid_h: H, rows of the feature grid.
        grid_w: W, columns of the feature grid.

    Returns:
        int16 array of shape (R, 4): ``(x0, y0, x1, y1)`` with ``x0 < x1 <= W``, ``y0 < y1 <= H``.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"feature grid must be at least 1x1, got {grid_h}x{grid_w}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(image_id)])))
    x0, x1 = _distinct_pairs(rng, n_regions, grid_w)
    y0, y1 = _distinct_pairs(rng, n_regions, grid_h)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int16)


def dense_boxes(sizes: tuple[int, ...], grid_h: int, grid_w: int) -> np.ndarray:
    """Every square window of each size in ``sizes`` (cells), at stride 1 on the grid, row by row.

    Beside the random boxes these give every image the same local coverage: a part that looks for
    a small thing (a beak, an eye ring) finds a small box on it in every image, so its best region
    (and so its peak) does not move with the luck of the random draw.

    Returns:
        int16 (M, 4) ``(x0, y0, x1, y1)``, M = sum over sizes k of (H - k + 1)(W - k + 1).
    """
    out = []
    for k in sizes:
        if not 1 <= k <= min(grid_h, grid_w):
            raise ValueError(f"dense window size {k} does not fit a {grid_h}x{grid_w} grid")
        ys, xs = np.mgrid[0:grid_h - k + 1, 0:grid_w - k + 1]
        out.append(np.stack([xs.ravel(), ys.ravel(), xs.ravel() + k, ys.ravel() + k], 1))
    return np.concatenate(out).astype(np.int16) if out else np.zeros((0, 4), np.int16)


def image_boxes(seed: int, image_id: int, n_regions: int, grid_h: int, grid_w: int,
                dense: tuple[int, ...] = ()) -> np.ndarray:
    """The R = ``n_regions`` boxes of one image: the dense windows of ``dense`` sizes first, then
    random boxes (:func:`sample_boxes`) for the rest.

    Raises:
        ValueError: the dense windows alone are more than ``n_regions``.
    """
    fixed = dense_boxes(tuple(dense), grid_h, grid_w)
    if len(fixed) > n_regions:
        raise ValueError(f"dense windows of sizes {list(dense)} make {len(fixed)} boxes on a {grid_h}x{grid_w} grid, "
                         f"more than REGIONS={n_regions}: raise REGIONS or drop a size")
    return np.concatenate([fixed, sample_boxes(seed, image_id, n_regions - len(fixed), grid_h, grid_w)])


def _distinct_pairs(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n sorted pairs of distinct integers drawn uniformly from [0, size]."""
    a = rng.integers(0, size + 1, n)
    b = rng.integers(0, size, n)
    b = b + (b >= a)  # uniform over the values != a
    return np.minimum(a, b), np.maximum(a, b)


def integral_image(features: torch.Tensor) -> torch.Tensor:
    """Zero-padded 2-D cumulative sum: ``I[..., y, x] = sum(F[..., :y, :x])``.

    Args:
        features: Tensor[N, D, H, W].

    Returns:
        float32 (float64 when the input is float64) Tensor[N, D, H + 1, W + 1].
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    out = features.to(dtype).cumsum(-1).cumsum(-2)
    return torch.nn.functional.pad(out, (1, 0, 1, 0))


def _integral_rows(features: torch.Tensor) -> torch.Tensor:
    """Tensor[N, D, H, W] -> its integral image as Tensor[N, (H+1)(W+1), D], D innermost."""
    n, d, _, _ = features.shape
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.permute(0, 2, 3, 1).to(dtype)  # (N, H, W, D); free for a channels_last map
    return torch.nn.functional.pad(x.cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0)).reshape(n, -1, d)


def region_means(features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Exact mean of the feature map over each box, from four look-ups in its integral image.

    Args:
        features: Tensor[N, D, H, W], the backbone's last convolutional map.
        boxes: integer Tensor[N, R, 4], ``(x0, y0, x1, y1)`` half-open grid cells.

    Returns:
        Tensor[N, R, D], float32 (float64 for float64 input).
    """
    n, d, h, w = features.shape
    if boxes.shape[0] != n or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N={n}, R, 4), got {tuple(boxes.shape)}")
    integral = _integral_rows(features).flatten(0, 1)  # (N (H+1)(W+1), D)
    b = boxes.to(device=features.device, dtype=torch.long)
    x0, y0, x1, y1 = b.unbind(-1)  # each (N, R)
    stride = w + 1
    first = (torch.arange(n, device=features.device) * (h + 1) * stride)[:, None, None]  # (N, 1, 1)
    corners = torch.stack([y1 * stride + x1, y0 * stride + x1, y1 * stride + x0, y0 * stride + x0], -1) + first
    inv_area = 1.0 / ((x1 - x0) * (y1 - y0)).to(integral.dtype)  # (N, R)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=integral.dtype, device=integral.device)
    weights = inv_area.unsqueeze(-1) * signs  # (N, R, 4)
    # One fused kernel: each output row is the weighted sum of its four corner rows.
    out = torch.nn.functional.embedding_bag(corners.reshape(-1, 4), integral,
                                            per_sample_weights=weights.reshape(-1, 4), mode="sum")
    return out.view(n, -1, d)


def global_means(features: torch.Tensor) -> torch.Tensor:
    """Mean of the feature map over the whole grid. Tensor[N, D, H, W] -> float32 Tensor[N, D]."""
    return features.float().mean(dim=(2, 3))


def crop_box(bbox_xywh: tuple[float, float, float, float], image_wh: tuple[int, int], min_side: int = 8) -> tuple[int, int, int, int]:
    """The integer pixel box ``(x0, y0, x1, y1)`` that CROP=1 cuts from an image of size ``image_wh``.

    The object box is rounded outwards, clipped to the image and grown to ``min_side`` pixels,
    so extraction and analysis (which maps regions back to original pixels) agree.
    """
    w, h = int(image_wh[0]), int(image_wh[1])
    x, y, bw, bh = bbox_xywh
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    x1, y1 = min(w, int(np.ceil(x + bw))), min(h, int(np.ceil(y + bh)))
    if x1 - x0 < min_side:
        x0 = max(0, min(x0, w - min_side))
        x1 = min(w, x0 + min_side)
    if y1 - y0 < min_side:
        y0 = max(0, min(y0, h - min_side))
        y1 = min(h, y0 + min_side)
    return x0, y0, x1, y1


def boxes_to_pixels(boxes: np.ndarray, grid_hw: tuple[int, int], image_wh: np.ndarray,
                    crops: np.ndarray | None = None) -> np.ndarray:
    """Map grid-cell boxes to original-image pixel boxes.

    The image was resized to a square without keeping its aspect ratio, so each axis scales
    on its own: a cell spans ``width / W`` pixels across and ``height / H`` down.

    Args:
        boxes: (..., R, 4) grid boxes ``(x0, y0, x1, y1)``.
        grid_hw: (H, W) of the feature grid.
        image_wh: (..., 2) original ``(width, height)`` of each image, broadcast against boxes.
        crops: optional (..., 4) pixel boxes the images were cropped to before resizing (CROP=1,
            see :func:`crop_box`); the result is still in original-image pixels.

    Returns:
        float32 (..., R, 4) pixel boxes ``(x0, y0, x1, y1)`` in the original image.
    """
    h, w = grid_hw
    if crops is not None:
        crops = np.asarray(crops, dtype=np.float32)
        image_wh = crops[..., 2:] - crops[..., :2]
    wh = np.asarray(image_wh, dtype=np.float32)[..., None, :]  # (..., 1, 2)
    scale = np.concatenate([wh[..., :1] / w, wh[..., 1:] / h, wh[..., :1] / w, wh[..., 1:] / h], -1)
    out = boxes.astype(np.float32) * scale
    if crops is not None:
        out += np.concatenate([crops[..., :2], crops[..., :2]], -1)[..., None, :]
    return out
