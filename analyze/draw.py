"""Pure drawing functions on the explainers' arrays: crops, heatmap overlays, assignment maps, curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


DRAW_SIDE = 1024  # pictures are drawn at most this many pixels on a side, whatever the file's size


def open_rgb(path: str | Path, bbox: tuple[float, float, float, float] | None = None,
             max_side: int = DRAW_SIDE) -> Image.Image:
    """An image file as RGB for drawing, as extraction read it (EXIF orientation, alpha over white,
    CMYK, palette, deep greys), cut to ``bbox`` (x, y, w, h in the file's upright pixels, CROP=1)
    when given, and shrunk to at most ``max_side`` on a side, so memory stays bounded for any file.

    Region boxes map to it through its own size (:func:`dpnet.extract.regions.boxes_to_pixels`).
    """
    from dpnet.extract.images import oriented, oriented_size, to_rgb
    from dpnet.extract.regions import crop_box

    with Image.open(path) as img:
        orig = oriented_size(img)
        if bbox is None and img.format == "JPEG" and img.mode in ("RGB", "L"):
            img.draft("RGB", (max_side, max_side))  # decoded at a reduced scale, still >= max_side
        img = to_rgb(oriented(img))
    if bbox is not None:
        sx, sy = img.size[0] / orig[0], img.size[1] / orig[1]
        x0, y0, x1, y1 = crop_box(bbox, orig)
        img = img.crop((int(x0 * sx), int(y0 * sy), max(int(x1 * sx), int(x0 * sx) + 1), max(int(y1 * sy), int(y0 * sy) + 1)))
    img.thumbnail((max_side, max_side), Image.BILINEAR)
    return img


def crop(img: Image.Image, box: np.ndarray, size: int = 96) -> Image.Image:
    """The pixel box (x0, y0, x1, y1) of ``img``, fitted into ``size`` x ``size``."""
    x0, y0, x1, y1 = (int(round(float(t))) for t in box)
    out = img.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    out.thumbnail((size, size))
    return out


def overlay_heatmap(img: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Heat (H, W) in [0, 1] over the whole image, bilinear, coloured with matplotlib's 'jet'."""
    from matplotlib import colormaps

    small = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8))
    big = np.asarray(small.resize(img.size, Image.BILINEAR), dtype=np.float32) / 255
    colour = (colormaps["jet"](big)[..., :3] * 255).astype(np.uint8)
    return Image.blend(img, Image.fromarray(colour), alpha)


def part_picture(img: Image.Image, amap: np.ndarray, box: np.ndarray, side: int = 128) -> Image.Image:
    """ProtoPNet's picture of a part: the image shrunk to ``side``, its activation map (H, W) over it
    (scaled to its own range) and the pixel box (x0, y0, x1, y1 in ``img``'s pixels) drawn on it."""
    from PIL import ImageDraw

    lo, hi = float(amap.min()), float(amap.max())
    out = overlay_heatmap(img, (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap), alpha=0.4)
    scale = side / max(img.size)
    out = out.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BILINEAR)
    x0, y0, x1, y1 = (float(t) * scale for t in box)
    ImageDraw.Draw(out).rectangle((x0, y0, x1, y1), outline=(255, 255, 0), width=max(2, side // 64))
    return out


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8 (n, 3))."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if n <= 20 else colormaps["hsv"]
    return (np.array([cmap(i / max(n, 1) if n > 20 else i)[:3] for i in range(n)]) * 255).astype(np.uint8)


def overlay_assignment(img: Image.Image, amap: np.ndarray, parts: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Cells of ``amap`` (H, W) coloured by part (colour i for parts[i]); -1 cells left as they are."""
    colours = palette(len(parts))
    lookup = {int(p): i for i, p in enumerate(parts)}
    rgba = np.zeros(amap.shape + (4,), np.uint8)
    for (y, x), p in np.ndenumerate(amap):
        if p >= 0 and int(p) in lookup:
            rgba[y, x, :3], rgba[y, x, 3] = colours[lookup[int(p)]], int(255 * alpha)
    layer = Image.fromarray(rgba, "RGBA").resize(img.size, Image.NEAREST)
    out = img.convert("RGBA")
    out.alpha_composite(layer)
    return out.convert("RGB")


def line_plot(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
              title: str) -> None:
    """Save a small line chart of named (x, y) series as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
