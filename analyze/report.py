"""``make report``: a static, self-contained HTML report (images beside it) and analysis.json.

Every number comes from :func:`dpnet.analyze.analysis.analyse`; this module renders them and writes
the report folder. The whole folder is written under a temporary name and renamed into place, so
a killed report leaves the previous one whole. Every string that comes from the dataset (class
names, file names) is cut first, then escaped.
"""

from __future__ import annotations

import functools

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dpnet.errors import ImageDecodeError
from dpnet.files import FolderLock, mark_owned, output_errors, remove, remove_stale_temps, replace_owned_folder
from dpnet.files import temp_path, write_json_atomic, write_text_atomic
from dpnet.extract.cache import RegionCache
from dpnet.extract.regions import boxes_to_pixels

from . import draw
from .analysis import FAITH_K, Analysis, TestImage, analyse, image_grid_frames
from .config import PIXEL_MEASURES
from .explain import EVIDENCE_ROWS, margin_shares
from .localize import CONSISTENT, activation_map, part_peaks, peak_boxes
from .ownership import model_part_classes, owned_parts
from .pages import cut, num, templates

log = logging.getLogger(__name__)

# Every interpretability measure the report shows: where it is in analysis.json, its name, which way
# is better, the published figures to read it against, and its protocol in a sentence.
MEASURES = [
    ("localisation", "consistency_evalprotopnet", "consistency (EvalProtoPNet), %", "higher",
     "ProtoPNet 53.3 (ResNet-50) to 81.7 (VGG-19); cosine-similarity prototypes near 100",
     "A part's peak is the mean centre of its 10 best regions in the image; on each test image of the part's class a box of 0.32 of "
     "the bird's side (their 72 px at 224 px) is drawn around it, and the part is consistent when one keypoint "
     "lies in that box in at least 80% of the images where it is visible. The score is the share of consistent parts, "
     "taken, as PIP-Net does, over the parts that weigh in some class (all of them with a free class layer; a "
     "sparse layer's supported parts; no pruned part): the others are in no explanation."),
    ("localisation", "consistency_all_parts", "consistency over every part, %", "higher", "",
     "The same over all P parts, those that weigh in no class included."),
    ("localisation", "consistency_region_box", "consistency, region-box variant, %", "higher",
     "ours: not comparable to published figures",
     "The same 80% rule with the part's best region itself as the box (regions vary in size)."),
    ("localisation", "stability_evalprotopnet", "stability (EvalProtoPNet), %", "higher",
     "ProtoPNet-like 31.7-46.4; cosine variants up to 66.2",
     "Gaussian noise (sigma 0.2, clipped to +-0.25) is added to each normalised image of a seeded sample of test "
     "images, which is described again with the same backbone and boxes; the score is the share of (part, image "
     "of its class) pairs whose keypoints in the peak box are unchanged, over the parts that weigh in some class."),
    ("localisation", "stability_all_parts", "stability over every part, %", "higher", "",
     "The same over all P parts."),
    ("localisation", "purity", "purity (PIP-Net), 0-1", "higher", "ProtoPNet 0.46; PIP-Net about 0.9",
     "For each part's top-10 training images (by its best region there), the keypoints in the peak box around "
     "its peak in each; purity is the share of the ten holding the keypoint most of them hold, averaged over the "
     "parts that weigh in some class."),
    ("localisation", "purity_all_parts", "purity over every part, 0-1", "higher", "", "The same over all P parts."),
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
    context = {"title": f"DP-Net report: {run.name}", "subtitle": pages.subtitle(), "cards": pages.summary(),
               "accuracy": pages.accuracy(), "faith": pages.faithfulness(), "loc": pages.localisation(),
               "classes": pages.class_view(), "images": pages.image_view(), "evidence_rows": EVIDENCE_ROWS,
               "gallery": pages.gallery()}
    write_json_atomic(out / "analysis.json", _jsonable(an.numbers))
    write_text_atomic(out / "index.html", render_page(context))


def render_page(context: dict[str, Any]) -> str:
    """index.html from ``templates/report.html`` and the data of each section."""
    return templates().get_template("report.html").render(**context)


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

    def pic(self, img, stem: str, title: str = "", height: int | None = None) -> dict[str, Any]:
        """Save a picture; what the page needs to show it."""
        return {"src": self.save(img, stem), "title": title, "height": height}

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
        frame = image_grid_frames(self.cache, self.an.index, self.an.obj, np.array([t.image_id]),
                                  np.asarray(t.size_wh, np.float64)[None])[0]
        box = boxes_to_pixels(peak_boxes(peak[None, None], frame[None])[0], self.grid, np.array(img.size))[0]
        return draw.part_picture(img, activation_map(t.scores[:, part], t.boxes, self.grid), box, side)

    def trust(self, part: int) -> dict[str, Any] | None:
        """Its consistency on test images (hit rate on its keypoint), and whether it passes the 80% rule."""
        loc = self.an.numbers.get("localisation", {})
        if "part_hit_rate" not in loc:
            return None
        rate, kp = loc["part_hit_rate"][part], loc["keypoints"][loc["part_keypoint"][part]]
        return {"ok": rate >= CONSISTENT, "rate": f"{100 * rate:.0f}", "keypoint": kp}

    def part_crop(self, part: int, rank: int = 0, size: int = 96):
        iid = int(self.an.stats.top_image[part, rank])
        boxes, _ = self._small[iid]
        return self.region_crop(iid, boxes, int(self.an.stats.top_region[part, rank]), size)

    # ------------------------------------------------------------------ sections (data for the template)
    def subtitle(self) -> str:
        m = self.cache.manifest
        return (f"dataset {m['dataset']} · backbone {m['backbone']} · R={m['R']} regions of a "
                f"{m['grid'][0]}x{m['grid'][1]} grid · {self.an.numbers['parts']['P']} parts "
                f"(q={self.an.est.parts_per_class} per class) · {len(self.classes)} classes")

    def summary(self) -> list[dict[str, Any]]:
        n = self.an.numbers
        acc, loc, own, f = n["accuracy"], n["localisation"], n.get("ownership", {}), n["faithfulness"]
        ex = n.get("explanation", {})
        cards = [("DP-Net top-1", acc["dpnet"]["top1"], "% of test images, higher is better")]
        best = max((k for k in ("global_linear", "global_mlp", "global_logreg") if k in acc),
                   key=lambda k: acc[k]["top1"], default=None)
        if best:
            cards.append((f"best global baseline ({best[7:]})", acc[best]["top1"], "same features, averaged globally"))
        parts = n.get("parts", {})
        measured = (f"{parts['measured']} of {parts['P']} parts that weigh in a class"
                    if parts.get("measured", parts.get("P")) != parts.get("P") else "parts")
        for group, key, title, note in (
                (loc, "consistency_evalprotopnet", "consistency", f"% of the {measured} (EvalProtoPNet)"),
                (loc, "purity", "purity", f"0-1, PIP-Net's measure, over the {measured}"),
                (own, "own_top3_share", "own top-3 parts", "% of classes"),
                (loc, "on_object_share", "evidence on the object", "% of top-5 parts' peaks"),
                (ex, "margin_shown_share", "margin the table shows", "0-1, goal 0.9"),
                (ex, "parts_for_90pct", "parts for 90% of the margin", "median, goal 10 or fewer"),
                (f, "deletion_auc", "deletion AUC", f"lower is better; random {num(f.get('deletion_auc_random'), 3)}")):
            if key in group:
                cards.append((title, group[key], note))
        return [{"title": t, "value": v, "note": note, "digits": 3 if isinstance(v, float) and abs(v) < 1 else 1}
                for t, v, note in cards]

    def accuracy(self) -> dict[str, Any]:
        acc = self.an.numbers["accuracy"]
        out = {"rows": [[name, acc[name]["top1"], acc[name]["mean_class"]] for name in
                        ("dpnet", "global_linear", "global_mlp", "global_logreg") if name in acc],
               "ablation": [[r["constraints"], r["top1"], r["mean_class"]] for r in self.an.numbers["ablation"]],
               "curves": None}
        hist = self.an.numbers["history"]
        if hist:
            ep = np.array([r["epoch"] for r in hist])
            series = {"train top-1": (ep, np.array([r["train_top1"] for r in hist]))}
            if all(isinstance(r.get("val_top1"), float) and math.isfinite(r["val_top1"]) for r in hist):
                series["val top-1"] = (ep, np.array([r["val_top1"] for r in hist]))
            out["curves"] = "img/curves.png"
            draw.line_plot(self.out / out["curves"], series, "epoch", "accuracy %", "training curves")
        return out

    def faithfulness(self) -> dict[str, Any] | None:
        f = self.an.numbers["faithfulness"]
        if not f:
            return None
        rows = [{"k": k, "named": f[f"k{k}"]["drop_named"], "named_pct": f[f"k{k}"]["drop_named_pct"],
                 "random": f[f"k{k}"]["drop_random"], "random_pct": f[f"k{k}"]["drop_random_pct"],
                 "ratio": ("at least " if f[f"k{k}"]["ratio_is_lower_bound"] else "") + f"{f[f'k{k}']['ratio']:.1f}"}
                for k in FAITH_K]
        steps = np.arange(len(self.an.deletion["named"]))
        plot = "img/deletion-regions.png"
        draw.line_plot(self.out / plot, {"regions the explanation names": (steps, self.an.deletion["named"]),
                                         "as many random regions": (steps, self.an.deletion["random"])},
                       "top-k contributing parts removed", "mean predicted-class logit", "deletion in region space")
        return {"images": f["images"], "rows": rows, "plot": plot,
                "pixel": self._pixel_faithfulness(f) if "deletion_auc" in f else None}

    def _pixel_faithfulness(self, f: dict) -> dict[str, Any]:
        orders = [o for o in ("dpnet", "random", "cam") if f"deletion_auc{'' if o == 'dpnet' else '_' + o}" in f]
        label = {"dpnet": "DP-Net's evidence", "random": "random cells", "cam": "CAM of the global linear baseline"}

        def key(kind, o):
            return f"{kind}_auc" + ("" if o == "dpnet" else f"_{o}")

        rows = [{"label": label[o], "deletion": f[key("deletion", o)], "deletion_ci": f.get(key("deletion", o) + "_ci95"),
                 "insertion": f[key("insertion", o)], "insertion_ci": f.get(key("insertion", o) + "_ci95")}
                for o in orders]
        minus_cam = None
        if "cam" in orders:
            minus_cam = {"deletion": f["deletion_auc"] - f["deletion_auc_cam"],
                         "deletion_ci": f.get("deletion_auc_minus_cam_ci95"),
                         "insertion": f["insertion_auc"] - f["insertion_auc_cam"],
                         "insertion_ci": f.get("insertion_auc_minus_cam_ci95")}
        x = np.linspace(0, 1, f["pixel_steps"] + 1)
        plots = []
        for kind in ("deletion", "insertion"):
            name = f"img/{kind}-pixels.png"
            draw.line_plot(self.out / name, {label[o]: (x, self.an.deletion[f"{kind}_{o}"]) for o in orders},
                           f"share of grid cells {'blanked' if kind == 'deletion' else 'revealed'}",
                           "mean class probability", f"{kind} in pixel space")
            plots.append(name)
        return {"images": f["pixel_images"], "steps": f["pixel_steps"], "rows": rows, "minus_cam": minus_cam,
                "plots": plots, "full_images": PIXEL_MEASURES["full"][0], "full_steps": PIXEL_MEASURES["full"][1]}

    def localisation(self) -> dict[str, Any]:
        n = self.an.numbers
        rows = [{"title": title, "value": n[group][key], "ci": n[group].get(key + "_ci95"), "better": better,
                 "anchor": anchor, "protocol": text, "digits": 2 if not n[group].get(key + "_ci95") else 1}
                for group, key, title, better, anchor, text in MEASURES if key in n.get(group, {})]
        loc = n["localisation"]
        synth = ([loc["top_part_on_defining_part"], loc["chance_region_on_defining_part"]]
                 if "top_part_on_defining_part" in loc else None)
        return {"rows": rows, "synth": synth, "cropped": self.crop_index is not None}

    @functools.cached_property
    def part_classes(self) -> np.ndarray:
        """(P,) each part's class, the model's (DPNetModule.part_classes)."""
        return model_part_classes(self.an.est)

    def part_label(self, p: int, limit: int = 18) -> str:
        """"part p (of <owner>)" where ownership holds (see dpnet.analyze.ownership), else "part p (not owned)"."""
        if self.owned[p]:
            return f"part {p} (of {cut(self.classes[self.part_classes[p]], limit)})"
        return f"part {p} (not owned)"

    def class_view(self) -> list[dict[str, Any]]:
        d, f = self.an.stats.d, self.an.stats.f
        out = []
        for c, name in enumerate(self.classes):
            parts = np.argsort(-d[c], kind="stable")[:3]
            out.append({"name": name, "parts": [
                {"picture": self.pic(self.part_picture(int(p)), f"class{c}", f"part {p}"), "label": self.part_label(int(p)),
                 "d": float(d[c, p]), "f": int(f[p]), "trust": self.trust(int(p))} for p in parts]})
        return out

    def image_view(self) -> list[dict[str, Any]]:
        return [self._one_image(t) for t in self.an.shown]

    def _one_image(self, t: TestImage) -> dict[str, Any]:
        img = self.image(t.image_id)
        expl = self.an.explainer
        heat = expl.heatmaps(t.scores[None], t.boxes[None], self.grid, np.array([t.pred]))[0]
        amap = expl.assignment_maps(t.scores[None], t.boxes[None], self.grid, np.array([t.pred]))[0]
        own = np.flatnonzero(self.part_classes == t.pred)
        return {"image_id": t.image_id, "true": self.classes[t.label], "pred": self.classes[t.pred],
                "ok": t.pred == t.label,
                "pictures": [self.pic(img, "orig", "image", 160), self.pic(draw.overlay_heatmap(img, heat), "heat", "heatmap", 160),
                             self.pic(draw.overlay_assignment(img, amap, own), "assign", "part assignment", 160)],
                "evidence": self._evidence(t)}

    def _evidence(self, t: TestImage, top: int = EVIDENCE_ROWS) -> dict[str, Any]:
        """The parts that carry the decision: each part's share of the margin over the runner-up."""
        ev = self.an.explainer.margin_evidence(t.scores)
        rows = []
        for i in range(min(top, len(ev.parts))):
            part = int(ev.parts[i])
            rows.append({"label": self.part_label(part, 24), "trust": self.trust(part),
                         "here": self.pic(self.here_picture(t, part), "here", "this image"),
                         "proto": self.pic(self.part_picture(part, 96), "proto", "its best training image"),
                         "b": float(ev.b[i]), "dv": float(ev.dv[i]), "margin": float(ev.margin[i])})
        shown, hidden, _ = (100 * float(x[0]) for x in margin_shares(ev.margin[None], top))
        return {"pred": self.classes[ev.pred], "runner": self.classes[ev.runner], "total": ev.total, "rows": rows,
                "shown": shown, "hidden": hidden, "rest_parts": max(len(ev.parts) - top, 0),
                "rest": float(ev.margin[top:].sum())}

    def gallery(self) -> list[dict[str, Any]]:
        st = self.an.stats
        return [{"label": self.part_label(p, 24),
                 "crops": [self.pic(self.part_crop(p, r, 72), f"part{p}", f"score {st.top_score[p, r]:.2f}")
                           for r in range(min(self.k, st.top_image.shape[1]))]}
                for p in range(st.top_image.shape[0])]
