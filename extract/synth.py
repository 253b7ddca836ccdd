"""A synthetic fine-grained dataset in the CUB-200-2011 layout, deterministic from a seed.

Each image shows one "bird" (body, head, wing, tail, a body marking) at a random position,
scale, angle and mirror over a cluttered background. Classes share body, wing and tail; they
differ only in the look of two small parts: the head (``HEAD_STYLES``) and the marking
(``MARK_STYLES``). A global average mostly sees body and clutter, a well-placed region sees
the head. Every part has a ground-truth keypoint and the object a box.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dpnet.errors import DatasetLayoutError
from dpnet.files import remove_stale_temps

log = logging.getLogger(__name__)

PART_NAMES = ["head", "wing", "tail", "marking"]
CLASS_DEFINING_PARTS = ("head", "marking")  # the only parts whose look depends on the class
HEAD_STYLES = ["red_plain", "red_striped", "blue_plain", "blue_dotted", "yellow_ringed"]
MARK_STYLES = ["white_bar", "black_spot"]
_HEAD_COLORS = {"red": (200, 30, 40), "blue": (30, 60, 200), "yellow": (230, 200, 30)}


@dataclass(frozen=True)
class SynthSpec:
    """Size of a synthetic set; everything else follows from the seed."""

    n_classes: int = 10
    per_class: int = 60
    image_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_classes <= len(HEAD_STYLES) * len(MARK_STYLES):
            raise ValueError(f"synth n_classes must be 1..{len(HEAD_STYLES) * len(MARK_STYLES)}, got {self.n_classes}")
        if self.per_class < 2 or self.image_size < 32:
            raise ValueError("synth needs per_class >= 2 and image_size >= 32")


def class_name(c: int) -> str:
    """Name of synthetic class c (0-based): its head style and marking style."""
    return f"{c + 1:03d}.{HEAD_STYLES[c % len(HEAD_STYLES)]}_{MARK_STYLES[c // len(HEAD_STYLES)]}"


def ensure_synth(root: str | Path, spec: SynthSpec) -> Path:
    """Generate the set into ``root`` unless it is already there with the same spec.

    Generation writes into a temporary sibling folder, renamed at the end, so a crash never
    leaves a half-written set behind.
    """
    root = Path(root)
    remove_stale_temps(root.parent, prefix=root.name + ".")  # what killed generations left
    stamp = root / "synth.json"
    if stamp.is_file():
        found = json.loads(stamp.read_text())
        if found != asdict(spec):
            raise DatasetLayoutError(
                f"{root} holds a synthetic set made with {found}, not {asdict(spec)}. Delete {root} "
                f"or choose another DATA_DIR.")
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetLayoutError(f"{root} is not empty and is not a synthetic set; choose another DATA_DIR")
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_synth(tmp, spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    except OSError:
        # another process (a parallel extraction rank) finished the same set first: use it
        shutil.rmtree(tmp, ignore_errors=True)
        if not stamp.is_file():
            raise
        return ensure_synth(root, spec)
    log.info("generated synthetic set %s in %s", asdict(spec), root)
    return root


def write_synth(root: Path, spec: SynthSpec) -> None:
    """Draw every image and write the CUB layout files into ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "parts").mkdir()
    rng = np.random.default_rng(spec.seed)
    lines = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
    image_id = 0
    for c in range(spec.n_classes):
        folder = root / "images" / class_name(c)
        folder.mkdir()
        train_flags = rng.permutation(np.arange(spec.per_class) < (spec.per_class + 1) // 2)
        for k in range(spec.per_class):
            image_id += 1
            img, box, keypoints = draw_image(rng, c, spec.image_size)
            rel = f"{class_name(c)}/{class_name(c)}_{k:04d}.jpg"
            img.save(root / "images" / rel, quality=92)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(train_flags[k])}")
            lines["boxes"].append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
            for p, (x, y, vis) in enumerate(keypoints):
                lines["locs"].append(f"{image_id} {p + 1} {x:.1f} {y:.1f} {vis}")
    _write_lines(root / "images.txt", lines["images"])
    _write_lines(root / "image_class_labels.txt", lines["labels"])
    _write_lines(root / "train_test_split.txt", lines["split"])
    _write_lines(root / "bounding_boxes.txt", lines["boxes"])
    _write_lines(root / "classes.txt", [f"{c + 1} {class_name(c)}" for c in range(spec.n_classes)])
    _write_lines(root / "parts" / "parts.txt", [f"{p + 1} {n}" for p, n in enumerate(PART_NAMES)])
    _write_lines(root / "parts" / "part_locs.txt", lines["locs"])
    (root / "synth.json").write_text(json.dumps(asdict(spec)))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _ellipse(cx: float, cy: float, a: float, b: float, theta: float, n: int = 40) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(theta), np.sin(theta)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient under random clutter shapes."""
    c0, c1 = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    arr = (c0 * (1 - ramp) + c1 * ramp).repeat(size, axis=1).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 40))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.02, 0.12) * size
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.polygon(_ellipse(x, y, r, r * rng.uniform(0.3, 1), rng.uniform(0, np.pi)), fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + r, y + r * rng.uniform(0.3, 1.5)], fill=colour)
        else:
            draw.line([x, y, x + rng.uniform(-2, 2) * r, y + rng.uniform(-2, 2) * r], fill=colour,
                      width=int(max(1, r / 6)))
    return img


def _draw_head(draw: ImageDraw.ImageDraw, style: str, cx: float, cy: float, r: float, theta: float) -> None:
    colour_name, pattern = style.split("_")
    colour = _HEAD_COLORS[colour_name]
    draw.polygon(_ellipse(cx, cy, r, r, 0), fill=colour, outline=(20, 20, 20))
    c, s = np.cos(theta), np.sin(theta)
    if pattern == "striped":
        for off in (-0.45, 0.0, 0.45):
            px, py = cx - s * off * r, cy + c * off * r
            draw.line([px - c * 0.8 * r, py - s * 0.8 * r, px + c * 0.8 * r, py + s * 0.8 * r],
                      fill=(245, 245, 245), width=max(1, int(r / 5)))
    elif pattern == "dotted":
        for dx, dy in ((-0.4, -0.4), (0.4, -0.4), (-0.4, 0.4), (0.4, 0.4), (0, 0)):
            draw.polygon(_ellipse(cx + dx * r, cy + dy * r, r / 6, r / 6, 0), fill=(245, 245, 245))
    elif pattern == "ringed":
        draw.polygon(_ellipse(cx, cy, 0.55 * r, 0.55 * r, 0), fill=(20, 20, 20))
        draw.polygon(_ellipse(cx, cy, 0.3 * r, 0.3 * r, 0), fill=colour)
    # eye, facing forward: pose cue shared by all classes
    draw.polygon(_ellipse(cx + c * 0.45 * r, cy + s * 0.45 * r, r / 7, r / 7, 0), fill=(0, 0, 0))


def _draw_marking(draw: ImageDraw.ImageDraw, style: str, cx: float, cy: float, r: float, theta: float) -> None:
    if style == "white_bar":
        draw.polygon(_ellipse(cx, cy, 1.2 * r, 0.35 * r, theta + np.pi / 2), fill=(250, 250, 250))
    else:
        draw.polygon(_ellipse(cx, cy, 0.7 * r, 0.7 * r, 0), fill=(10, 10, 10))


def draw_image(rng: np.random.Generator, label: int, size: int) -> tuple[Image.Image, tuple, list]:
    """One image of class ``label``: the picture, its object box (x, y, w, h) and 4 keypoints."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    length = rng.uniform(0.40, 0.58) * size
    theta = rng.uniform(0, 2 * np.pi)
    mirror = rng.choice([-1.0, 1.0])
    reach = 0.8 * length
    cx, cy = rng.uniform(reach, size - reach, 2) if size > 2 * reach else (size / 2, size / 2)
    c, s = np.cos(theta), np.sin(theta)

    def at(u: float, v: float) -> tuple[float, float]:  # object frame (units of length) -> pixels
        v = v * mirror
        return cx + length * (c * u - s * v), cy + length * (s * u + c * v)

    body_colour = tuple(int(v) for v in np.clip(np.array([140, 110, 80]) + rng.integers(-25, 26, 3), 0, 255))
    wing_colour = tuple(int(v * 0.7) for v in body_colour)
    tail = [at(-0.42, 0.0), at(-0.75, 0.13), at(-0.75, -0.13)]
    draw.polygon(tail, fill=wing_colour, outline=(30, 30, 30))
    body = _ellipse(*at(0, 0), 0.5 * length, 0.22 * length, theta)
    draw.polygon(body, fill=body_colour, outline=(30, 30, 30))
    draw.polygon(_ellipse(*at(-0.05, 0.08), 0.24 * length, 0.09 * length, theta), fill=wing_colour)
    _draw_marking(draw, MARK_STYLES[label // len(HEAD_STYLES)], *at(0.2, -0.1), 0.07 * length, theta)
    head_r = 0.19 * length
    _draw_head(draw, HEAD_STYLES[label % len(HEAD_STYLES)], *at(0.6, 0.0), head_r, theta)

    points = np.array(body + tail + _ellipse(*at(0.6, 0.0), head_r, head_r, 0))
    x0, y0 = np.clip(points.min(0), 0, size - 1)
    x1, y1 = np.clip(points.max(0), 0, size - 1)
    keypoints = []
    for u, v in ((0.6, 0.0), (-0.05, 0.08), (-0.75, 0.0), (0.2, -0.1)):
        x, y = at(u, v)
        vis = int(0 <= x < size and 0 <= y < size)
        keypoints.append((float(np.clip(x, 0, size - 1)), float(np.clip(y, 0, size - 1)), vis))
    return img, (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), keypoints
