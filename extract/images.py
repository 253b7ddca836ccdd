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

from dpnet.errors import ImageDecodeError

from .regions import crop_box

MIN_SIDE = 8  # smaller images carry no usable region at any grid size


def load_rgb(path: str | Path, size: int, bbox: tuple[float, float, float, float] | None = None
             ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image, convert it to RGB, crop it to ``bbox`` (x, y, w, h; optional, see
    :func:`dpnet.extract.regions.crop_box`), and resize it to ``size x size`` (aspect not kept).

    Grayscale, palette, RGBA (alpha dropped over white), CMYK and high-bit-depth (16-bit, 32-bit
    integer, float) images are converted to 8-bit RGB.

    Returns:
        uint8 array (size, size, 3) and the original ``(width, height)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageDecodeError (a ValueError): the file is not a readable image, is truncated, or is
            smaller than MIN_SIDE; the message names the file.
    """
    try:
        with Image.open(path) as img:
            orig = oriented_size(img)
            if min(orig) < MIN_SIDE:
                raise ImageDecodeError(f"{path}: image is {orig[0]}x{orig[1]} px; at least {MIN_SIDE}x{MIN_SIDE} "
                                       f"is needed")
            if bbox is None and img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.draft("RGB", (size, size))  # decode at a reduced scale that is still >= size
            img = to_rgb(oriented(img))
            if bbox is not None:
                img = img.crop(crop_box(bbox, orig))
            return resize_square(np.array(img, dtype=np.uint8), size), orig  # writable: torch wraps it
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` as photo viewers show it: after its EXIF orientation."""
    w, h = img.size
    return (h, w) if _orientation(img) in TRANSPOSED else (w, h)


def oriented(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation tag, as photo viewers and cameras' own software show it.

    dpnet applies the tag everywhere an image is read (extraction, the report, explain), so the
    model, the regions drawn and the boxes (in the upright frame) always agree.
    """
    code = _orientation(img)
    if code in (None, 1):
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: read the pixels as stored
        return None


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), bilinear with antialiasing (aspect not kept).

    torch's uint8 path: within one grey level of PIL's BILINEAR resize and 2-3x faster (0.9 ms
    against 2.8 ms per CUB image at 544 px on the reference machine). The result is an HWC view
    of channel-planar memory (not copied back to HWC): ``collate`` stacks the planes as they are.
    """
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)  # channels_last view
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return x[0].permute(1, 2, 0).numpy()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: alpha over white, palette and CMYK converted, deep greys rescaled."""
    if img.mode == "RGB":
        return img.copy() if img.readonly else img
    if img.mode.startswith("I") or img.mode == "F":
        return _deep_grey_to_rgb(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
    return img.convert("RGB")


def _deep_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*", or "I" as PNG decodes it), 32-bit integer and float greys to 8-bit RGB.

    PIL's own conversion clips every value above 255, so a 16-bit photo comes out white. Integer
    images are scaled by their type's range (values up to 65535 read as 16-bit), floats in
    [0, 1] by 255; anything larger is scaled by its own maximum.
    """
    arr = np.asarray(img, dtype=np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":
        scale = 255.0 if top <= 1.0 else 255.0 / max(top, 1e-12) if top > 255 else 1.0
    elif img.mode.startswith("I;16") or 255 < top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0 if top <= 255 else 255.0 / top
    grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")


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
        except ValueError as exc:  # the caller lists the path beside the reason
            return Decoded(i, None, (0, 0), str(exc).removeprefix(f"{self.paths[i]}: "))
        return Decoded(i, torch.from_numpy(arr), orig, None)


@dataclass
class DecodedBatch:
    """A collated batch: good images stacked, bad ones listed apart."""

    positions: list[int]  # of the good images, in batch order
    pixels: torch.Tensor  # uint8 (n_good, 3, S, S)
    sizes_wh: np.ndarray  # int32 (n_good, 2)
    errors: list[tuple[int, str]]

    def pin_memory(self) -> "DecodedBatch":
        self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[Decoded]) -> DecodedBatch:
    """Stack the decoded images of a batch and keep the failures apart."""
    good = [it for it in items if it.error is None]
    if good:  # (N, 3, S, S) as stacked planes; the extractor lays them out for its runtime
        pixels = torch.stack([it.pixels.permute(2, 0, 1) for it in good])
    else:
        pixels = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return DecodedBatch([it.position for it in good], pixels,
                        np.array([it.size_wh for it in good], np.int32).reshape(-1, 2),
                        [(it.position, it.error) for it in items if it.error is not None])
