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
import torch
from tqdm.auto import tqdm

from dpnet.errors import CacheMismatchError, DpnetError
from dpnet.extract.cache import RegionCache
from dpnet.extract.datasets import DatasetIndex
from dpnet.extract.regions import boxes_to_pixels, crop_box
from dpnet.train.data import check_finite
from dpnet.train.baselines import LINEAR_KIND
from dpnet.train.estimator import DPNetClassifier
from dpnet.train.serialize import load_file

from .explain import EVIDENCE_ROWS, DPNetExplainer, deletion_scores, margin_contributions, margin_shares
from .localize import (activation_map, consistency_rates, consistent_share, defining_part_hits, keypoint_hits,
                       landmark_error, on_object_share, on_part_share, part_consistency, part_peaks, part_purities,
                       part_stability, peak_boxes, peaks_to_pixels, pointing_game)
from .ownership import measured_parts, model_part_classes, own_evidence_share, own_top3_share, owned_parts
from .pixels import PixelProbe, areas, auc, deletion_curves, sample_test_images, stability_hits
from .stats import PartStats, PartStatsPass, bootstrap_interval

log = logging.getLogger(__name__)

FAITH_K = (1, 3, 5)
EVIDENCE_TOP = 5  # the evidence regions on-object counts: the best regions of the top-5 parts
PURITY_K = 10  # PIP-Net's purity looks at each part's top-10 training regions


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
class PartPictures:
    """How each part is shown (ProtoPNet's way): its best training image, its activation map there
    (:func:`dpnet.analyze.localize.activation_map`) and the peak box around its peak
    (:func:`dpnet.analyze.localize.part_peaks`), all in grid units of the image the model saw."""

    image_id: np.ndarray  # (P,) each part's best training image
    maps: np.ndarray  # (P, H, W) float32 its activation map there
    peak_box: np.ndarray  # (P, 4) x0, y0, x1, y1 grid units: the peak box (peak_boxes) around its peak there


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
    pictures: PartPictures | None = None
    obj: dict[int, tuple] = field(default_factory=dict)  # object boxes (x, y, w, h) by image id, when known


def load_run(run_dir: Path, cache: RegionCache | None = None) -> tuple[DPNetClassifier, RegionCache, dict[str, Any]]:
    """The run's model, its cache (from metrics.json unless given) and metrics."""
    from dpnet.train.run import read_run

    metrics, where = read_run(run_dir)
    cache = cache or RegionCache(where)
    return DPNetClassifier.load(run_dir / "model.pt", cache), cache, metrics


def crop_boxes(cache: RegionCache, index: DatasetIndex | None, ids: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """(N, 4) pixel boxes the images were cropped to when the cache was made with CROP=1, else None."""
    if not cache.manifest.get("config", {}).get("crop"):
        return None
    if index is None:
        raise DpnetError(f"{cache.path} was extracted with CROP=1 but its dataset (and so its boxes) cannot be read")
    return np.array([crop_box(index.bboxes[int(i)], tuple(wh)) for i, wh in zip(ids, sizes)], np.float32)


def read_boxes_csv(path: Path, table: list[dict[str, Any]]) -> dict[int, tuple[float, float, float, float]]:
    """Object boxes from a CSV with image_name, xmin, ymin, xmax, ymax (matched on file name)."""
    by_name = {Path(r["path"]).stem: r["image_id"] for r in table}
    out = {}
    columns = ("image_name", "xmin", "ymin", "xmax", "ymax")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in columns if c not in (reader.fieldnames or [])]
            if lacking:
                raise DpnetError(f"{path}: the header lacks {', '.join(lacking)}; a boxes CSV starts with the line "
                                 f"{','.join(columns)}")
            for lineno, row in enumerate(reader, 2):
                iid = by_name.get(Path(row["image_name"] or "").stem)
                if iid is None:
                    continue
                try:
                    x0, y0, x1, y1 = (float(row[k]) for k in columns[1:])
                except (TypeError, ValueError):
                    raise DpnetError(f"{path}:{lineno}: expected four numbers xmin,ymin,xmax,ymax, got "
                                     f"{[row.get(k) for k in columns[1:]]}") from None
                out[iid] = (x0, y0, x1 - x0, y1 - y0)
    except FileNotFoundError:
        raise DpnetError(f"BOXES={path}: no such file (a CSV of {','.join(columns)})") from None
    except UnicodeDecodeError as exc:
        raise DpnetError(f"{path} is not UTF-8 text ({exc}): save it as UTF-8") from None
    return out


def analyse(run_dir: Path, cache: RegionCache | None = None, k: int = 6, n_show: int = 8, max_faith: int = 500,
            boxes_csv: Path | None = None, progress: bool = False, use_dask: bool = False, pixel_images: int = 200,
            pixel_steps: int = 8, seed: int = 0) -> Analysis:
    """Compute the report's numbers for the run in ``run_dir`` (see the module docstring).

    With ``use_dask`` the training-set pass runs as a dask graph (on the active client, if any).
    ``pixel_images`` test images (a seeded sample; 0: none) go through the backbone again for
    the stability and pixel-space deletion / insertion measures, each given with its 95%
    bootstrap interval over those images (``<key>_ci95``); :data:`dpnet.analyze.config.PIXEL_MEASURES` names the
    command line's two sample sizes.
    """
    est, cache, metrics = load_run(run_dir, cache)
    top_k = max(k, PURITY_K)
    index = cache.dataset_index()
    obj = dict(index.bboxes) if index else {}
    if boxes_csv:
        obj = read_boxes_csv(Path(boxes_csv), cache.image_table())
    if use_dask:
        from .dask_stats import part_stats_dask

        train = _train_pass(DPNetExplainer(est), cache, index, obj, top_k, progress, part_stats_dask(est, cache, top_k))
    else:  # the part statistics come from the same pass over the training regions
        train = _train_pass(DPNetExplainer(est), cache, index, obj, top_k, progress)
    stats = train["stats"]
    expl = DPNetExplainer(est, stats.d)
    test = _test_pass(expl, cache, n_show, max_faith, progress)
    test["crops"] = crop_boxes(cache, index, test["ids"], test["sizes"])
    numbers = {"accuracy": metrics, "faithfulness": _faithfulness(test["named"], test["random"]),
               "ownership": _ownership(est, stats, test), "explanation": _explanation(test["margin"]),
               "parts": {"P": int(est.module_.parts.shape[0]), "q": est.parts_per_class,
                         "f_mean": float(stats.f.mean()), "f_max": int(stats.f.max()),
                         "parts_in_no_top_q": int((stats.f == 0).sum()),
                         "pruned": int((est.module_.owner < 0).sum()),  # ProtoPNet's pruning (prune_parts)
                         "silent": int((est.module_.class_weights() <= 0).all(0).sum()),  # weigh for no class
                         "measured": int(measured_parts(est).sum())},  # the part measures' parts
               "test_images": int(len(test["labels"])),
               "test_top1_recomputed": float(100 * (test["preds"] == test["labels"]).mean())}
    numbers["localisation"] = _localisation(est, expl, cache, index, obj, test, stats, train)
    pixel = _pixel_measures(est, cache, index, obj, run_dir, pixel_images, pixel_steps, seed, progress)
    numbers["localisation"].update(pixel.pop("localisation", {}))
    numbers["faithfulness"].update(pixel.pop("faithfulness", {}))
    numbers["ablation"] = _read_csv(run_dir / "ablation.csv")
    numbers["history"] = _read_csv(run_dir / "log.csv")
    return Analysis(est, cache, stats, expl, numbers, test["shown"],
                    {"named": test["named"].mean(0), "random": test["random"].mean(0), **pixel.get("curves", {})},
                    index, train["pictures"], obj)


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


def _split_shards(cache: RegionCache, split: str) -> int:
    """How many shards hold rows of ``split`` (the length of its pass, for a progress bar's ETA)."""
    return sum(1 for i in range(cache.n_shards) if cache.rows(i, split)[1] > cache.rows(i, split)[0])


def _test_pass(expl: DPNetExplainer, cache: RegionCache, n_show: int, max_faith: int,
               progress: bool = False) -> dict[str, Any]:
    """Stream the test split: predictions, deletion curves, per-image best regions, shown images."""
    out: dict[str, list] = {k: [] for k in ("ids", "labels", "preds", "named", "random", "where", "raw", "boxes", "sizes",
                                            "heat_true", "points", "evidence", "margin", "peaks")}
    shown: list[TestImage] = []
    faith_left, grid = max_faith, tuple(cache.manifest["grid"])
    fields = ("regions", "boxes", "sizes", "labels", "image_ids")
    shards = cache.iter_shards("test", fields)
    for shard, a in tqdm(shards, total=_split_shards(cache, "test"), desc="test pass", unit="shard",
                         disable=not progress):
        for s in range(0, len(a["labels"]), 32):
            sl = slice(s, s + 32)
            scores = expl.scores(a["regions"][sl])  # (n, R, P)
            if not np.isfinite(scores).all():
                check_finite(a["regions"][sl], a["image_ids"][sl], cache.shard_location(shard))
                check_finite(scores, a["image_ids"][sl], cache.shard_location(shard), "part scores")
            b, where = expl.pool(scores)
            contributions = expl.contributions(b)  # (n, C, P)
            logits = contributions.sum(-1)  # (n, C)
            preds = logits.argmax(1)
            points = contributions[np.arange(len(preds)), preds]  # (n, P): the prediction's evidence
            out["margin"].append(margin_contributions(contributions)[2])  # (n, P): why pred, not the runner-up
            top = np.argsort(-points, axis=1, kind="stable")[:, :EVIDENCE_TOP]  # its top parts
            out["points"].append(points)
            out["evidence"].append(top)  # (n, 5) the prediction's top parts
            out["peaks"].append(part_peaks(scores, a["boxes"][sl]).astype(np.float32))  # (n, P, 2) grid points
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
    """Mean class-score drop when the top-k parts' regions are removed, against as many random ones.

    Drops are also given in percent of the mean logit. A max over hundreds of overlapping regions
    barely notices a few random ones gone, so the random drop is often ~0: the ratio divides by
    at least 0.1% of the logit, and says so (``ratio_is_lower_bound``), rather than reading infinity.
    """
    if not len(named):
        return {}
    rows = {}
    scale = float(np.abs(named[:, 0]).mean())
    floor = 1e-3 * scale
    for k in FAITH_K:
        dn, dr = float((named[:, 0] - named[:, k]).mean()), float((rand[:, 0] - rand[:, k]).mean())
        rows[f"k{k}"] = {"drop_named": dn, "drop_random": dr, "drop_named_pct": 100 * dn / scale,
                         "drop_random_pct": 100 * dr / scale, "ratio": dn / max(dr, floor),
                         "ratio_is_lower_bound": dr < floor}
    rows["images"] = int(len(named))
    return rows


def _explanation(m: np.ndarray) -> dict[str, Any]:
    """How much of the decision (the margin over the runner-up) the evidence table shows (medians over
    test images; see :func:`dpnet.analyze.explain.margin_shares`)."""
    if not len(m):
        return {}
    shown, hidden, needed = margin_shares(m, EVIDENCE_ROWS)
    positive = np.clip(m, 0, None).sum(1) / np.where(m.sum(1) > 0, m.sum(1), np.nan)
    return {"margin_shown_share": float(np.nanmedian(shown)), "margin_hidden_share": float(np.nanmedian(hidden)),
            "parts_for_90pct": float(np.median(needed)), "table_rows": EVIDENCE_ROWS,
            "positive_over_margin": float(np.nanmedian(positive))}


def _ownership(est: DPNetClassifier, stats: PartStats, test: dict[str, Any]) -> dict[str, Any]:
    """Whether V lets each class speak through its own parts (see dpnet.analyze.ownership)."""
    q = est.parts_per_class
    out = {"own_top3_share": own_top3_share(stats.d, q), "owned_parts": int(owned_parts(stats.d, q).sum()),
           "parts": int(stats.d.shape[1])}
    if len(test["labels"]):
        out["own_evidence_share"] = own_evidence_share(test["points"], test["preds"], q)
    return out


def _localisation(est: DPNetClassifier, expl: DPNetExplainer, cache: RegionCache, index: DatasetIndex | None,
                  obj: dict[int, tuple], test: dict[str, Any], stats: PartStats, train: dict[str, Any]
                  ) -> dict[str, Any]:
    """Landmark error, consistency (EvalProtoPNet's and the region-box variant), purity, on-object
    evidence, pointing game and (synth) defining-part hits, where the dataset is annotated."""
    grid, out = tuple(cache.manifest["grid"]), {}
    ids = test["ids"]
    pix = boxes_to_pixels(test["boxes"], grid, test["sizes"], test["crops"])  # (N, R, 4)
    best_pix = np.take_along_axis(pix, test["where"][..., None], 1)  # (N, P, 4)
    peaks = peaks_to_pixels(test["peaks"], grid, test["sizes"], test["crops"])  # (N, P, 2)
    evidence = np.take_along_axis(peaks, test["evidence"][..., None], 1)  # (N, 5, 2) the top parts' peaks
    has_boxes = bool(obj) and all(int(i) in obj for i in ids)
    if has_boxes and test["crops"] is None:  # in a crop to the object box both read 100 by construction
        box = np.array([obj[int(i)] for i in ids], np.float64)
        out["pointing_game"] = pointing_game(test["heat_true"], grid, test["sizes"], box, test["crops"])
        out["on_object_share"] = on_object_share(evidence, box)
    if index is None or not index.part_locs or not all(int(i) in index.part_locs for i in ids):
        return out
    kp = np.stack([index.part_locs[int(i)] for i in ids]).astype(np.float64)  # (N, K, 3)
    classes = model_part_classes(est)
    frames = _frames(ids, test["sizes"], test["crops"], obj)
    rates = consistency_rates(peak_boxes(peaks, frames), kp, test["labels"], classes)  # (P, K)
    use = measured_parts(est)  # the parts that weigh in some class: the part measures' parts
    out["consistency_evalprotopnet"] = consistent_share(rates[use])
    out["consistency_all_parts"] = consistent_share(rates)
    out["part_hit_rate"] = [round(float(r), 4) for r in rates.max(1)]  # each part's consistency on its keypoint
    out["part_keypoint"] = [int(k) for k in rates.argmax(1)]  # that keypoint (an index into "keypoints")
    out["consistency_region_box"], _ = part_consistency(best_pix, kp, test["labels"], classes)
    out["on_part_share"] = on_part_share(peak_boxes(evidence, frames), kp)
    out["keypoints"] = list(index.part_names)
    purity = _purity(index, stats, train)
    if purity is not None:
        out["part_purity"] = [round(float(v), 4) for v in purity]
        out["purity"], out["purity_all_parts"] = float(purity[use].mean()), float(purity.mean())
    if index.bboxes:
        box_te = np.array([index.bboxes[int(i)] for i in ids], np.float64)
        box_tr = np.array([index.bboxes[int(i)] for i in train["ids"]], np.float64)
        kp_tr = np.stack([index.part_locs[int(i)] for i in train["ids"]]).astype(np.float64)
        out["landmark_error_x100"] = landmark_error(train["centres"], kp_tr, box_tr, peaks, kp, box_te)
    if index.name == "synth":
        from dpnet.extract.synth import CLASS_DEFINING_PARTS

        defining = [index.part_names.index(n) for n in CLASS_DEFINING_PARTS]
        top = np.array([expl.class_parts(int(c), 1)[0] for c in test["labels"]])
        top_boxes = best_pix[np.arange(len(top)), top]
        hit, chance = defining_part_hits(top_boxes, best_pix, kp, defining)
        out["top_part_on_defining_part"] = hit
        out["chance_region_on_defining_part"] = chance
    return out


def _frames(ids: np.ndarray, sizes: np.ndarray, crops: np.ndarray | None, obj: dict[int, tuple]) -> np.ndarray:
    """(N, 2) the width and height a peak box is a share of: the image the model saw when it was cut
    to the object box (CROP=1), else the object box when known (EvalProtoPNet's images are such
    crops), else the whole image."""
    if crops is not None:
        return (crops[:, 2:] - crops[:, :2]).astype(np.float64)
    if obj and all(int(i) in obj for i in ids):
        return np.array([obj[int(i)][2:] for i in ids], np.float64)
    return np.asarray(sizes, np.float64)


def _purity(index: DatasetIndex, stats: PartStats, train: dict[str, np.ndarray]) -> np.ndarray | None:
    """PIP-Net's purity (P,) of each part's top-10 training images (one region per image, the part's
    best), with the part's peak there (:func:`dpnet.analyze.localize.part_peaks`) and the same peak boxes
    as consistency; None where a top image has no keypoints."""
    top_image = stats.top_image[:, :PURITY_K]  # (P, k)
    if not all(int(i) in index.part_locs for i in top_image.ravel()):
        return None
    row = {int(i): n for n, i in enumerate(train["ids"])}
    rows = np.array([[row[int(i)] for i in line] for line in top_image])  # (P, k) rows of the training pass
    parts = np.broadcast_to(np.arange(len(top_image))[:, None], top_image.shape)
    centres = train["centres"][rows, parts]  # (P, k, 2)
    frames = train["frames"][rows.ravel()]
    kp = np.stack([index.part_locs[int(i)] for i in top_image.ravel()]).astype(np.float64)
    hits = keypoint_hits(peak_boxes(centres.reshape(-1, 1, 2), frames), kp)  # (P k, 1, K)
    return part_purities(hits.reshape(top_image.shape + (kp.shape[1],)))


def _global_linear(path: Path, cache: RegionCache) -> dict[str, torch.Tensor] | None:
    """The run's linear baseline (the CAM of the pixel measures), or None when the run has none.

    Raises:
        CacheMismatchError: the file was made on another cache (its id, or its D, differs).
    """
    if not path.is_file():
        return None
    _, meta, linear = load_file(path, (LINEAR_KIND,))
    made_on = meta.get("cache_id")
    if (made_on is not None and cache.cache_id is not None and made_on != cache.cache_id) \
            or linear["weight"].shape[1] != cache.dim:
        raise CacheMismatchError(f"{path} was made on another cache (id {made_on}, D {linear['weight'].shape[1]}) "
                                 f"than {cache.path} (id {cache.cache_id}, D {cache.dim}): delete it (the report "
                                 f"then leaves out the CAM comparison) or train this run again with baselines")
    return linear


def _pixel_measures(est: DPNetClassifier, cache: RegionCache, index: DatasetIndex | None, obj: dict[int, tuple],
                    run_dir: Path, n: int, steps: int, seed: int, progress: bool) -> dict[str, Any]:
    """Stability and pixel-space deletion / insertion on a seeded sample of test images (dpnet.analyze.pixels)."""
    if n <= 0 or index is None:
        return {}
    sample = sample_test_images(cache, n, seed, index.bboxes)
    there = np.array([p.is_file() for p in sample.paths], bool)
    if not there.all():
        gone = [str(p) for p, ok in zip(sample.paths, there) if not ok]
        log.warning("warning: %d sampled test image(s) are gone since extraction (first: %s); the pixel-space "
                    "measures use the %d others", len(gone), gone[0], int(there.sum()))
        sample = sample.subset(there)
    if not len(sample.ids):
        return {}
    probe = PixelProbe(est, cache)
    out: dict[str, Any] = {"localisation": {}, "faithfulness": {"pixel_images": int(len(sample.ids)),
                                                                "pixel_steps": steps}}
    if index.part_locs and all(int(i) in index.part_locs for i in sample.ids):
        kp = np.stack([index.part_locs[int(i)] for i in sample.ids]).astype(np.float64)
        crops = crop_boxes(cache, index, sample.ids, sample.sizes)
        clean, noisy = stability_hits(probe, sample, kp, _frames(sample.ids, sample.sizes, crops, obj), seed,
                                      progress=progress)
        clean, noisy = (_all_parts(h, sample.labels, est) for h in (clean, noisy))
        classes, use = model_part_classes(est), measured_parts(est)
        out["localisation"]["stability_evalprotopnet"] = part_stability(clean[:, use], noisy[:, use], sample.labels,
                                                                        classes[use])
        out["localisation"]["stability_all_parts"] = part_stability(clean, noisy, sample.labels, classes)
        out["localisation"]["stability_evalprotopnet_ci95"] = bootstrap_interval(
            len(sample.ids), lambda i: part_stability(clean[i][:, use], noisy[i][:, use], sample.labels[i],
                                                      classes[use]), reps=200, seed=seed)
    linear = _global_linear(run_dir / "global_linear.pt", cache)
    curves = deletion_curves(probe, sample, linear, steps, seed, progress=progress)
    for name, c in curves.items():
        kind, order = name.split("_")
        key = f"{kind}_auc" + ("" if order == "dpnet" else f"_{order}")
        a = areas(c)
        out["faithfulness"][key] = auc(c)
        out["faithfulness"][key + "_ci95"] = bootstrap_interval(len(a), lambda i: float(a[i].mean()), seed=seed)
        if order != "dpnet":  # paired over the same images: is DP-Net's order better than this one?
            diff = areas(curves[f"{kind}_dpnet"]) - a
            out["faithfulness"][f"{kind}_auc_minus_{order}_ci95"] = bootstrap_interval(
                len(diff), lambda i: float(diff[i].mean()), seed=seed)
    out["curves"] = {name: c.mean(0) for name, c in curves.items()}
    return out


def _all_parts(hits: np.ndarray, labels: np.ndarray, est: DPNetClassifier) -> np.ndarray:
    """(N, q, K) hits of each image's class parts (in part order) -> (N, P, K), the other parts empty."""
    classes = model_part_classes(est)
    out = np.zeros((len(hits), len(classes), hits.shape[-1]), bool)
    for i, c in enumerate(labels):
        out[i, classes == c] = hits[i]
    return out


def _train_pass(expl: DPNetExplainer, cache: RegionCache, index: DatasetIndex | None, obj: dict[int, tuple],
                k: int, progress: bool, stats: PartStats | None = None) -> dict[str, Any]:
    """One pass over the training regions: the part statistics (:class:`dpnet.analyze.stats.PartStats`,
    unless given), every image's part peaks in pixels (ids (N,), centres (N, P, 2), frames (N, 2):
    the width and height a peak box is a share of) and each part's :class:`PartPictures` in its best
    training image."""
    grid, ids, centres, frames = tuple(cache.manifest["grid"]), [], [], []
    acc = PartStatsPass(expl.est, k) if stats is None else None
    p = expl.module.parts.shape[0]
    best = np.full(p, -np.inf)  # each part's best score so far, and where (as the statistics' top-1)
    best_id, best_scores = np.zeros(p, np.int64), np.zeros((p, cache.manifest["R"]), np.float32)
    best_boxes, best_frame = np.zeros((p, cache.manifest["R"], 4), np.float32), np.zeros((p, 2))
    shards = cache.iter_shards("train", ("regions", "boxes", "sizes", "labels", "image_ids"))
    for _, a in tqdm(shards, total=_split_shards(cache, "train"), desc="training pass", unit="shard",
                     disable=not progress):
        for s in range(0, len(a["image_ids"]), 32):
            sl = slice(s, s + 32)
            iid, size, boxes = a["image_ids"][sl], a["sizes"][sl], a["boxes"][sl]
            crops = crop_boxes(cache, index, iid, size)
            frame = _frames(iid, size, crops, obj)  # (n, 2) pixels
            scores = expl.scores(a["regions"][sl])  # (n, R, P)
            with torch.no_grad():
                pooled = expl.module.pool(torch.from_numpy(scores))
            raw = pooled.raw.numpy()
            if acc is not None:
                acc.add(pooled.b.numpy(), raw, pooled.where.numpy(), a["labels"][sl], iid)
            peaks = part_peaks(scores, boxes)  # (n, P, 2) grid
            centres.append(peaks_to_pixels(peaks, grid, size, crops).astype(np.float32))
            frames.append(frame)
            ids.append(iid)
            row, top = raw.argmax(0), raw.max(0)  # (P,) this chunk's best image of each part
            better = np.flatnonzero(top > best)
            if not len(better):
                continue
            best[better], best_id[better] = top[better], iid[row[better]]
            best_scores[better] = scores[row[better], :, better]
            best_boxes[better] = boxes[row[better]]
            best_frame[better] = grid_frames(frame, size, crops, grid)[row[better]]
    maps = np.stack([activation_map(best_scores[q], best_boxes[q], grid) for q in range(p)]).astype(np.float32)
    peak = part_peaks(best_scores[:, :, None], best_boxes)  # (P, 1, 2)
    return {"ids": np.concatenate(ids), "centres": np.concatenate(centres), "frames": np.concatenate(frames),
            "pictures": PartPictures(best_id, maps, peak_boxes(peak, best_frame)[:, 0]),
            "stats": acc.finish() if acc is not None else stats}


def grid_frames(frames: np.ndarray, sizes: np.ndarray, crops: np.ndarray | None, grid: tuple[int, int]) -> np.ndarray:
    """Peak-box frames (N, 2) in pixels (:func:`_frames`) -> grid units (width, height) of the image
    the model saw (the crop with CROP=1, else the whole image)."""
    base = (crops[:, 2:] - crops[:, :2]) if crops is not None else np.asarray(sizes, np.float64)
    h, w = grid
    return np.asarray(frames, np.float64) * np.array([w, h], np.float64) / base


def image_grid_frames(cache: RegionCache, index: DatasetIndex | None, obj: dict[int, tuple], ids: np.ndarray,
                      sizes: np.ndarray) -> np.ndarray:
    """(N, 2) the peak-box frames of images ``ids`` in grid units, as the measures take them."""
    crops = crop_boxes(cache, index, ids, sizes)
    return grid_frames(_frames(ids, sizes, crops, obj), sizes, crops, tuple(cache.manifest["grid"]))
