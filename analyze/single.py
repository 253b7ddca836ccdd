"""``make explain IMG=photo.jpg``: backbone + model on one new image, its evidence and heatmap.

The image goes through exactly the extraction path (decode, resize, backbone, region means,
with boxes drawn for image id 0 and the cache's seed), then through the run's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpnet.errors import DatasetLayoutError, OutputExistsError
from dpnet.files import mark_owned, output_errors, remove, remove_stale_temps, replace_owned_folder
from dpnet.files import safe_name, temp_path
from dpnet.extract.cache import RegionCache
from dpnet.extract.images import load_rgb
from dpnet.extract.runtime import extractor_for
from dpnet.extract.regions import boxes_to_pixels

from . import draw
from .explain import DPNetExplainer
from .localize import activation_map, part_peaks, peak_boxes
from .pages import templates


@dataclass
class ImageExplanation:
    """The prediction for one image and what the page shows."""

    pred: int
    pred_name: str
    logits: np.ndarray  # (C,)
    top_parts: list[tuple[int, float]]  # (part, points) for the predicted class, best first
    heatmap: np.ndarray  # (H, W) in [0, 1]
    page: Path


def dataset_image_id(path: str | Path, cache: RegionCache) -> int | None:
    """The image id of ``path`` when it is one of the cache's own images, else ``None``."""
    target = Path(path).resolve()
    for row in cache.image_table():
        if cache.image_file(row["path"]).resolve() == target:
            return row["image_id"]
    return None


def crop_box(cache: RegionCache, image_id: int, path: str | Path) -> tuple[float, float, float, float]:
    """The object box (x, y, w, h) a CROP=1 cache cropped dataset image ``image_id`` to.

    Raises:
        DatasetLayoutError: the dataset's boxes cannot be read, or lack this image (describing it
            uncropped would not reproduce the cached descriptors).
    """
    index = cache.dataset_index()
    root = cache.manifest.get("dataset_root", "the dataset")
    if index is not None and image_id in index.bboxes:
        return index.bboxes[image_id]
    why = ("its dataset cannot be read (see the warning above)" if index is None
           else f"{Path(root) / 'bounding_boxes.txt'} has no box for image id {image_id}")
    raise DatasetLayoutError(
        f"{path} is an image of {cache.path}, which was extracted with crop to the object box, but {why}. "
        f"Restore the dataset's bounding_boxes.txt at {root}, or explain a copy of the image placed outside "
        f"the dataset (it is then described whole).")


def describe_image(path: str | Path, cache: RegionCache
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
    """Raw regions (1, R, D) float16, grid boxes (1, R, 4), the original size (2,) of one image
    file, and the object box (x, y, w, h) it was cropped to (None when not cropped).

    The boxes are those of the image's id when the file is one of the cache's images (so its
    descriptors equal the cached ones), else those of id 0: a new image gets a fixed draw.
    With a CROP=1 cache, a dataset image is cropped to its box as in extraction; a new image
    has no box and is described whole.
    """
    m = cache.manifest
    fx = extractor_for(m, str(cache.path))
    iid = dataset_image_id(path, cache)
    bbox = None
    if m.get("config", {}).get("crop") and iid is not None:  # a dataset image of a CROP=1 cache: same crop
        bbox = crop_box(cache, iid, path)
    pixels, size_wh = load_rgb(path, m["image_size"], bbox)
    boxes = fx.boxes([0 if iid is None else iid])
    regions, _ = fx(torch.from_numpy(pixels).permute(2, 0, 1)[None], boxes)
    return regions, boxes, np.array(size_wh), bbox


def explain_image(path: str | Path, run_dir: str | Path, out_dir: str | Path | None = None) -> ImageExplanation:
    """Predict and explain one image with the run's model; write PNG heatmap and an HTML page.

    The class's parts in the heatmap are its top parts by d(p, c), saved with the model.

    Raises:
        ImageDecodeError: the file is not a readable image.
    """
    run = Path(run_dir)
    from .analysis import load_run

    est, cache, _ = load_run(run)
    regions, boxes, size_wh, crop = describe_image(path, cache)
    expl = DPNetExplainer(est)
    scores = expl.scores(regions)  # (1, R, P)
    b, _ = expl.pool(scores)
    logits = expl.contributions(b).sum(-1)[0]
    pred = int(logits.argmax())
    ev = expl.evidence(scores[0], pred)
    grid = tuple(cache.manifest["grid"])
    heat = expl.heatmaps(scores, boxes, grid, np.array([pred]))[0]
    final = output_folder(path, run, out_dir)
    fix = "pass --out <a new folder> (OUT=...) where you can write" if out_dir is None else "pass another --out"
    with output_errors(final, fix):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final.parent, prefix=final.name[:40])
        out = temp_path(final)  # written whole, then moved into place
        out.mkdir()
        try:
            mark_owned(out, "explain")
            _write_page(out, path, est.classes_[pred], ev, heat, scores[0], boxes[0], grid, crop)
        except BaseException:
            remove(out)
            raise
        replace_owned_folder(out, final, "explain", EXPLAIN_FILES)
    top = [(int(p), float(v)) for p, v in zip(ev.parts[:5], ev.points[:5])]
    return ImageExplanation(pred, est.classes_[pred], logits, top, heat, final / "index.html")


# What older versions wrote into an explanation folder (no mark): such a folder may be replaced.
EXPLAIN_FILES = r"index\.html|heatmap\.png|part\d+\.png"


def output_folder(image: str | Path, run: Path, out_dir: str | Path | None) -> Path:
    """Where the explanation of ``image`` goes: ``out_dir``, else ``<run>/explain/<safe name of the image>``.

    The path is resolved first (``sub/..`` is the folder it names), and it may never be the run
    folder, one of its ancestors, or the current folder: an explanation replaces only a folder it
    wrote itself (checked when it is moved into place).
    """
    final = Path(out_dir).resolve() if out_dir else run.resolve() / "explain" / safe_name(Path(image).stem)
    here, run_abs = Path.cwd().resolve(), run.resolve()
    if final == here or final in run_abs.parents or final == run_abs or final == Path(final.anchor):
        raise OutputExistsError(f"{final} holds other files (it is the run folder, one of its parents, or the "
                                f"current folder): an explanation goes in a folder of its own; pass --out <new folder>")
    return final


def _write_page(out: Path, path: str | Path, name: str, ev, heat: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                grid: tuple[int, int], crop_bbox) -> None:
    """Into ``out``: the heatmap, the top parts drawn as the report draws them (activation map and
    peak box: :func:`dpnet.analyze.localize.activation_map`, :func:`dpnet.analyze.localize.part_peaks`; scores
    (R, P), boxes (R, 4)) and index.html."""
    img = draw.open_rgb(path, crop_bbox)  # what the model saw (the crop, with CROP=1), at a bounded size
    draw.overlay_heatmap(img, heat).save(out / "heatmap.png")
    peaks = part_peaks(scores[None], boxes[None])[0]  # (P, 2) grid
    frame = np.array([grid[::-1]], np.float64)  # the box is a share of the image the model saw (grid units)
    rows = []
    for i in range(min(5, len(ev.parts))):
        p = int(ev.parts[i])
        box = boxes_to_pixels(peak_boxes(peaks[None, p:p + 1], frame)[0], grid, np.array(img.size))[0]
        draw.part_picture(img, activation_map(scores[:, p], boxes, grid), box, 128).save(out / f"part{p}.png")
        rows.append({"part": p, "src": f"part{p}.png", "b": float(ev.b[i]), "v": float(ev.v[i]),
                     "points": float(ev.points[i])})
    page = templates().get_template("explain.html").render(name=name, file=Path(path).name, n_parts=len(ev.parts),
                                                          logit=float(ev.logit), rows=rows)
    (out / "index.html").write_text(page, encoding="utf-8")