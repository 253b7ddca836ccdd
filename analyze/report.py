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

from dpnet.errors import ImageDecodeError
from dpnet.files import FolderLock, mark_owned, output_errors, remove, remove_stale_temps, replace_owned_folder
from dpnet.files import temp_path, write_json_atomic, write_text_atomic
from extract.cache import RegionCache
from extract.regions import boxes_to_pixels

from . import draw
from .analysis import FAITH_K, PIXEL_MEASURES, Analysis, TestImage, grid_frame, analyse
from .explain import EVIDENCE_ROWS, margin_shares
from .localize import CONSISTENT, activation_map, part_peaks, peak_boxes
from .ownership import owned_parts

log = logging.getLogger(__name__)

# Every interpretability measure the report shows: where it is in analysis.json, its name, which way
# is better, the published figures to read it against, and its protocol in a sentence.
MEASURES = [
    ("localisation", "consistency_evalprotopnet", "consistency (EvalProtoPNet), %", "higher",
     "ProtoPNet 53.3 (ResNet-50) to 81.7 (VGG-19); cosine-similarity prototypes near 100",
     "A part's peak is the mean centre of its 10 best regions in the image; on each test image of the part's class a box of 0.32 of "
     "the bird's side (their 72 px at 224 px) is drawn around it, and the part is consistent when one keypoint "
     "lies in that box in at least 80% of the images where it is visible. The score is the share of consistent parts."),
    ("localisation", "consistency_region_box", "consistency, region-box variant, %", "higher",
     "ours: not comparable to published figures",
     "The same 80% rule with the part's best region itself as the box (regions vary in size)."),
    ("localisation", "stability_evalprotopnet", "stability (EvalProtoPNet), %", "higher",
     "ProtoPNet-like 31.7-46.4; cosine variants up to 66.2",
     "Gaussian noise (sigma 0.2, clipped to +-0.25) is added to each normalised image of a seeded sample of test "
     "images, which is described again with the same backbone and boxes; the score is the share of (part, image "
     "of its class) pairs whose keypoints in the peak box are unchanged."),
    ("localisation", "purity", "purity (PIP-Net), 0-1", "higher", "ProtoPNet 0.46; PIP-Net about 0.9",
     "For each part's top-10 training images (by its best region there), the keypoints in the peak box around "
     "its peak in each; purity is the share of the ten holding the keypoint most of them hold, averaged over parts."),
    ("ownership", "own_top3_share", "classes whose top-3 parts are their own, %", "higher", "by chance about 0",
     "Part p belongs to class p // q; a class counts when its three parts of highest d(p, c) are all its own."),
    ("ownership", "own_evidence_share", "predicted class's evidence from its own parts, %", "higher",
     "by chance about 1/C",
     "The share of the predicted class's positive points (v_cp b_p > 0) carried by its own q parts, averaged "
     "over test images."),
    ("localisation", "on_object_share", "evidence on the object, %", "higher", "",
     "The share of the peaks of the predicted class's five highest-scoring parts that lie in the object box."),
    ("localisation", "on_part_share", "evidence on the bird's parts, %", "higher", "goal 90",
     "The share of the peaks of the predicted class's five highest-scoring parts whose peak box (0.32 of the bird's side, as for consistency) holds at least one visible keypoint: "
     "unlike the on-object share, it can fail on cropped images (evidence on water inside the bird's box)."),
    ("localisation", "landmark_error_x100", "landmark error x100", "lower",
     "region grouping 11.51 (ResNet-101, fine-tuned)",
     "Every part's peak, normalised by the bird box, regress each keypoint (one ridge "
     "regression per keypoint, fitted on the training images where it is visible); the mean L2 error on the "
     "visible test keypoints, in units of the box, times 100."),
    ("explanation", "margin_shown_share", "margin shown by the evidence table, 0-1", "higher",
     "goal 0.9 (PIP-Net's sparse positive layer shows its whole decision)",
     "Each test image's margin, logit of the predicted class minus that of the runner-up, is the sum over parts of "
     "b_p (v_pred,p - v_runner,p); the share of it carried by the 10 parts the evidence table lists (weightiest "
     "first, for and against), median over test images."),
    ("explanation", "margin_hidden_share", "margin left out of the evidence table, 0-1", "lower", "goal 0.1",
     "The parts not listed, each counted by the size of its contribution (for or against: hidden evidence that "
     "cancels is still hidden), as a share of the margin, median over test images."),
    ("explanation", "parts_for_90pct", "parts carrying 90% of the margin", "lower",
     "PIP-Net's local explanation size; goal 10 or fewer",
     "The fewest parts (weightiest first) such that the parts left out, each counted by its size, add up to at "
     "most 10% of the margin; median over test images."),
    ("localisation", "pointing_game", "pointing game, %", "higher", "",
     "The share of test images whose heatmap peak (the centre of the hottest grid cell) lies in the object box."),
]

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
.ci{color:#5b6475;font-size:12px}.ok{color:#1a7f37}.bad{color:#cf222e}.img-view{border-top:1px solid #e3e6eb;padding-top:10px;margin-top:10px}"""


def build_report(run_dir: str | os.PathLike, cache: RegionCache | None = None, k: int = 6, n_show: int = 8,
                 boxes_csv: str | None = None, progress: bool = False, use_dask: bool = False,
                 pixel_images: int = PIXEL_MEASURES["quick"][0], pixel_steps: int = PIXEL_MEASURES["quick"][1]) -> Path:
    """Analyse the run and write ``<run>/report/index.html``, its images and ``analysis.json``.

    Raises:
        InUseError: another live process works in the run folder (training it, or reporting).
    """
    run = Path(run_dir)
    with output_errors(run, "make the run folder writable, or copy the run somewhere writable"), \
            FolderLock(run, "report"):
        remove_stale_temps(run)
        final = run / "report"
        out = temp_path(final)
        (out / "img").mkdir(parents=True)
        try:
            mark_owned(out, "report")
            _write_report(run, out, cache, k, n_show, boxes_csv, progress, use_dask, pixel_images, pixel_steps)
        except BaseException:
            remove(out)
            raise
        replace_owned_folder(out, final, "report", REPORT_FILES)
    return final / "index.html"


REPORT_FILES = r"index\.html|analysis\.json|img"  # what a report folder of an older version (no mark) holds


def _write_report(run: Path, out: Path, cache: RegionCache | None, k: int, n_show: int, boxes_csv: str | None,
                  progress: bool, use_dask: bool, pixel_images: int, pixel_steps: int) -> None:
    an = analyse(run, cache, k=k, n_show=n_show, boxes_csv=Path(boxes_csv) if boxes_csv else None, progress=progress,
                 use_dask=use_dask, pixel_images=pixel_images, pixel_steps=pixel_steps)
    pages = _Renderer(an, out, k)
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


def _with_interval(numbers: dict[str, Any], key: str, digits: int = 3) -> Any:
    """numbers[key] with its 95% interval (numbers[key + '_ci95']) when there is one."""
    v, ci = numbers[key], numbers.get(key + "_ci95")
    if ci is None:
        return v
    return Html(f"{_fmt(v, digits)} <span class='ci'>[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]</span>")


def _pct(v: float) -> str:
    return f"{v:.1f}%"


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

    def __init__(self, an: Analysis, out: Path, k: int):
        self.an, self.out, self.n_img, self.k = an, out, 0, k
        self.cache = an.cache
        self.grid = tuple(self.cache.manifest["grid"])
        self.classes = an.est.classes_
        self.paths = {r["image_id"]: r["path"] for r in self.cache.image_table()}
        self._small = self._small_fields()
        self._images: dict[int, Any] = {}
        self.missing: set[int] = set()  # images whose file is gone
        # with CROP=1, show what the model saw: the crops (boxes from the analysis's dataset index)
        self.crop_index = an.index if self.cache.manifest.get("config", {}).get("crop") else None
        self.owned = owned_parts(an.stats.d, an.est.parts_per_class)

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
            bbox = self.crop_index.bboxes[image_id] if self.crop_index is not None else None
            self._images[image_id] = self._open(image_id, bbox)
        return self._images[image_id]

    def _open(self, image_id: int, bbox):
        """The picture of an image (bounded size); a file gone since extraction is named once and drawn grey."""
        from PIL import Image

        path = self.cache.image_file(self.paths[image_id])
        try:
            return draw.open_rgb(path, bbox)
        except (FileNotFoundError, ImageDecodeError) as exc:
            if image_id not in self.missing:
                log.warning("warning: cannot draw %s (%s): it is shown grey in the report", path,
                            "file not found" if isinstance(exc, FileNotFoundError) else exc)
            self.missing.add(image_id)
            return Image.new("RGB", (256, 256), (200, 200, 200))

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

    def part_picture(self, part: int, side: int = 128):
        """The part in its best training image: activation map, and its peak box in yellow."""
        pics = self.an.pictures
        iid = int(pics.image_id[part])
        img = self.image(iid)
        box = boxes_to_pixels(pics.peak_box[part][None], self.grid, np.array(img.size))[0]
        return draw.part_picture(img, pics.maps[part], box, side)

    def here_picture(self, t: TestImage, part: int, side: int = 96):
        """The part in a test image, drawn as :meth:`part_picture` draws it in its training image."""
        img = self.image(t.image_id)
        peak = part_peaks(t.scores[None, :, part:part + 1], t.boxes[None])[0, 0]
        frame = grid_frame(self.grid, self.crop_index is not None, self.an.obj.get(t.image_id), t.size_wh)
        box = boxes_to_pixels(peak_boxes(peak[None, None], frame[None])[0], self.grid, np.array(img.size))[0]
        return draw.part_picture(img, activation_map(t.scores[:, part], t.boxes, self.grid), box, side)

    def trust(self, part: int) -> str:
        """Its consistency on test images (hit rate on its keypoint), marked when it passes the 80% rule."""
        loc = self.an.numbers.get("localisation", {})
        if "part_hit_rate" not in loc:
            return ""
        rate, kp = loc["part_hit_rate"][part], loc["keypoints"][loc["part_keypoint"][part]]
        if rate >= CONSISTENT:
            return f"<span class='ok' title='passes the 80% rule'>&#10003; {100 * rate:.0f}% on {esc(kp)}</span>"
        return f"<span title='below the 80% rule'>{100 * rate:.0f}% on {esc(kp)}</span>"

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
        n = self.an.numbers
        acc, loc, own, f = n["accuracy"], n["localisation"], n.get("ownership", {}), n["faithfulness"]
        ex = n.get("explanation", {})
        cards = [("DP-Net top-1", acc["dpnet"]["top1"], "% of test images, higher is better")]
        best = max((k for k in ("global_linear", "global_mlp", "global_logreg") if k in acc),
                   key=lambda k: acc[k]["top1"], default=None)
        if best:
            cards.append((f"best global baseline ({best[7:]})", acc[best]["top1"], "same features, averaged globally"))
        for group, key, title, note in (
                (loc, "consistency_evalprotopnet", "consistency", "% of parts (EvalProtoPNet)"),
                (loc, "purity", "purity", "0-1, PIP-Net's measure"), (own, "own_top3_share", "own top-3 parts",
                                                                       "% of classes"),
                (loc, "on_object_share", "evidence on the object", "% of top-5 regions"),
                (ex, "margin_shown_share", "margin the table shows", "0-1, goal 0.9"),
                (ex, "parts_for_90pct", "parts for 90% of the margin", "median, goal 10 or fewer"),
                (f, "deletion_auc", "deletion AUC", f"lower is better; random {_fmt(f.get('deletion_auc_random'), 3)}")):
            if key in group:
                cards.append((title, group[key], note))
        html_cards = "".join(f"<div class='card'>{html.escape(t)}<b>{_fmt(v, 3 if isinstance(v, float) and abs(v) < 1 else 1)}"
                             f"</b><span class='note'>{html.escape(n)}</span></div>" for t, v, n in cards)
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
        parts = ["<section><h2>Faithfulness</h2>"]
        if "deletion_auc" in f:
            parts.append(self._pixel_faithfulness(f))
        rows = [[f"top-{k} parts", f[f"k{k}"]["drop_named"], _pct(f[f"k{k}"]["drop_named_pct"]),
                 f[f"k{k}"]["drop_random"], _pct(f[f"k{k}"]["drop_random_pct"]),
                 ("at least " if f[f"k{k}"]["ratio_is_lower_bound"] else "") + f"{f[f'k{k}']['ratio']:.1f}"]
                for k in FAITH_K]
        steps = np.arange(len(self.an.deletion["named"]))
        name = "img/deletion-regions.png"
        draw.line_plot(self.out / name, {"regions the explanation names": (steps, self.an.deletion["named"]),
                                         "as many random regions": (steps, self.an.deletion["random"])},
                       "top-k contributing parts removed", "mean predicted-class logit", "deletion in region space")
        parts.append(
            f"<p class='note'>In region space: for each of {f['images']} test images the best regions of the top-k "
            "parts behind the predicted class are removed from X (exactly: they leave the max-pool) and the class "
            "logit recomputed; as many random regions are removed for comparison. With hundreds of overlapping "
            "regions a few random ones are rarely missed, so the ratio divides by at least 0.1% of the logit.</p>"
            + _table(["removed", "drop (named)", "% of logit", "drop (random)", "% of logit", "named / random"], rows)
            + f"<img src='{name}' alt='deletion curves in region space'></section>")
        return "".join(parts)

    def _pixel_faithfulness(self, f: dict) -> str:
        orders = [o for o in ("dpnet", "random", "cam") if f"deletion_auc{'' if o == 'dpnet' else '_' + o}" in f]
        label = {"dpnet": "DP-Net's evidence", "random": "random cells", "cam": "CAM of the global linear baseline"}

        def key(kind, o):
            return f"{kind}_auc" + ("" if o == "dpnet" else f"_{o}")

        rows = [[label[o], _with_interval(f, key("deletion", o)), _with_interval(f, key("insertion", o))]
                for o in orders]
        if "cam" in orders:
            rows.append([Html("DP-Net's minus the CAM's (paired; <b>deletion below 0</b> and <b>insertion above 0</b> "
                              "mean DP-Net's evidence is the more faithful)"),
                         _with_interval({"d": f["deletion_auc"] - f["deletion_auc_cam"],
                                         "d_ci95": f.get("deletion_auc_minus_cam_ci95")}, "d"),
                         _with_interval({"d": f["insertion_auc"] - f["insertion_auc_cam"],
                                         "d_ci95": f.get("insertion_auc_minus_cam_ci95")}, "d")])
        x = np.linspace(0, 1, f["pixel_steps"] + 1)
        pics = []
        for kind in ("deletion", "insertion"):
            name = f"img/{kind}-pixels.png"
            draw.line_plot(self.out / name, {label[o]: (x, self.an.deletion[f"{kind}_{o}"]) for o in orders},
                           f"share of grid cells {'blanked' if kind == 'deletion' else 'revealed'}",
                           "mean class probability", f"{kind} in pixel space")
            pics.append(f"<img src='{name}' alt='{kind} curves'>")
        return (f"<p class='note'>In pixel space (RISE), on {f['pixel_images']} test images drawn with a fixed seed: "
                "the image's grid cells are blanked to the mean colour (deletion) or revealed on a blank image "
                f"(insertion) in {f['pixel_steps']} steps, in the order an explanation ranks them, and the image goes "
                "through the backbone and the model again; the area under the predicted class's probability. "
                "Deletion: lower is better; insertion: higher is better. All orders are judged on DP-Net's own "
                "probability; DP-Net's order spreads each part's positive points over its best regions. In "
                "brackets: the 95% interval (bootstrap over the images); <code>make report MEASURES=full</code> "
                f"(<code>--measures full</code>) takes {PIXEL_MEASURES['full'][0]} images in "
                f"{PIXEL_MEASURES['full'][1]} steps.</p>"
                + _table(["cells ordered by", "deletion AUC", "insertion AUC"], rows)
                + f"<div class='row'>{''.join(pics)}</div>")

    def localisation(self) -> str:
        n = self.an.numbers
        present = [m for m in MEASURES if m[1] in n.get(m[0], {})]
        if not present:
            return ("<section><h2>Parts: localisation and ownership</h2><p class='note'>This dataset has no keypoints "
                    "or object boxes (pass BOXES=file.csv for boxes), so localisation is not measured.</p></section>")
        rows = [[title, _with_interval(n[group], key, 1), better, anchor]
                for group, key, title, better, anchor, _ in present]
        protocols = "".join(f"<li><b>{html.escape(title)}</b>: {html.escape(text)}</li>"
                            for _, _, title, _, _, text in present)
        loc = n["localisation"]
        synth = ""
        if "top_part_on_defining_part" in loc:
            synth = _table(["synthetic set", "%"], [
                ["top part's best region covers a class-defining part", loc["top_part_on_defining_part"]],
                ["a random part's best region does (chance)", loc["chance_region_on_defining_part"]]])
        return ("<section><h2>Parts: localisation and ownership</h2><p class='note'>Measured as the field measures "
                "them (EvalProtoPNet, PIP-Net, region grouping), on this run's test images.</p>"
                + _table(["measure", "value", "better", "published figures (CUB)"], rows) + synth
                + f"<p class='note'>How each is measured:</p><ul class='note'>{protocols}</ul></section>")

    def part_label(self, p: int, limit: int = 18) -> str:
        """"part p (of <owner>)" where ownership holds (see analyze.ownership), else "part p (not owned)"."""
        if self.owned[p]:
            return f"part {p} (of {esc(self.classes[p // self.an.est.parts_per_class], limit)})"
        return f"part {p} (not owned)"

    def class_view(self) -> str:
        d, f = self.an.stats.d, self.an.stats.f
        blocks = []
        for c, name in enumerate(self.classes):
            parts = np.argsort(-d[c], kind="stable")[:3]
            cells = "".join(f"<div class='part'>{self.tag(self.part_picture(int(p)), f'class{c}', f'part {p}')}"
                            f"<span>{self.part_label(int(p))}<br>d={d[c, p]:.2f}, f={f[p]}<br>{self.trust(int(p))}"
                            f"</span></div>" for p in parts)
            blocks.append(f"<div><b>{html.escape(name)}</b><div class='row'>{cells}</div></div>")
        return ("<section><h2>Classes: their top-3 parts</h2><p class='note'>d(p, c) = sum over the training images "
                "of class c of v_cp b_p, divided by log(1 + f(p)), where f(p) counts the classes having part p "
                "among their top-q parts (the paper divides by log f(p), which is zero at f = 1). Higher d means "
                "the part speaks for this class more than for others. A part is named after the class it was made "
                "for only when that class gives it the highest d of all (ownership holds); otherwise it is marked "
                "not owned. Each part is shown in its best training image: its activation map (each cell the best "
                "score of the regions covering it) and, in yellow, the box the localisation measures use around its "
                "peak (the mean centre of its 10 best regions). Under it: the share of its class's test images "
                "where that box holds its most frequent keypoint; &#10003; marks a part that passes "
                "EvalProtoPNet's 80% rule (a consistent part).</p>" + "".join(blocks) + "</section>")

    def image_view(self) -> str:
        blocks = [self._one_image(t) for t in self.an.shown]
        return ("<section><h2>Test images explained</h2><p class='note'>For correct and wrong predictions: the "
                "heatmap of the class's top parts (their best regions painted with their scores), the part "
                "assignment map (each cell coloured by the class part whose best region covering it scores "
                "highest), and why the predicted class and not the runner-up: the 10 parts that weigh most in the "
                "logit margin, for or against (b_p times v_pred,p - v_runner,p), then all the others in one row; "
                "the rows add up to the margin. The line above each table says how much of the margin the listed "
                "parts carry and how much weight the others hold between them.</p>" + "".join(blocks) + "</section>")

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
        return f"<div class='img-view'>{head}{pics}<div class='row'>{self._evidence(t)}</div></div>"

    def _evidence(self, t: TestImage, top: int = EVIDENCE_ROWS) -> str:
        """The parts that carry the decision: each part's share of the margin over the runner-up."""
        ev = self.an.explainer.margin_evidence(t.scores)
        rows = []
        for i in range(min(top, len(ev.parts))):
            part = int(ev.parts[i])
            here = self.tag(self.here_picture(t, part), "here", "this image")
            proto = self.tag(self.part_picture(part, 96), "proto", "its best training image")
            rows.append([Html(f"{self.part_label(part, 24)}<br>{self.trust(part)}"), here, proto, float(ev.b[i]),
                         float(ev.dv[i]), float(ev.margin[i])])
        rest = float(ev.margin[top:].sum())
        rows.append([f"{max(len(ev.parts) - top, 0)} other parts", "", "", "", "", rest])
        rows.append([Html("<b>sum = margin</b>"), "", "", "", "", ev.total])
        shown, hidden, _ = (100 * float(x[0]) for x in margin_shares(ev.margin[None], top))
        pred, runner = (html.escape(self.classes[c]) for c in (ev.pred, ev.runner))
        return (f"<div><p class='note'>why <b>{pred}</b> and not <b>{runner}</b> (logit margin {ev.total:.3f}): "
                f"the {min(top, len(ev.parts))} weightiest parts carry <b>{shown:.0f}%</b> of it; the others, each "
                f"counted by its size, weigh <b>{hidden:.0f}%</b> of it</p>"
                + _table(["part", "here", "looks like", "b_p", "v_pred - v_runner", "margin"], rows) + "</div>")

    def gallery(self) -> str:
        st, blocks = self.an.stats, []
        for p in range(st.top_image.shape[0]):
            crops = "".join(self.tag(self.part_crop(p, r, 72), f"part{p}", f"score {st.top_score[p, r]:.2f}")
                            for r in range(min(self.k, st.top_image.shape[1])))
            blocks.append(f"<div class='part'><span>{self.part_label(p, 24)}</span>"
                          f"<div class='row'>{crops}</div></div>")
        return ("<section><h2>Part gallery</h2><p class='note'>Each part shown by the training regions that score "
                "it highest (one per image, best first), found in one streaming pass over the training set.</p>"
                + "".join(blocks) + "</section>")

