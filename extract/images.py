"""Image decoding for the extraction DataLoader: any mode to RGB, resized to a square.

Decoding runs in DataLoader workers. A bad file never raises inside a worker: it comes back
as an error string, so the main process can list every bad file at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .regions import crop_box

MIN_SIDE = 8  # smaller images carry no usable region at any grid size


def load_rgb(path: str | Path, size: int, bbox: tuple[float, float, float, float] | None = None
             ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image, convert it to RGB, crop it to ``bbox`` (x, y, w, h; optional, see
    :func:`extract.regions.crop_box`), and resize it to ``size x size`` (aspect not kept).

    Grayscale, palette, RGBA (alpha dropped over white) and CMYK images are converted to RGB.

    Returns:
        uint8 array (size, size, 3) and the original ``(width, height)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable image, is truncated, or is smaller than MIN_SIDE.
    """
    try:
        with Image.open(path) as img:
            orig = img.size
            if min(orig) < MIN_SIDE:
                raise ValueError(f"image is {orig[0]}x{orig[1]} px; at least {MIN_SIDE}x{MIN_SIDE} is needed")
            if bbox is None and img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.draft("RGB", (size, size))  # decode at a reduced scale that is still >= size
            img = _to_rgb(img)
            if bbox is not None:
                img = img.crop(crop_box(bbox, orig))
            img = img.resize((size, size), Image.BILINEAR)
            return np.array(img, dtype=np.uint8), orig
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy() if img.readonly else img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
    return img.convert("RGB")


@dataclass
class Decoded:
    """One DataLoader item: the image or the reason it failed."""

    position: int
    pixels: torch.Tensor | None  # uint8 (S, S, 3), as decoded
    size_wh: tuple[int, int]
    error: str | None


class ImageFiles(torch.utils.data.Dataset):
    """Paths to decoded uint8 tensors; item ``i`` is ``paths[i]``."""

    def __init__(self, paths: list[Path], size: int, bboxes: list | None = None):
        self.paths = paths
        self.size = size
        self.bboxes = bboxes  # per position, (x, y, w, h) to crop to, or None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        try:
            arr, orig = load_rgb(self.paths[i], self.size, self.bboxes[i] if self.bboxes else None)
        except FileNotFoundError:
            return Decoded(i, None, (0, 0), "file not found")
        except ValueError as exc:
            return Decoded(i, None, (0, 0), str(exc))
        return Decoded(i, torch.from_numpy(arr), orig, None)


@dataclass
class DecodedBatch:
    """A collated batch: good images stacked, bad ones listed apart."""

    positions: list[int]  # of the good images, in batch order
    pixels: torch.Tensor  # uint8 (n_good, 3, S, S), channels_last (the decoded HWC bytes, not copied)
    sizes_wh: np.ndarray  # int32 (n_good, 2)
    errors: list[tuple[int, str]]

    def pin_memory(self) -> "DecodedBatch":
        self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[Decoded]) -> DecodedBatch:
    """Stack the decoded images of a batch and keep the failures apart."""
    good = [it for it in items if it.error is None]
    if good:
        pixels = torch.stack([it.pixels for it in good]).permute(0, 3, 1, 2)  # (N, S, S, 3) viewed as NCHW
    else:
        pixels = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return DecodedBatch([it.position for it in good], pixels,
                        np.array([it.size_wh for it in good], np.int32).reshape(-1, 2),
                        [(it.position, it.error) for it in items if it.error is not None])
