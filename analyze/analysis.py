"""Every number of the report, computed from a run and its cache by streaming passes.

``analyse(run_dir)`` returns an :class:`Analysis`: the part statistics of the training pass,
per-test-image results, faithfulness and localisation numbers, and the images chosen for the
image view. Glossary: N images, R regions, P parts, C classes, K keypoints.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpnet.errors import DpnetError
from dpnet.files import read_json
from extract.cache import RegionCache
from extract.datasets import DatasetIndex
from extract.regions import boxes_to_pixels
from train.class_parts import pooled_shards
from train.data import check_finite
from train.estimator import DPNetClassifier

from .explain import DPNetExplainer, deletion_scores
from .localize import box_centres, defining_part_hits, landmark_error, part_consistency, pointing_game
from .stats import PartStats, part_stats

log = logging.getLogger(__name__)

FAITH_K = (1, 3, 5)


@dataclass
class TestImage:
    """One explained test image (arrays for the image view)."""

    image_id: int
    label: int
    pred: int
    logits: np.ndarray  # (C,)
    scores: np.ndarray  # (R, P)
    boxes: np.ndarray  # (R, 4) grid cells
    size_wh: np.ndarray  # (2,)


@dataclass
class Analysis:
    est: DPNetClassifier
    cache: RegionCache
    stats: PartStats
    explainer: DPNetExplainer
    numbers: dict[str, Any]
    shown: list[TestImage]
    deletion: dict[str, np.ndarray] = field(default_factory=dict)
    index: DatasetIndex | None = None  # the cache's dataset, when readable


def load_run(run_dir: Path, cache: RegionCache | None = None) -> tuple[DPNetClassifier, RegionCache, dict[str, Any]]:
    """The run's model, its cache (from metrics.json unless given) and metrics."""
    metrics = read_json(run_dir / "metrics.json", "run `make train` again to rewrite it", DpnetError)
    cache = cache or RegionCache(metrics["cache"])
    return DPNetClassifier.load(run_dir / "model.pt", cache), cache, metrics


def dataset_index(cache: RegionCache) -> DatasetIndex | None:
    """The dataset the cache was extracted from (for keypoints, boxes and image files), if readable."""
    from extract.pipeline import ExtractConfig, load_index

    cfg = dict(cache.manifest["config"])
    cfg["data_dir"] = cache.manifest.get("dataset_root", cfg.get("data_dir"))
    try:
        return load_index(ExtractConfig(**{k: v for k, v in cfg.items() if k in ExtractConfig.__dataclass_fields__}))
    except Exception as exc:  # noqa: BLE001 - the report still builds without images' annotations
        log.warning("could not read the dataset of %s (%s); localisation is skipped", cache.path, exc)
        return None


def crop_boxes(cache: RegionCache, index: DatasetIndex | None, ids: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """(N, 4) pixel boxes the images were cropped to when the cache was made with CROP=1, else None."""
    if not cache.manifest.get("config", {}).get("crop"):
        return None
    if index is None:
        raise DpnetError(f"{cache.path} was extracted with CROP=1 but its dataset (and so its boxes) cannot be read")
    from extract.regions import crop_box

    return np.array([crop_box(index.bboxes[int(i)], tuple(wh)) for i, wh in zip(ids, sizes)], np.float32)


def read_boxes_csv(path: Path, table: list[dict[str, Any]]) -> dict[int, tuple[float, float, float, float]]:
    """Object boxes from a CSV with image_name, xmin, ymin, xmax, ymax (matched on file name)."""
    by_name = {Path(r["path"]).stem: r["image_id"] for r in table}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            iid = by_name.get(Path(row["image_name"]).stem)
            if iid is not None:
                x0, y0, x1, y1 = (float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                out[iid] = (x0, y0, x1 - x0, y1 - y0)
    return out


def analyse(run_dir: Path, cache: RegionCache | None = None, k: int = 6, n_show: int = 8, max_faith: int = 500,
            boxes_csv: Path | None = None, progress: bool = False, use_dask: bool = False) -> Analysis:
    """Compute the report's numbers for the run in ``run_dir`` (see the module docstring).

    With ``use_dask`` the training-set pass runs as a dask graph (on the active client, if any).
    """
    est, cache, metrics = load_run(run_dir, cache)
    if use_dask:
        from .dask_stats import part_stats_dask

        stats = part_stats_dask(est, cache, k)
    else:
        stats = part_stats(est, cache, k, progress)
    expl = DPNetExplainer(est, stats.d)
    index = dataset_index(cache)
    table = cache.image_table()
    obj = dict(index.bboxes) if index else {}
    if boxes_csv:
        obj = read_boxes_csv(Path(boxes_csv), table)
    test = _test_pass(expl, cache, n_show, max_faith)
    test["crops"] = crop_boxes(cache, index, test["ids"], test["sizes"])
    numbers = {"accuracy": metrics, "faithfulness": _faithfulness(test["named"], test["random"]),
               "parts": {"P": int(est.module_.parts.shape[0]), "q": est.parts_per_class,
                         "f_mean": float(stats.f.mean()), "f_max": int(stats.f.max()),
                         "parts_in_no_top_q": int((stats.f == 0).sum())},
               "test_images": int(len(test["labels"])),
               "test_top1_recomputed": float(100 * (test["preds"] == test["labels"]).mean())}
    numbers["localisation"] = _localisation(est, expl, cache, index, obj, test)
    numbers["ablation"] = _read_csv(run_dir / "ablation.csv")
    numbers["history"] = _read_csv(run_dir / "log.csv")
    return Analysis(est, cache, stats, expl, numbers, test["shown"],
                    {"named": test["named"].mean(0), "random": test["random"].mean(0)}, index)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


def _test_pass(expl: DPNetExplainer, cache: RegionCache, n_show: int, max_faith: int) -> dict[str, Any]:
    """Stream the test split: predictions, deletion curves, per-image best regions, shown images."""
    out: dict[str, list] = {k: [] for k in ("ids", "labels", "preds", "named", "random", "where", "raw", "boxes", "sizes",
                                            "heat_true")}
    shown: list[TestImage] = []
    faith_left, grid = max_faith, tuple(cache.manifest["grid"])
    fields = ("regions", "boxes", "sizes", "labels", "image_ids")
    for shard, a in cache.iter_shards("test", fields):
        for s in range(0, len(a["labels"]), 32):
            sl = slice(s, s + 32)
            scores = expl.scores(a["regions"][sl])  # (n, R, P)
            if not np.isfinite(scores).all():
                check_finite(a["regions"][sl], a["image_ids"][sl], cache.shard_location(shard))
                check_finite(scores, a["image_ids"][sl], cache.shard_location(shard), "part scores")
            b, where = expl.pool(scores)
            logits = expl.contributions(b).sum(-1)  # (n, C)
            preds = logits.argmax(1)
            m = min(faith_left, len(scores))
            if m:
                named, rand = deletion_scores(expl, scores[:m], preds[:m], steps=max(FAITH_K) * 2)
                out["named"].append(named)
                out["random"].append(rand)
                faith_left -= m
            out["heat_true"].append(expl.heatmaps(scores, a["boxes"][sl], grid, a["labels"][sl]))
            for key, val in (("ids", a["image_ids"][sl]), ("labels", a["labels"][sl]), ("preds", preds),
                             ("where", where), ("raw", np.take_along_axis(scores, where[:, None], 1)[:, 0]),
                             ("boxes", a["boxes"][sl]), ("sizes", a["sizes"][sl])):
                out[key].append(val)
            _pick_shown(shown, n_show, scores, logits, preds, a, sl)
        del a
    res = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    res["shown"] = shown
    return res


def _pick_shown(shown: list[TestImage], n_show: int, scores: np.ndarray, logits: np.ndarray, preds: np.ndarray,
                a: dict[str, np.ndarray], sl: slice) -> None:
    """Keep the first n_show / 2 correct and n_show / 2 wrong test images (then fill with either)."""
    labels = a["labels"][sl]
    for i in range(len(scores)):
        ok = preds[i] == labels[i]
        n_ok = sum(t.pred == t.label for t in shown)
        if len(shown) >= n_show or (ok and n_ok >= n_show // 2 and len(shown) - n_ok < n_show - n_show // 2):
            continue
        shown.append(TestImage(int(a["image_ids"][sl][i]), int(labels[i]), int(preds[i]), logits[i], scores[i],
                               a["boxes"][sl][i], a["sizes"][sl][i]))


def _faithfulness(named: np.ndarray, rand: np.ndarray) -> dict[str, Any]:
    """Mean class-score drop when the top-k parts' regions are removed, against as many random ones."""
    if not len(named):
        return {}
    rows = {}
    tol = 1e-3 * float(np.abs(named[:, 0]).mean())  # a random drop below 0.1% of the score counts as none
    for k in FAITH_K:
        dn, dr = float((named[:, 0] - named[:, k]).mean()), float((rand[:, 0] - rand[:, k]).mean())
        # random removal often leaves the score unchanged or raises it a little: no finite ratio then
        rows[f"k{k}"] = {"drop_named": dn, "drop_random": dr, "ratio": dn / dr if dr > tol else float("inf")}
    rows["images"] = int(len(named))
    return rows


def _localisation(est: DPNetClassifier, expl: DPNetExplainer, cache: RegionCache, index: DatasetIndex | None,
                  obj: dict[int, tuple], test: dict[str, Any]) -> dict[str, Any]:
    """Landmark error, part consistency, pointing game and (synth) defining-part hits, where annotated."""
    grid, out = tuple(cache.manifest["grid"]), {}
    ids = test["ids"]
    pix = boxes_to_pixels(test["boxes"], grid, test["sizes"], test["crops"])  # (N, R, 4)
    best_pix = np.take_along_axis(pix, test["where"][..., None], 1)  # (N, P, 4)
    if obj and all(int(i) in obj for i in ids):
        box = np.array([obj[int(i)] for i in ids], np.float64)
        out["pointing_game"] = pointing_game(test["heat_true"], grid, test["sizes"], box, test["crops"])
    if index is None or not index.part_locs or not all(int(i) in index.part_locs for i in ids):
        return out
    kp = np.stack([index.part_locs[int(i)] for i in ids]).astype(np.float64)  # (N, K, 3)
    out["consistency"], _ = part_consistency(best_pix, kp, test["labels"], est.parts_per_class)
    out["keypoints"] = list(index.part_names)
    if index.bboxes:
        train = _train_centres(est, cache, index)
        box_te = np.array([index.bboxes[int(i)] for i in ids], np.float64)
        box_tr = np.array([index.bboxes[int(i)] for i in train["ids"]], np.float64)
        kp_tr = np.stack([index.part_locs[int(i)] for i in train["ids"]]).astype(np.float64)
        out["landmark_error_x100"] = landmark_error(train["centres"], kp_tr, box_tr, box_centres(best_pix), kp, box_te)
    if index.name == "synth":
        from extract.synth import CLASS_DEFINING_PARTS

        defining = [index.part_names.index(n) for n in CLASS_DEFINING_PARTS]
        top = np.array([expl.class_parts(int(c), 1)[0] for c in test["labels"]])
        top_boxes = best_pix[np.arange(len(top)), top]
        hit, chance = defining_part_hits(top_boxes, best_pix, kp, defining)
        out["top_part_on_defining_part"] = hit
        out["chance_region_on_defining_part"] = chance
    return out


def _train_centres(est: DPNetClassifier, cache: RegionCache, index: DatasetIndex | None) -> dict[str, np.ndarray]:
    """Pixel centres (N, P, 2) of every part's best region in each training image."""
    grid, ids, centres = tuple(cache.manifest["grid"]), [], []
    for _, a, (_, _, where) in pooled_shards(est, cache, "train", ("boxes", "sizes")):
        crops = crop_boxes(cache, index, a["image_ids"], a["sizes"])
        pix = boxes_to_pixels(np.take_along_axis(a["boxes"], where[..., None], 1), grid, a["sizes"], crops)
        centres.append(box_centres(pix).astype(np.float32))
        ids.append(a["image_ids"])
    return {"ids": np.concatenate(ids), "centres": np.concatenate(centres)}
