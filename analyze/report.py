"""``make report``: a static, self-contained HTML report (images beside it) and analysis.json.

Every number comes from :func:`analyze.analysis.analyse`; this module renders them and writes
the report folder. The whole folder is written under a temporary name and renamed into place, so
a killed report leaves the previous one whole. Every string that comes from the dataset (class
names, file names) is cut first, then escaped.
"""

from __future__ import annotations

import html
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dpnet.files import FolderLock, remove, remove_stale_temps, temp_path, write_json_atomic, write_text_atomic
from extract.cache import RegionCache
from extract.regions import boxes_to_pixels

from . import draw
from .analysis import FAITH_K, Analysis, TestImage, analyse

log = logging.getLogger(__name__)

CSS = """body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0cc}main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border-radius:10px;padding:14px 20px;margin:18px 0;box-shadow:0 1px 3px #0002}
h2{font-size:18px;margin:4px 0 10px}.note{color:#5b6475;font-size:13px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border-bottom:1px solid #e3e6eb;padding:4px 8px;text-align:right}
th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}.cards{display:flex;gap:14px;flex-wrap:wrap}
.card{background:#f0f4ff;border-radius:8px;padding:10px 16px;min-width:150px}.card b{font-size:22px;display:block}
.row{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start}.row img{border-radius:4px}
.part{display:inline-block;margin:4px 10px 8px 0;vertical-align:top}.part span{display:block;font-size:12px;color:#5b6475}
.ok{color:#1a7f37}.bad{color:#cf222e}.img-view{border-top:1px solid #e3e6eb;padding-top:10px;margin-top:10px}"""


def build_report(run_dir: str | os.PathLike, cache: RegionCache | None = None, k: int = 6, n_show: int = 8,
                 boxes_csv: str | None = None, progress: bool = False, use_dask: bool = False) -> Path:
    """Analyse the run and write ``<run>/report/index.html``, its images and ``analysis.json``.

    Raises:
        InUseError: another live process works in the run folder (training it, or reporting).
    """
    run = Path(run_dir)
    with FolderLock(run, "report"):
        remove_stale_temps(run)
        final = run / "report"
        out = temp_path(final)
        (out / "img").mkdir(parents=True)
        try:
            _write_report(run, out, cache, k, n_show, boxes_csv, progress, use_dask)
        except BaseException:
            remove(out)
            raise
        old = temp_path(final, "old")
        if final.exists():
            os.replace(final, old)
        os.replace(out, final)
        remove(old)
    return final / "index.html"


def _write_report(run: Path, out: Path, cache: RegionCache | None, k: int, n_show: int, boxes_csv: str | None,
                  progress: bool, use_dask: bool) -> None:
    an = analyse(run, cache, k=k, n_show=n_show, boxes_csv=Path(boxes_csv) if boxes_csv else None, progress=progress,
                 use_dask=use_dask)
    pages = _Renderer(an, out)
    body = "\n".join([pages.summary(), pages.accuracy(), pages.faithfulness(), pages.localisation(),
                      pages.class_view(), pages.image_view(), pages.gallery()])
    title = f"DP-Net report: {run.name}"
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1><p>{pages.subtitle()}</p>"
           f"</header><main>{body}</main></body></html>")
    write_json_atomic(out / "analysis.json", _jsonable(an.numbers))
    write_text_atomic(out / "index.html", doc)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else ("inf" if math.isinf(float(obj)) else None)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isinf(float(v)):
            return "&infin; (random removal: no drop above 0.1%)"
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return html.escape(str(v))


def esc(text: Any, limit: int | None = None) -> str:
    """A dataset-derived string for HTML: cut to ``limit`` characters first, then escaped."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return html.escape(text)


class Html(str):
    """Markup this module made itself: a table cell that is not escaped (every other string is)."""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Html) else _fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Renderer:
    """Turns an Analysis into HTML sections, saving the images each one needs."""

    def __init__(self, an: Analysis, out: Path):
        self.an, self.out, self.n_img = an, out, 0
        self.cache = an.cache
        self.grid = tuple(self.cache.manifest["grid"])
        self.classes = an.est.classes_
        self.root = Path(self.cache.manifest["dataset_root"])
        self.paths = {r["image_id"]: r["path"] for r in self.cache.image_table()}
        self._small = self._small_fields()
        self._images: dict[int, Any] = {}
        # with CROP=1, show what the model saw: the crops (boxes from the analysis's dataset index)
        self.crop_index = an.index if self.cache.manifest.get("config", {}).get("crop") else None

    # ------------------------------------------------------------------ helpers
    def _small_fields(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes (R, 4), size (2,)) for the training images the gallery shows."""
        want = set(int(i) for i in self.an.stats.top_image.ravel())
        out = {}
        for _, a in self.cache.iter_shards("train", ("boxes", "sizes", "image_ids"), prefetch=False):
            for row, iid in enumerate(a["image_ids"]):
                if int(iid) in want:
                    out[int(iid)] = (a["boxes"][row], a["sizes"][row])
        return out

    def image(self, image_id: int):
        if image_id not in self._images:
            if len(self._images) > 64:
                self._images.clear()
            rel = self.paths[image_id]
            path = self.root / "images" / rel if (self.root / "images").is_dir() else self.root / rel
            img = draw.open_rgb(path)
            if self.crop_index is not None:
                from extract.regions import crop_box

                img = img.crop(crop_box(self.crop_index.bboxes[image_id], img.size))
            self._images[image_id] = img
        return self._images[image_id]

    def save(self, img, stem: str) -> str:
        self.n_img += 1
        name = f"img/{stem}-{self.n_img:05d}.jpg"
        img.save(self.out / name, quality=85)
        return name

    def tag(self, img, stem: str, title: str = "", height: int | None = None) -> Html:
        h = f" height='{height}'" if height else ""
        return Html(f"<img src='{self.save(img, stem)}' title='{html.escape(title)}' alt='{html.escape(title)}'{h}>")

    def region_crop(self, image_id: int, boxes: np.ndarray, region: int, size: int = 96):
        img = self.image(image_id)  # the picture the model saw (the crop, with CROP=1)
        pix = boxes_to_pixels(boxes[region:region + 1], self.grid, np.array(img.size))[0]
        return draw.crop(img, pix, size)

    def part_crop(self, part: int, rank: int = 0, size: int = 96):
        iid = int(self.an.stats.top_image[part, rank])
        boxes, _ = self._small[iid]
        return self.region_crop(iid, boxes, int(self.an.stats.top_region[part, rank]), size)

    # ------------------------------------------------------------------ sections
    def subtitle(self) -> str:
        m = self.cache.manifest
        return html.escape(f"dataset {m['dataset']} · backbone {m['backbone']} · R={m['R']} regions of a "
                           f"{m['grid'][0]}x{m['grid'][1]} grid · {self.an.numbers['parts']['P']} parts "
                           f"(q={self.an.est.parts_per_class} per class) · {len(self.classes)} classes")

    def summary(self) -> str:
        acc = self.an.numbers["accuracy"]
        cards = [("DP-Net top-1", acc["dpnet"]["top1"], "% of test images, higher is better")]
        if "global_linear" in acc:
            cards.append(("global linear top-1", acc["global_linear"]["top1"], "same features, averaged globally"))
        f = self.an.numbers["faithfulness"].get("k3", {})
        if f:
            cards.append(("faithfulness ratio (k=3)", f["ratio"], "named / random score drop; >1 is faithful"))
        loc = self.an.numbers["localisation"]
        if "pointing_game" in loc:
            cards.append(("pointing game", loc["pointing_game"], "% of heatmap peaks inside the object"))
        html_cards = "".join(f"<div class='card'>{html.escape(t)}<b>{_fmt(v, 1)}</b><span class='note'>{html.escape(n)}</span></div>"
                             for t, v, n in cards)
        return f"<section><h2>At a glance</h2><div class='cards'>{html_cards}</div></section>"

    def accuracy(self) -> str:
        acc = self.an.numbers["accuracy"]
        rows = [[name, acc[name]["top1"], acc[name]["mean_class"]] for name in
                ("dpnet", "global_linear", "global_mlp", "global_logreg") if name in acc]
        parts = ["<section><h2>Accuracy</h2>",
                 "<p class='note'>Test top-1 and mean per-class accuracy (%), higher is better. The global "
                 "baselines see only the mean of the whole feature map; DP-Net sees the regions.</p>",
                 _table(["model", "top-1", "mean per class"], rows)]
        abl = self.an.numbers["ablation"]
        if abl:
            parts += ["<p class='note'>Ablation of the constraints (the paper's Table 2), same cache, test top-1 "
                      "(%), higher is better.</p>",
                      _table(["constraints", "top-1", "mean per class"], [[r["constraints"], r["top1"], r["mean_class"]] for r in abl])]
        hist = self.an.numbers["history"]
        if hist:
            ep = np.array([r["epoch"] for r in hist])
            series = {"train top-1": (ep, np.array([r["train_top1"] for r in hist]))}
            if all(isinstance(r.get("val_top1"), float) and math.isfinite(r["val_top1"]) for r in hist):
                series["val top-1"] = (ep, np.array([r["val_top1"] for r in hist]))
            name = "img/curves.png"
            draw.line_plot(self.out / name, series, "epoch", "accuracy %", "training curves")
            parts.append(f"<p class='note'>Training curves: accuracy per epoch on the fitting and validation "
                         f"splits; the best validation epoch is kept.</p><img src='{name}' alt='training curves'>")
        return "".join(parts) + "</section>"

    def faithfulness(self) -> str:
        f = self.an.numbers["faithfulness"]
        if not f:
            return ""
        rows = [[f"top-{k} parts", f[f"k{k}"]["drop_named"], f[f"k{k}"]["drop_random"], f[f"k{k}"]["ratio"]] for k in FAITH_K]
        steps = np.arange(len(self.an.deletion["named"]))
        name = "img/deletion.png"
        draw.line_plot(self.out / name, {"regions the explanation names": (steps, self.an.deletion["named"]),
                                         "as many random regions": (steps, self.an.deletion["random"])},
                       "top-k contributing parts removed", "mean predicted-class logit", "deletion curves")
        return ("<section><h2>Faithfulness</h2><p class='note'>For each of "
                f"{f['images']} test images, the best regions of the top-k parts behind the predicted class are "
                "removed from X (exactly, in region space) and the class score recomputed; the same number of "
                "random regions is removed for comparison. A faithful explanation drops the score far more than "
                "random removal: ratio above 1 is better.</p>"
                + _table(["removed", "mean drop (named)", "mean drop (random)", "ratio"], rows)
                + f"<p class='note'>Deletion curves: the lower the named curve sits under the random one, the more "
                  f"the named regions carry the decision.</p><img src='{name}' alt='deletion curves'></section>")

    def localisation(self) -> str:
        loc = self.an.numbers["localisation"]
        if not loc:
            return ("<section><h2>Localisation</h2><p class='note'>This dataset has no keypoints or object boxes "
                    "(pass BOXES=file.csv for boxes), so localisation is not measured.</p></section>")
        lines = {"landmark_error_x100": "landmark regression error x100 (part centres -> keypoints, lower is better)",
                 "consistency": "consistent parts, % (best region on the same keypoint in >= 80% of its class's "
                                "test images; higher is better)",
                 "pointing_game": "pointing game, % (heatmap peak inside the object box; higher is better)",
                 "top_part_on_defining_part": "top part's best region covers a class-defining part, % (higher is better)",
                 "chance_region_on_defining_part": "the same for a random part's best region (chance level), %"}
        rows = [[lines[k], loc[k]] for k in lines if k in loc]
        return "<section><h2>Localisation</h2>" + _table(["measure", "value"], rows) + "</section>"

    def class_view(self) -> str:
        d, f = self.an.stats.d, self.an.stats.f
        blocks = []
        for c, name in enumerate(self.classes):
            parts = np.argsort(-d[c], kind="stable")[:3]
            cells = "".join(f"<div class='part'>{self.tag(self.part_crop(int(p)), f'class{c}', f'part {p}')}"
                            f"<span>part {p} (of {esc(self.classes[p // self.an.est.parts_per_class], 18)})<br>"
                            f"d={d[c, p]:.2f}, f={f[p]}</span></div>" for p in parts)
            blocks.append(f"<div><b>{html.escape(name)}</b><div class='row'>{cells}</div></div>")
        return ("<section><h2>Classes: their top-3 parts</h2><p class='note'>d(p, c) = sum over the training images "
                "of class c of v_cp b_p, divided by log(1 + f(p)), where f(p) counts the classes having part p "
                "among their top-q parts (the paper divides by log f(p), which is zero at f = 1). Higher d means "
                "the part speaks for this class more than for others. Each crop is the part's best training "
                "region.</p>" + "".join(blocks) + "</section>")

    def image_view(self) -> str:
        blocks = [self._one_image(t) for t in self.an.shown]
        return ("<section><h2>Test images explained</h2><p class='note'>For correct and wrong predictions: the "
                "heatmap of the class's top parts (their best regions painted with their scores), the part "
                "assignment map (each cell coloured by the class part whose best region covering it scores "
                "highest), and the evidence tables of the two top classes: each part's points v_cp x b_p, which "
                "add up to the class logit.</p>" + "".join(blocks) + "</section>")

    def _one_image(self, t: TestImage) -> str:
        img = self.image(t.image_id)
        expl = self.an.explainer
        heat = expl.heatmaps(t.scores[None], t.boxes[None], self.grid, np.array([t.pred]))[0]
        amap = expl.assignment_maps(t.scores[None], t.boxes[None], self.grid, np.array([t.pred]))[0]
        q = self.an.est.parts_per_class
        own = np.arange(t.pred * q, (t.pred + 1) * q)
        verdict = "ok" if t.pred == t.label else "bad"
        head = (f"<p><b>image {t.image_id}</b>: true <b>{html.escape(self.classes[t.label])}</b>, predicted "
                f"<b class='{verdict}'>{html.escape(self.classes[t.pred])}</b></p>")
        pics = (f"<div class='row'>{self.tag(img, 'orig', 'image', 160)}{self.tag(draw.overlay_heatmap(img, heat), 'heat', 'heatmap', 160)}"
                f"{self.tag(draw.overlay_assignment(img, amap, own), 'assign', 'part assignment', 160)}</div>")
        tables = "".join(self._evidence(t, int(c)) for c in np.argsort(-t.logits)[:2])
        return f"<div class='img-view'>{head}{pics}<div class='row'>{tables}</div></div>"

    def _evidence(self, t: TestImage, cls: int, top: int = 5) -> str:
        ev = self.an.explainer.evidence(t.scores, cls)
        rows = []
        for i in range(min(top, len(ev.parts))):
            here = self.tag(self.region_crop(t.image_id, t.boxes, int(ev.region[i]), 64), "here", "this image")
            proto = self.tag(self.part_crop(int(ev.parts[i]), 0, 64), "proto", "best training region")
            rows.append([f"part {ev.parts[i]}", here, proto, float(ev.b[i]), float(ev.v[i]), float(ev.points[i])])
        rest = ev.points[top:].sum()
        rows.append([f"{max(len(ev.parts) - top, 0)} other parts", "", "", "", "", float(rest)])
        rows.append([Html("<b>sum = logit</b>"), "", "", "", "", float(ev.logit)])
        return (f"<div><p class='note'>class <b>{html.escape(self.classes[cls])}</b>: this looks like that</p>"
                + _table(["part", "here", "looks like", "b_p", "v_cp", "points"], rows) + "</div>")

    def gallery(self) -> str:
        st, q, blocks = self.an.stats, self.an.est.parts_per_class, []
        for p in range(st.top_image.shape[0]):
            crops = "".join(self.tag(self.part_crop(p, r, 72), f"part{p}", f"score {st.top_score[p, r]:.2f}")
                            for r in range(st.top_image.shape[1]))
            blocks.append(f"<div class='part'><span>part {p} · {esc(self.classes[p // q], 24)}</span>"
                          f"<div class='row'>{crops}</div></div>")
        return ("<section><h2>Part gallery</h2><p class='note'>Each part shown by the training regions that score "
                "it highest (one per image, best first), found in one streaming pass over the training set.</p>"
                + "".join(blocks) + "</section>")

