"""The analysis stage: part statistics, explainers, faithfulness, localisation, report and explain."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dpnet.analyze.explain import DPNetExplainer, deletion_scores, named_regions
from dpnet.errors import DatasetLayoutError
from dpnet.analyze.localize import defining_part_hits, landmark_error, part_consistency, pointing_game
from dpnet.analyze.stats import merge_topk, part_stats
from dpnet.train.class_parts import class_part_weights
from dpnet.extract.pipeline import run_extraction
from tests.helpers import copy_of_base, tiny_config
from dpnet.train.config import TrainConfig
from dpnet.train.run import train_run


# ----------------------------------------------------------------------------- pure functions
def test_class_part_weights_on_a_hand_made_example():
    # 2 classes, q = 1, 3 parts. Mean contributions: class 0 -> [2, 1, 0], class 1 -> [0, 3, 1]
    v = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    class_sum = np.array([[4.0, 2.0, 5.0], [7.0, 6.0, 2.0]])
    count = np.array([2, 2])
    d, f = class_part_weights(v, class_sum, count, parts_per_class=1)
    # top-1 part per class: class 0 -> part 0 (2 > 1), class 1 -> part 1 (3 > 1); f = [1, 1, 0]
    assert f.tolist() == [1, 1, 0]
    want = v * class_sum / np.log(2.0)  # f = 0 counts as 1, f = 1 -> log(2)
    np.testing.assert_allclose(d, want)
    d2, f2 = class_part_weights(v, class_sum, count, parts_per_class=2)
    # top-2: class 0 -> parts 0, 1; class 1 -> parts 1, 2: part 1 shared (f = 2), weighted down by log 3
    assert f2.tolist() == [1, 2, 1]
    np.testing.assert_allclose(d2[:, 1], v[:, 1] * class_sum[:, 1] / np.log(3.0))


def test_streaming_topk_equals_global_topk():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(5, 40))
    best = np.full((5, 0), -np.inf)
    ids = np.zeros((5, 0), int)
    for a in range(0, 40, 7):  # chunks of images, as shards arrive
        best, pick = merge_topk(best, full[:, a:a + 7], 4)
        ids = np.take_along_axis(np.concatenate([ids, np.broadcast_to(np.arange(a, min(a + 7, 40)), (5, min(7, 40 - a)))], 1), pick, 1)
    want = np.argsort(-full, 1)[:, :4]
    assert np.array_equal(ids, want)
    np.testing.assert_allclose(best, np.take_along_axis(full, want, 1))


def test_pointing_game_and_consistency_by_hand():
    heat = np.zeros((2, 4, 4))
    heat[0, 0, 0] = 1  # peak in the top-left cell: centre (12.5, 12.5) px of a 100 px image
    heat[1, 3, 3] = 1  # bottom-right: (87.5, 87.5)
    sizes = np.array([[100, 100], [100, 100]])
    boxes = np.array([[0, 0, 30, 30], [0, 0, 30, 30]], float)  # x, y, w, h
    assert pointing_game(heat, (4, 4), sizes, boxes) == 50.0
    # 1 class, q = 2; part 0's best region always holds keypoint 0, part 1's only once in 2
    best = np.array([[[0, 0, 10, 10], [50, 50, 60, 60]], [[0, 0, 10, 10], [0, 0, 10, 10]]], float)
    kp = np.array([[[5, 5, 1], [55, 55, 1]], [[5, 5, 1], [90, 90, 1]]], float)
    share, rate = part_consistency(best, kp, np.array([0, 0]), classes=np.array([0, 0]))
    assert rate.tolist() == [1.0, 0.5] and share == 50.0


def test_landmark_error_is_zero_for_an_exact_linear_relation():
    rng = np.random.default_rng(0)
    n, p = 60, 3
    box = np.tile([10.0, 20.0, 100.0, 50.0], (n, 1))
    parts = rng.uniform(0, 1, (n, p, 2)) * box[:, None, 2:] + box[:, None, :2]
    kp = np.concatenate([parts[:, :1] * 1.0, np.ones((n, 1, 1))], -1)  # keypoint = part 0's centre
    err = landmark_error(parts[:40], kp[:40], box[:40], parts[40:], kp[40:], box[40:], alpha=1e-8)
    assert err < 1e-3
    shifted = kp.copy()
    shifted[40:, :, 0] += 10.0  # test keypoints moved by 0.1 box widths -> error 10
    assert landmark_error(parts[:40], kp[:40], box[:40], parts[40:], shifted[40:], box[40:], alpha=1e-8) == pytest.approx(10.0, rel=1e-3)


def test_defining_part_hits_against_a_loop():
    rng = np.random.default_rng(1)
    n, m = 20, 7
    kp = np.concatenate([rng.uniform(0, 100, (n, 3, 2)), rng.integers(0, 2, (n, 3, 1))], -1)
    xy = rng.uniform(0, 80, (n, m, 2))
    boxes = np.concatenate([xy, xy + 20], -1)
    hit, chance = defining_part_hits(boxes[:, 0], boxes, kp, [0, 2])

    def covers(b, i):
        return any(kp[i, k, 2] > 0 and b[0] <= kp[i, k, 0] < b[2] and b[1] <= kp[i, k, 1] < b[3] for k in (0, 2))

    assert hit == pytest.approx(100 * np.mean([covers(boxes[i, 0], i) for i in range(n)]))
    assert chance == pytest.approx(100 * np.mean([np.mean([covers(boxes[i, j], i) for j in range(m)]) for i in range(n)]))


# ------------------------------------------------------------------------- on a trained tiny run
@pytest.fixture(scope="module")
def tiny_run(base, tmp_path_factory) -> Path:
    """This module's own copy of the session's tiny run (tests.helpers.tiny_run's settings)."""
    return copy_of_base(base, tmp_path_factory.mktemp("an")).run


def _test_arrays(run: Path):
    from dpnet.analyze.analysis import load_run

    est, cache, _ = load_run(run)
    parts = [a for _, a in cache.iter_shards("test", ("regions", "boxes", "labels", "image_ids"))]
    return est, cache, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_evidence_and_contributions_sum_to_the_logit(tiny_run):
    est, _, a = _test_arrays(tiny_run)
    expl = DPNetExplainer(est)
    scores = expl.scores(a["regions"])  # (N, R, P)
    logits = est.decision_function(a["regions"])
    b, _ = expl.pool(scores)
    np.testing.assert_allclose(expl.contributions(b).sum(-1), logits, rtol=1e-4, atol=1e-5)
    for i in range(len(scores)):
        for c in range(logits.shape[1]):
            ev = expl.evidence(scores[i], c)
            assert ev.points.sum() == pytest.approx(logits[i, c], rel=1e-4, abs=1e-5)
            assert np.all(np.diff(ev.points) <= 0)
            np.testing.assert_allclose(ev.points, ev.b * ev.v, rtol=1e-6)


def test_explainer_maps_have_documented_shapes(tiny_run):
    est, cache, a = _test_arrays(tiny_run)
    expl = DPNetExplainer(est)
    scores, grid = expl.scores(a["regions"]), tuple(cache.manifest["grid"])
    heat = expl.heatmaps(scores, a["boxes"], grid, a["labels"])
    amap = expl.assignment_maps(scores, a["boxes"], grid, a["labels"])
    n = len(scores)
    assert heat.shape == (n,) + grid and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
    assert amap.shape == (n,) + grid
    for i in range(n):
        own = set(range(a["labels"][i] * 2, a["labels"][i] * 2 + 2)) | {-1}
        assert set(np.unique(amap[i]).tolist()) <= own
        _, where = expl.pool(scores[i:i + 1])
        for p in own - {-1}:  # each part's best box is claimed, at least in part, unless another part beat it
            x0, y0, x1, y1 = a["boxes"][i, where[0, p]]
            assert (amap[i, y0:y1, x0:x1] >= 0).all()


def test_deletion_starts_at_the_logit_and_removes_named_regions(tiny_run):
    est, _, a = _test_arrays(tiny_run)
    expl = DPNetExplainer(est)
    scores = expl.scores(a["regions"])
    pred = est.predict(a["regions"])
    named, rand = deletion_scores(expl, scores, pred, steps=3)
    logits = est.decision_function(a["regions"])
    np.testing.assert_allclose(named[:, 0], logits[np.arange(len(pred)), pred], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rand[:, 0], named[:, 0])
    # slow reference for image 0, k = 2: drop the named regions by hand, recompute b and the logit
    drop = named_regions(expl, scores[0], int(pred[0]), 2)
    keep = np.setdiff1d(np.arange(scores.shape[1]), drop)
    raw = scores[0][keep].max(0)
    b = raw / np.linalg.norm(raw) if est.module_.similarity == "dot" else raw  # the cosine bag is not renormalised
    assert named[0, 2] == pytest.approx(float(b @ expl.v[pred[0]]), rel=1e-5)


def test_part_stats_topk_matches_brute_force(tiny_run):
    est, cache, _ = _test_arrays(tiny_run)
    st = part_stats(est, cache, k=3)
    parts = [a for _, a in cache.iter_shards("train", ("regions", "image_ids"))]
    regions, ids = np.concatenate([p["regions"] for p in parts]), np.concatenate([p["image_ids"] for p in parts])
    s = DPNetExplainer(est).scores(regions)  # (N, R, P)
    best = s.max(1)  # (N, P)
    for p in range(s.shape[2]):
        order = np.argsort(-best[:, p], kind="stable")[:3]
        np.testing.assert_allclose(st.top_score[p], best[order, p], rtol=1e-5)
        assert set(st.top_image[p].tolist()) == set(ids[order].tolist())
        for img, r in zip(st.top_image[p], st.top_region[p]):
            assert s[ids.tolist().index(img), r, p] == pytest.approx(best[ids.tolist().index(img), p], rel=1e-6)



def test_the_reports_training_pass_gives_the_part_stats_and_pictures_of_their_best_images(tiny_run):
    """The report pools the training regions once: its statistics equal part_stats', and each part's
    picture is of its best training image, with that image's activation map and peak."""
    from dpnet.analyze.analysis import _train_pass
    from dpnet.analyze.localize import activation_map

    est, cache, _ = _test_arrays(tiny_run)
    want = part_stats(est, cache, k=3)
    index = cache.dataset_index()
    got = _train_pass(DPNetExplainer(est), cache, index, dict(index.bboxes), 3, False)
    for field in ("top_score", "top_image", "top_region", "class_sum", "class_count", "d", "f"):
        np.testing.assert_allclose(getattr(got["stats"], field), getattr(want, field), rtol=1e-5, err_msg=field)
    pics = got["pictures"]
    assert np.array_equal(pics.image_id, want.top_image[:, 0])
    parts = [a for _, a in cache.iter_shards("train", ("regions", "boxes", "image_ids"))]
    ids = np.concatenate([p["image_ids"] for p in parts]).tolist()
    p = 1
    row = ids.index(int(pics.image_id[p]))
    regions, boxes = (np.concatenate([q[f] for q in parts])[row] for f in ("regions", "boxes"))
    s = DPNetExplainer(est).scores(regions[None])[0, :, p]
    np.testing.assert_allclose(pics.maps[p], activation_map(s, boxes, tuple(cache.manifest["grid"])), rtol=1e-5)


# ------------------------------------------------------------------------------ report, browser
def test_report_builds_and_every_image_exists(tiny_run):
    from dpnet.analyze.report import build_report

    page = build_report(tiny_run, k=3, n_show=4)
    text = page.read_text()
    srcs = re.findall(r"src='([^']+)'", text)
    assert srcs and all((page.parent / s).is_file() for s in srcs)
    numbers = json.loads((page.parent / "analysis.json").read_text())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert numbers["test_top1_recomputed"] == pytest.approx(metrics["dpnet"]["top1"])
    loc, own, faith = numbers["localisation"], numbers["ownership"], numbers["faithfulness"]
    for key in ("pointing_game", "consistency_evalprotopnet", "consistency_region_box", "stability_evalprotopnet",
                "on_object_share", "on_part_share", "landmark_error_x100", "top_part_on_defining_part"):
        assert 0 <= loc[key] <= 100, key
    assert 0 <= loc["purity"] <= 1
    assert 0 <= own["own_top3_share"] <= 100 and 0 <= own["own_evidence_share"] <= 100
    ex = numbers["explanation"]
    assert 0 < ex["margin_shown_share"] and 1 <= ex["parts_for_90pct"] <= numbers["parts"]["P"]
    assert "of it</p>" in text and "sum = margin" in text
    assert set(faith) >= {"k1", "k3", "k5", "images", "deletion_auc", "deletion_auc_random", "insertion_auc",
                          "insertion_auc_random"}
    assert all(0 <= faith[k] <= 1 for k in faith if k.endswith(("auc", "random")))
    assert all(np.isfinite(faith[f"k{k}"]["ratio"]) for k in (1, 3, 5))  # never "infinity"
    for section in ("Accuracy", "Faithfulness", "localisation and ownership", "Classes", "Test images explained",
                    "Part gallery", "How each is measured", "EvalProtoPNet", "PIP-Net", "RISE"):
        assert section in text, section
    # each part is drawn ProtoPNet's way, with its consistency and keypoint; a consistent one is marked
    p_all = numbers["parts"]["P"]
    assert len(loc["part_hit_rate"]) == p_all and len(loc["part_keypoint"]) == p_all
    rates = np.array(loc["part_hit_rate"])
    assert loc["consistency_evalprotopnet"] == pytest.approx(100 * (rates >= 0.8).mean())
    assert re.search(r"\d+% on " + re.escape(loc["keypoints"][loc["part_keypoint"][0]]), text) or rates[0] == 0
    assert ("title='passes the 80% rule'" in text) == any(rates >= 0.8)
    pictures = [s for s in srcs if "/class" in s]
    assert pictures
    from PIL import Image

    yellow = np.asarray(Image.open(page.parent / pictures[0]).convert("RGB")).astype(int)
    assert ((yellow[..., 0] > 200) & (yellow[..., 1] > 200) & (yellow[..., 2] < 90)).any()  # the peak box


CHROMIUM_INSTALL = "sudo apt-get install -y chromium  (make setup does this where apt-get is available)"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_a_headless_browser(tiny_run, tmp_path):
    from PIL import Image

    from dpnet.analyze.report import build_report

    browser = _chromium()
    if browser is None:
        pytest.skip(f"no chromium to render the report in; install it with: {CHROMIUM_INSTALL}")
    page = build_report(tiny_run, k=3, n_show=4)
    shot = tmp_path / "shot.png"
    html = tmp_path / "probe.html"
    # The probe page loads the report in an iframe-free way: same page, plus a script that
    # writes how many <img> failed to load into the title, which --dump-dom shows.
    text = page.read_text().replace("</body>", "<script>window.onload=()=>{const bad=[...document.images]"
                                               ".filter(i=>!i.complete||i.naturalWidth===0).length;"
                                               "document.body.setAttribute('data-broken',bad)}</script></body>")
    html.write_text(text.replace("src='img/", f"src='{page.parent.as_uri()}/img/").replace('src="img/', f'src="{page.parent.as_uri()}/img/'))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    subprocess.run([browser, *flags, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180)
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    assert shot.is_file(), "no screenshot was written"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "the screenshot is blank"
    found = re.search(r'data-broken="(\d+)"', dom)
    assert found, "the page's script did not run"
    assert found.group(1) == "0", f"{found.group(1)} broken images"


# ------------------------------------------------------------------------------------- explain
def test_explain_gives_the_runs_prediction_for_a_dataset_image(tiny_run, tmp_path):
    from dpnet.analyze.single import explain_image

    est, cache, a = _test_arrays(tiny_run)
    table = {r["image_id"]: r["path"] for r in cache.image_table()}
    root = Path(cache.manifest["dataset_root"]) / "images"
    pred = est.predict(a["regions"])
    for i in range(3):
        res = explain_image(root / table[int(a["image_ids"][i])], tiny_run, tmp_path / f"e{i}")
        assert res.pred == pred[i]
        assert res.page.is_file() and (res.page.parent / "heatmap.png").is_file()
        assert "where (activation, peak box)" in res.page.read_text()
        np.testing.assert_allclose(res.logits, est.decision_function(a["regions"][i:i + 1])[0], rtol=1e-4, atol=1e-5)


def test_explain_cli_errors_name_the_fix(tiny_run, tmp_path, capsys):
    from dpnet.analyze.cli import main

    assert main(["explain", str(tmp_path / "missing.jpg"), "--run", str(tiny_run)]) == 2
    assert "IMG=" in capsys.readouterr().err
    assert main(["report", "--run", str(tmp_path / "nothing")]) == 2
    assert "make train" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ dask path
@pytest.fixture
def own_environ():
    """Put os.environ back as it was: distributed's LocalCluster sets OMP_NUM_THREADS=1 and
    MALLOC_TRIM_THRESHOLD_ in our own environment, which every later child would inherit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_dask_part_stats_equal_the_in_process_pass(tiny_run, scheduler, own_environ):
    from dpnet.analyze.analysis import load_run
    from dpnet.analyze.dask_stats import part_stats_dask

    est, cache, _ = load_run(tiny_run)
    ref = part_stats(est, cache, k=3)
    if scheduler == "threads":
        got = part_stats_dask(est, cache, k=3, images_per_block=5)
    else:
        distributed = pytest.importorskip("distributed")
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
                distributed.Client(lc):
            got = part_stats_dask(est, cache, k=3, images_per_block=5)
    np.testing.assert_allclose(got.top_score, ref.top_score, rtol=1e-5, atol=1e-6)
    assert np.array_equal(got.top_image, ref.top_image) and np.array_equal(got.top_region, ref.top_region)
    np.testing.assert_allclose(got.class_sum, ref.class_sum, rtol=1e-5)
    np.testing.assert_allclose(got.d, ref.d, rtol=1e-5)
    assert np.array_equal(got.f, ref.f) and np.array_equal(got.class_count, ref.class_count)


def test_report_and_explain_on_a_cropped_cache(tmp_path):
    """CROP=1: the report maps regions into the crops and explain reproduces the cached prediction."""
    from dpnet.analyze.report import build_report
    from dpnet.analyze.single import explain_image

    cfg = tiny_config(tmp_path, image_size=96, regions=16, crop=True, synth={"n_classes": 3, "per_class": 8, "image_size": 96})
    cache = run_extraction(cfg).cache_dir
    run = tmp_path / "run"
    train_run(TrainConfig.from_options(cache=str(cache), run_dir=str(run), parts_per_class=2, epochs=2, inner_epochs=1, lr=1e-2,
                          batch_size=4, val_fraction=0.0, baselines=False, progress=False))
    page = build_report(run, k=2, n_show=2)
    assert all((page.parent / s).is_file() for s in re.findall(r"src='([^']+)'", page.read_text()))
    numbers = json.loads((page.parent / "analysis.json").read_text())
    # inside the object box's crop every point is on the object: those two would read 100 by construction
    assert "pointing_game" not in numbers["localisation"] and "on_object_share" not in numbers["localisation"]
    assert "cropped to the object box" in page.read_text()
    assert 0 <= numbers["localisation"]["on_part_share"] <= 100  # the keypoints can still be missed
    est, c, a = _test_arrays(run)
    table = {r["image_id"]: r["path"] for r in c.image_table()}
    image = Path(c.manifest["dataset_root"]) / "images" / table[int(a["image_ids"][0])]
    res = explain_image(image, run, tmp_path / "e")
    np.testing.assert_allclose(res.logits, est.decision_function(a["regions"][:1])[0], rtol=1e-4, atol=1e-5)
    # the crop box of a dataset image cannot be read: a clear error naming the file, not a silent uncropped
    # description (boxes file gone) nor an AttributeError (dataset unreadable); nothing written
    boxes = Path(c.manifest["dataset_root"]) / "bounding_boxes.txt"
    text = boxes.read_text()
    boxes.unlink()
    with pytest.raises(DatasetLayoutError, match="bounding_boxes.txt"):
        explain_image(image, run, tmp_path / "e2")
    boxes.write_text(text)
    labels = Path(c.manifest["dataset_root"]) / "image_class_labels.txt"
    labels.write_text("not a table\n")
    with pytest.raises(DatasetLayoutError, match="crop"):
        explain_image(image, run, tmp_path / "e3")
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


def test_explain_does_not_depend_on_whether_a_report_was_built(tmp_path):
    """The heatmap uses the class's top parts by d(p, c), saved with the model: the same before and after a report."""
    from dpnet.analyze.report import build_report
    from dpnet.analyze.single import explain_image
    from tests.helpers import tiny_run

    run = tiny_run(tmp_path)
    est, cache, a = _test_arrays(run)
    image = Path(cache.manifest["dataset_root"]) / "images" / {r["image_id"]: r["path"] for r in cache.image_table()}[
        int(a["image_ids"][0])]
    before = explain_image(image, run, tmp_path / "before")
    build_report(run, k=2, n_show=2)
    after = explain_image(image, run, tmp_path / "after")
    np.testing.assert_array_equal(before.heatmap, after.heatmap)
    d = est.class_parts_
    assert d is not None and d.shape == (3, 6)
    top = np.argsort(-d[before.pred], kind="stable")[:3]
    assert len(top) == 3 and DPNetExplainer(est).class_parts(before.pred, 3).tolist() == top.tolist()


@pytest.mark.slow
def test_the_dpnet_command_runs_every_stage(tmp_path):
    """``dpnet extract|train|report|explain`` (the console script pip installs, or python -m dpnet)."""
    import sys

    from tests.helpers import python

    script = Path(sys.executable).with_name("dpnet")
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "dpnet"]
    out = subprocess.run(base + ["train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--q" in out.stdout and "--preset" in out.stdout
    common = ["--cache-root", str(tmp_path / "cache"), "--runs-root", str(tmp_path / "runs")]
    steps = [["extract", "--dataset", "synth", "--data-dir", str(tmp_path / "raw"), "--weights", "random",
              "--regions", "8", "--image-size", "64", "--out-root", str(tmp_path / "cache"), "--synth-classes", "2",
              "--synth-per-class", "4", "--synth-image-size", "64", "--no-progress"],
             ["train", *common, "--q", "1", "--epochs", "1", "--inner-epochs", "1", "--val-fraction", "0",
              "--no-baselines", "--no-progress"],
             ["report", *common, "--top-k", "2", "--images", "2", "--no-progress"]]
    for step in steps:
        done = subprocess.run(base + step, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    run = next((tmp_path / "runs").iterdir())
    assert (run / "report" / "index.html").is_file()
    image = next((tmp_path / "raw" / "images").rglob("*.jpg"))
    done = subprocess.run(base + ["explain", str(image), "--run", str(run)], capture_output=True, text=True)
    assert done.returncode == 0 and "predicted:" in done.stdout, done.stderr
    bad = subprocess.run(base + ["nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    assert python("import dpnet").returncode == 0


def test_the_pages_are_templates_that_escape_every_value():
    """report.html and explain.html (jinja2, autoescape): a hostile name is shown as text; a value the
    code forgot to pass is an error, not an empty cell."""
    import jinja2

    from dpnet.analyze.pages import templates

    env = templates()
    hostile = "<svg onload=alert(1)>"
    page = env.get_template("explain.html").render(name=hostile, file=hostile + ".jpg", n_parts=3, logit=1.0,
                                                  rows=[{"part": 1, "src": "part1.png", "b": 0.5, "v": 1.0, "points": 0.5}])
    assert "<svg" not in page and "&lt;svg onload=alert(1)&gt;" in page
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("explain.html").render(name="x", file="x.jpg", n_parts=3, rows=[])
