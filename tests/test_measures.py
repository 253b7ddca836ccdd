"""The interpretability measures of issue 12 against slow loop references written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpnet.extract.cache import RegionCache

from dpnet.analyze.localize import (keypoint_hits, on_object_share, part_consistency, part_purity, part_stability,
                              peak_boxes)
from dpnet.analyze.ownership import own_evidence_share, own_top3_share, owned_parts
from dpnet.analyze.localize import best_regions
from dpnet.analyze.pixels import auc, cam_map, cell_order, evidence_map, step_masks


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _keypoints(rng, n, k, size=100.0):
    return np.concatenate([rng.uniform(0, size, (n, k, 2)), rng.integers(0, 2, (n, k, 1))], -1)


# ------------------------------------------------------------------------------- localisation
def test_evalprotopnet_consistency_against_their_loop(rng):
    """Per part, per image of its class: the keypoints in a box of 0.32 x the frame around the peak;
    consistent when some keypoint is in >= 80% of the images where it is visible."""
    n, q, c, k = 30, 2, 3, 5
    labels = np.arange(n) % c
    centres = rng.uniform(0, 100, (n, q * c, 2))
    centres[labels == 0, 0] = [20.0, 20.0]  # part 0 always at the same spot
    kp = _keypoints(rng, n, k)
    kp[:, 0, :] = [25.0, 22.0, 1.0]  # keypoint 0 always there: part 0 is consistent
    frames = np.tile([[100.0, 80.0]], (n, 1))
    got, rate = part_consistency(peak_boxes(centres, frames), kp, labels, np.arange(q * c) // q)
    consistent = []
    for p in range(q * c):
        imgs = np.flatnonzero(labels == p // q)
        hits, vis = np.zeros(k), np.zeros(k)
        for i in imgs:
            half_w, half_h = 0.16 * frames[i, 0], 0.16 * frames[i, 1]
            x, y = centres[i, p]
            for j in range(k):
                if kp[i, j, 2] > 0:
                    vis[j] += 1
                    if x - half_w <= kp[i, j, 0] < x + half_w and y - half_h <= kp[i, j, 1] < y + half_h:
                        hits[j] += 1
        consistent.append(bool(((hits / np.maximum(vis, 1)) >= 0.8).any()))
    assert got == pytest.approx(100 * np.mean(consistent)) and consistent[0] and rate[0] == 1.0


def test_stability_counts_parts_whose_keypoints_do_not_move(rng):
    n, q, c, k = 12, 2, 3, 4
    labels = np.arange(n) % c
    hits = rng.random((n, q, k)) < 0.3
    noisy = hits.copy()
    noisy[0, 1, 2] = ~noisy[0, 1, 2]  # image 0 (class 0): its part 1 changed
    own = np.zeros((n, q * c, k), bool)
    own_noisy = np.zeros_like(own)
    for i in range(n):  # the function takes all parts: place each image's class parts
        own[i, labels[i] * q:(labels[i] + 1) * q] = hits[i]
        own_noisy[i, labels[i] * q:(labels[i] + 1) * q] = noisy[i]
    want = []
    for p in range(q * c):
        imgs = np.flatnonzero(labels == p // q)
        want.append(np.mean([(own[i, p] == own_noisy[i, p]).all() for i in imgs]))
    classes = np.arange(q * c) // q
    assert part_stability(own, own_noisy, labels, classes) == pytest.approx(100 * np.mean(want))
    assert part_stability(own, own.copy(), labels, classes) == 100.0


def test_purity_is_the_share_of_the_most_common_keypoint(rng):
    hits = rng.random((5, 10, 6)) < 0.25
    want = np.mean([max(hits[p, :, j].sum() for j in range(6)) / 10 for p in range(5)])
    assert part_purity(hits) == pytest.approx(want)
    pure = np.zeros((2, 10, 6), bool)
    pure[:, :, 3] = True
    assert part_purity(pure) == 1.0


def test_keypoint_hits_only_count_visible_keypoints():
    boxes = np.array([[[0.0, 0.0, 10.0, 10.0]]])
    kp = np.array([[[5.0, 5.0, 1.0], [5.0, 5.0, 0.0], [15.0, 5.0, 1.0]]])
    assert keypoint_hits(boxes, kp).tolist() == [[[True, False, False]]]


def test_on_object_share_against_a_loop(rng):
    centres = rng.uniform(0, 100, (7, 5, 2))
    obj = np.column_stack([rng.uniform(0, 50, (7, 2)), rng.uniform(10, 50, (7, 2))])
    inside = [obj[i, 0] <= x < obj[i, 0] + obj[i, 2] and obj[i, 1] <= y < obj[i, 1] + obj[i, 3]
              for i in range(7) for x, y in centres[i]]
    assert on_object_share(centres, obj) == pytest.approx(100 * np.mean(inside))


# --------------------------------------------------------------------------------- ownership
def test_ownership_measures_against_loops(rng):
    c, q = 4, 3
    d = rng.normal(size=(c, c * q))
    d[0, :3] += 10  # class 0 ranks its own parts first
    want = np.mean([all(p // q == cl for p in np.argsort(-d[cl], kind="stable")[:3]) for cl in range(c)])
    assert own_top3_share(d, q) == pytest.approx(100 * want) and want >= 0.25
    contrib = rng.normal(size=(6, c * q))
    cls = rng.integers(0, c, 6)
    shares = []
    for i in range(6):
        pos = [max(v, 0) for v in contrib[i]]
        if sum(pos):
            shares.append(sum(pos[p] for p in range(c * q) if p // q == cls[i]) / sum(pos))
    assert own_evidence_share(contrib, cls, q) == pytest.approx(100 * np.mean(shares))
    held = owned_parts(d, q)
    for p in range(c * q):
        assert held[p] == (int(np.argmax(d[:, p])) == p // q and d[p // q, p] > 0)


# ------------------------------------------------------------------------- pixel-space pieces
def test_evidence_map_spreads_each_parts_points_over_its_best_regions():
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 2], [0, 0, 3, 3], [2, 2, 3, 3]])
    top = np.array([[0, 1, 2], [3, 2, 0]])  # (k = 2, P = 3): each part's two best regions
    points = np.array([4.0, 2.0, -5.0])  # the negative part is not evidence
    m = evidence_map(boxes, top, points, (3, 3))
    want = np.zeros((3, 3))
    want[0:2, 0:2] += 2.0 / 4  # part 0: half its 4 points over region 0's 4 cells
    want[2:3, 2:3] += 2.0  # and half over region 3's one cell
    want[1:2, 1:3] += 1.0 / 2  # part 1: half its 2 points over region 1's 2 cells
    want[0:3, 0:3] += 1.0 / 9  # and half over region 2's 9 cells
    np.testing.assert_allclose(m, want)
    assert m.sum() == pytest.approx(6.0)


def test_cell_order_and_step_masks(rng):
    sal = np.array([[0.0, 3.0], [1.0, 0.0]])
    order = cell_order(sal, rng)
    assert order[:2].tolist() == [1, 2] and set(order[2:].tolist()) == {0, 3}
    dele = step_masks(order, 4, (2, 2), 4, insert=False)  # 2x2 grid cells of 2x2 pixels
    ins = step_masks(order, 4, (2, 2), 4, insert=True)
    assert dele.shape == (5, 1, 4, 4)
    assert [float(m.mean()) for m in dele] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [float(m.mean()) for m in ins] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert dele[1, 0, 0, 2:].sum() == 0 and dele[1].sum() == 12  # cell 1 (top right) goes first


def test_auc_is_the_trapezoid_area():
    curves = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    assert auc(curves) == pytest.approx(((1.0 + 0.75) / 2 + (0.75 + 0.5) / 2) / 2)


def test_cam_averages_to_the_linear_baselines_logit(rng):
    d, h, w, c = 5, 3, 4, 2
    fmap = torch.from_numpy(rng.normal(size=(d, h, w))).float()
    lin = {"weight": torch.randn(c, d), "bias": torch.randn(c), "mean": torch.randn(d), "std": torch.rand(d) + 0.5}
    for cls in range(c):
        cam = cam_map(fmap, lin, cls)
        direct = sum(float(lin["weight"][cls, k] / lin["std"][k]) * fmap[k].numpy() for k in range(d))
        np.testing.assert_allclose(cam, direct, rtol=1e-5, atol=1e-5)
        g = fmap.mean((1, 2))  # the global descriptor the baseline saw
        logit = float(((g - lin["mean"]) / lin["std"]) @ lin["weight"][cls] + lin["bias"][cls])
        shift = float(-(lin["mean"] / lin["std"]) @ lin["weight"][cls] + lin["bias"][cls])
        assert cam.mean() + shift == pytest.approx(logit, rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------ backbone in the loop, for real
@pytest.fixture(scope="module")
def run_with_baselines(tmp_path_factory):
    from tests.helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("px"), baselines=True)


@torch.no_grad()
def test_a_deletion_step_is_the_image_blanked_and_described_again(run_with_baselines):
    """Slow reference for one step: blank the named cells by hand, run the backbone and the model."""
    from dpnet.analyze.analysis import load_run
    from dpnet.analyze.pixels import PixelProbe, deletion_curves, sample_test_images
    from dpnet.train.baselines import LINEAR_KIND
    from dpnet.train.serialize import load_file

    est, cache, _ = load_run(run_with_baselines)
    sample = sample_test_images(cache, 3, seed=0)
    probe = PixelProbe(est, cache, runtime="eager")
    linear = load_file(run_with_baselines / "global_linear.pt", (LINEAR_KIND,))[2]
    curves = deletion_curves(probe, sample, linear, steps=4, seed=0)
    assert set(curves) == {f"{k}_{o}" for k in ("deletion", "insertion") for o in ("dpnet", "random", "cam")}
    x, _ = probe.normalised(sample, np.array([0]))
    s, _ = probe.scores(x, sample.boxes[:1])
    pooled = est.module_.pool(s)
    cls = int(est.module_.logits(pooled.b).argmax())
    p0 = float(est.module_.logits(pooled.b).softmax(1)[0, cls])
    for kind in ("deletion", "insertion"):
        for o in ("dpnet", "random", "cam"):
            c = curves[f"{kind}_{o}"][0]
            assert c[0 if kind == "deletion" else -1] == pytest.approx(p0, rel=1e-5)  # the intact image
    sb, _ = probe.scores(torch.zeros_like(x), sample.boxes[:1])  # the blank image, described in image 0's boxes
    pb = float(est.module_.logits(est.module_.pool(sb).b).softmax(1)[0, cls])
    for kind in ("deletion", "insertion"):
        for o in ("dpnet", "random", "cam"):
            assert curves[f"{kind}_{o}"][0][-1 if kind == "deletion" else 0] == pytest.approx(pb, rel=1e-4)
    # step 1 of DP-Net's deletion, by hand: blank the most evident quarter of the cells
    points = (pooled.b[0] * est.module_.classifier[cls]).numpy()
    sal = evidence_map(sample.boxes[0], best_regions(s[0].numpy()), points, probe.grid)
    order = cell_order(sal, np.random.default_rng(0))  # the seed's first draw, as deletion_curves makes it
    grid_mask = np.ones(probe.grid[0] * probe.grid[1])
    grid_mask[order[:round(len(order) / 4)]] = 0
    cell = probe.size // probe.grid[0]
    assert probe.size == cell * probe.grid[0]
    mask = np.kron(grid_mask.reshape(probe.grid), np.ones((cell, cell)))
    s1, _ = probe.scores(x * torch.from_numpy(mask).float(), sample.boxes[:1])
    p1 = float(est.module_.logits(est.module_.pool(s1).b).softmax(1)[0, cls])
    assert curves["deletion_dpnet"][0][1] == pytest.approx(p1, rel=1e-4)


def test_stability_is_complete_without_noise(run_with_baselines, monkeypatch):
    import dpnet.analyze.pixels as px
    from dpnet.analyze.analysis import load_run

    est, cache, _ = load_run(run_with_baselines)
    index = cache.dataset_index()
    sample = px.sample_test_images(cache, 6, seed=0)
    kp = np.stack([index.part_locs[int(i)] for i in sample.ids]).astype(np.float64)
    frames = np.array([index.bboxes[int(i)][2:] for i in sample.ids])
    probe = px.PixelProbe(est, cache, runtime="eager")
    monkeypatch.setattr(px, "NOISE_STD", 0.0)
    clean, noisy = px.stability_hits(probe, sample, kp, frames)
    assert clean.shape == (6, est.parts_per_class, kp.shape[1]) and np.array_equal(clean, noisy)
    # heavy noise moves the peaks (on this 3 x 3 grid the keypoint hits may all survive it: the boxes are compared)
    monkeypatch.setattr(px, "NOISE_STD", 5.0)
    monkeypatch.setattr(px, "NOISE_CLIP", 50.0)
    boxes, hits = [], px.keypoint_hits
    monkeypatch.setattr(px, "keypoint_hits", lambda b, k: boxes.append(np.array(b)) or hits(b, k))
    px.stability_hits(probe, sample, kp, frames, batch=8)
    assert len(boxes) == 2 and not np.allclose(boxes[0], boxes[1])  # one batch: clean, then noisy


# ------------------------------------------------------------ the decision the table shows (issue 16)
def _slow_margin_shares(contrib: np.ndarray, shown: int, share: float):
    shown_out, hidden_out, needed_out = [], [], []
    for n in range(contrib.shape[0]):
        logits = [sum(contrib[n, c]) for c in range(contrib.shape[1])]
        pred = max(range(len(logits)), key=lambda c: (logits[c], -c))
        runner = max((c for c in range(len(logits)) if c != pred), key=lambda c: (logits[c], -c))
        m = [contrib[n, pred, p] - contrib[n, runner, p] for p in range(contrib.shape[2])]
        total = sum(m)
        ranked = sorted(m, key=abs, reverse=True)
        shown_out.append(sum(ranked[:shown]) / abs(total))
        hidden_out.append(sum(abs(x) for x in ranked[shown:]) / abs(total))
        needed_out.append(next(k for k in range(1, len(m) + 1)
                               if sum(abs(x) for x in ranked[k:]) <= (1 - share) * abs(total) + 1e-12))
    return np.array(shown_out), np.array(hidden_out), np.array(needed_out)


def test_margin_shares_match_a_loop():
    from dpnet.analyze.explain import margin_contributions, margin_shares

    rng = np.random.default_rng(3)
    contrib = rng.normal(size=(40, 5, 30)).astype(np.float64)
    preds, runners, m = margin_contributions(contrib)
    logits = contrib.sum(-1)
    assert np.allclose(m.sum(1), logits[np.arange(40), preds] - logits[np.arange(40), runners])
    assert (m.sum(1) >= 0).all()
    for shown in (1, 5, 10):
        got = margin_shares(m, shown, 0.9)
        want = _slow_margin_shares(contrib, shown, 0.9)
        assert np.allclose(got[0], want[0]) and np.allclose(got[1], want[1]) and np.array_equal(got[2], want[2])
    sparse = np.zeros((2, 3, 8))  # a decision that rests on two parts: 2 parts carry it whole
    sparse[:, 0, :2] = [3.0, 1.0]
    shown, hidden, needed = margin_shares(margin_contributions(sparse)[2], 2, 0.9)
    assert np.allclose(shown, 1) and np.allclose(hidden, 0) and (needed == 2).all()


def test_the_margin_table_of_an_image_adds_up_to_its_margin(base):
    from dpnet.analyze.explain import DPNetExplainer
    from dpnet.train.estimator import DPNetClassifier

    run = base / "run"
    est = DPNetClassifier.load(run / "model.pt")
    cache = RegionCache(next((base / "cache").glob("synth-*")))
    expl = DPNetExplainer(est)
    regions = next(cache.iter_shards("test", ("regions",)))[1]["regions"][:3]
    for scores in expl.scores(regions):
        ev = expl.margin_evidence(scores)
        logits = expl.contributions(expl.pool(scores[None])[0]).sum(-1)[0]
        assert ev.pred == int(np.argmax(logits)) and ev.runner == int(np.argsort(-logits, kind="stable")[1])
        assert np.isclose(ev.margin.sum(), logits[ev.pred] - logits[ev.runner], atol=1e-5)
        assert np.isclose(ev.total, logits[ev.pred] - logits[ev.runner], atol=1e-5)
        assert (np.diff(np.abs(ev.margin)) <= 1e-7).all()


def test_on_part_share_matches_a_loop():
    from dpnet.analyze.localize import on_part_share

    rng = np.random.default_rng(5)
    boxes = np.sort(rng.uniform(0, 100, (6, 5, 2, 2)), axis=2).transpose(0, 1, 3, 2).reshape(6, 5, 4)
    kp = np.concatenate([rng.uniform(0, 100, (6, 4, 2)), rng.integers(0, 2, (6, 4, 1))], -1)
    hits = 0
    for n in range(6):
        for m in range(5):
            x0, y0, x1, y1 = boxes[n, m]
            hits += any(kp[n, k, 2] > 0 and x0 <= kp[n, k, 0] <= x1 and y0 <= kp[n, k, 1] <= y1 for k in range(4))
    assert on_part_share(boxes, kp) == pytest.approx(100 * hits / 30)


# ------------------------------------------------------------ where a part is: one definition (issue 16)
def test_part_peaks_are_the_mean_centre_of_each_parts_best_regions():
    from dpnet.analyze.localize import part_peaks

    rng = np.random.default_rng(6)
    n, r, p, k = 3, 40, 4, 5
    scores = rng.normal(size=(n, r, p)).astype(np.float32)
    lo = rng.integers(0, 10, (n, r, 2))
    boxes = np.concatenate([lo, lo + rng.integers(1, 6, (n, r, 2))], -1)
    got = part_peaks(scores, boxes, k)
    assert got.shape == (n, p, 2)
    for i in range(n):
        for j in range(p):
            best = sorted(range(r), key=lambda t: -scores[i, t, j])[:k]
            want = [sum((boxes[i, t, a] + boxes[i, t, a + 2]) / 2 for t in best) / k for a in (0, 1)]
            assert np.allclose(got[i, j], want)
    assert np.allclose(part_peaks(scores, boxes, 1)[0, 0], (boxes[0, scores[0, :, 0].argmax(), :2]
                                                           + boxes[0, scores[0, :, 0].argmax(), 2:]) / 2)
    assert part_peaks(scores, boxes, r + 10).shape == (n, p, 2)  # more regions asked than there are: all of them


def test_a_near_copy_of_the_best_region_does_not_decide_where_a_part_is():
    """Two overlapping regions far from the other eight best: one stray region moves the peak only a tenth."""
    from dpnet.analyze.localize import PEAK_REGIONS, part_peaks

    r = 30
    boxes = np.tile(np.array([10, 10, 12, 12]), (1, r, 1))
    boxes[0, 0] = [0, 0, 2, 2]  # the best region, alone in a corner
    scores = np.zeros((1, r, 1), np.float32)
    scores[0, :PEAK_REGIONS, 0] = np.linspace(1.0, 0.5, PEAK_REGIONS)
    peak = part_peaks(scores, boxes)[0, 0]
    assert np.allclose(peak, (1 + (PEAK_REGIONS - 1) * 11) / PEAK_REGIONS)


def test_the_report_measures_use_the_part_peaks(base, monkeypatch):
    """Consistency, on-part share and landmark error all read where parts are from part_peaks."""
    import dpnet.analyze.analysis as an
    import dpnet.analyze.localize as lz

    calls = []
    real = lz.part_peaks

    def spy(scores, boxes, k=lz.PEAK_REGIONS):
        calls.append(scores.shape)
        return real(scores, boxes, k)

    monkeypatch.setattr(an, "part_peaks", spy)
    out = an.analyse(base / "run", pixel_images=0)
    loc = out.numbers["localisation"]
    assert calls and {"consistency_evalprotopnet", "on_part_share", "landmark_error_x100"} <= set(loc)
    assert sum(s[0] for s in calls) >= out.numbers["test_images"]  # every test image (and the training pass)


# ------------------------------------------------------------ pixel measures with their intervals (issue 18)
def test_bootstrap_interval_matches_a_loop_and_narrows_with_more_images():
    from dpnet.analyze.stats import bootstrap_interval

    values = np.random.default_rng(7).normal(0.3, 0.1, 400)
    lo, hi = bootstrap_interval(len(values), lambda idx: float(values[idx].mean()), reps=300, seed=1)
    rng = np.random.default_rng(1)  # the same draws, one resample at a time
    means = sorted(float(values[rng.integers(0, len(values), len(values))].mean()) for _ in range(300))
    assert lo == pytest.approx(np.quantile(means, 0.025)) and hi == pytest.approx(np.quantile(means, 0.975))
    assert lo < values.mean() < hi
    lo_small, hi_small = bootstrap_interval(40, lambda idx: float(values[:40][idx].mean()), reps=300, seed=1)
    assert hi_small - lo_small > hi - lo


def test_areas_are_the_per_image_trapezoids_whose_mean_is_the_auc():
    from dpnet.analyze.pixels import areas

    curves = np.random.default_rng(8).uniform(0, 1, (5, 9))
    want = [sum((c[i] + c[i + 1]) / 2 for i in range(8)) / 8 for c in curves]
    assert np.allclose(areas(curves), want) and auc(curves) == pytest.approx(np.mean(want))


def test_the_quick_and_full_pixel_measures(run_with_baselines):
    """--measures quick (the default) and full pick the sample; the report gives each pixel measure's
    interval and the paired difference against the CAM."""
    from dpnet.analyze.analysis import analyse
    from dpnet.analyze.config import PIXEL_MEASURES
    from dpnet.analyze.cli import build_parser, pixel_plan

    assert pixel_plan(build_parser().parse_args(["report"])) == PIXEL_MEASURES["quick"]
    assert pixel_plan(build_parser().parse_args(["report", "--measures", "full"])) == PIXEL_MEASURES["full"]
    assert pixel_plan(build_parser().parse_args(["report", "--measures", "full", "--pixel-images", "7"])) == (
        7, PIXEL_MEASURES["full"][1])
    assert PIXEL_MEASURES["full"][0] > PIXEL_MEASURES["quick"][0]
    f = analyse(run_with_baselines, pixel_images=6, pixel_steps=3).numbers["faithfulness"]
    for key in ("deletion_auc", "insertion_auc", "deletion_auc_cam", "insertion_auc_random"):
        lo, hi = f[key + "_ci95"]
        assert lo <= f[key] <= hi
    for kind in ("deletion", "insertion"):
        lo, hi = f[f"{kind}_auc_minus_cam_ci95"]
        assert lo <= f[f"{kind}_auc"] - f[f"{kind}_auc_cam"] <= hi


def test_activation_map_takes_each_cells_best_covering_region():
    from dpnet.analyze.localize import activation_map

    rng = np.random.default_rng(9)
    lo = rng.integers(0, 5, (12, 2))
    boxes = np.concatenate([lo, lo + rng.integers(1, 4, (12, 2))], -1)
    scores = rng.normal(size=12)
    got = activation_map(scores, boxes, (8, 8))
    for y in range(8):
        for x in range(8):
            cover = [scores[r] for r in range(12) if boxes[r, 0] <= x < boxes[r, 2] and boxes[r, 1] <= y < boxes[r, 3]]
            assert got[y, x] == pytest.approx(max(cover) if cover else scores.min())


def test_consistency_rates_per_keypoint_against_a_loop(rng):
    from dpnet.analyze.localize import consistency_rates

    n, q, c, k = 24, 2, 3, 4
    labels = rng.integers(0, c, n)
    lo = rng.uniform(0, 60, (n, q * c, 2))
    boxes = np.concatenate([lo, lo + 40], -1)
    kp = _keypoints(rng, n, k)
    got = consistency_rates(boxes, kp, labels, np.arange(q * c) // q)
    for p in range(q * c):
        for j in range(k):
            mine = [i for i in range(n) if labels[i] == p // q and kp[i, j, 2] > 0]
            hit = [i for i in mine if boxes[i, p, 0] <= kp[i, j, 0] <= boxes[i, p, 2]
                   and boxes[i, p, 1] <= kp[i, j, 1] <= boxes[i, p, 3]]
            assert got[p, j] == pytest.approx(len(hit) / max(len(mine), 1))
    score, rate = part_consistency(boxes, kp, labels, np.arange(q * c) // q)
    assert np.allclose(rate, got.max(1)) and score == pytest.approx(100 * (got.max(1) >= 0.8).mean())


def test_the_analysis_config_checks_its_options_in_one_place(tmp_path):
    from dpnet.analyze.config import PIXEL_MEASURES, AnalyzeConfig
    from dpnet.errors import ConfigError

    assert AnalyzeConfig().pixel_plan() == PIXEL_MEASURES["quick"]
    assert AnalyzeConfig(measures="full", pixel_steps=3).pixel_plan() == (PIXEL_MEASURES["full"][0], 3)
    for bad, says in ((dict(top_k=0), "--top-k"), (dict(pixel_images=-1), "--pixel-images"),
                      (dict(measures="most"), "--measures"), (dict(boxes_csv=str(tmp_path / "no.csv")), "BOXES")):
        with pytest.raises(ConfigError, match=says):
            AnalyzeConfig(**bad).validate()


# ------------------------------------------------------------- the parts the measures are taken over (issue 16)
def test_the_part_measures_count_only_the_parts_that_weigh_in_a_class(copy, monkeypatch):
    """PIP-Net's relevant prototypes: a part that weighs in no class's logit (pruned, or left out of a sparse
    layer's support) is in no explanation, so consistency, purity and stability are taken over the others; the
    all-parts figures stay beside them, with the count measured."""
    import dpnet.analyze.analysis as an
    from dpnet.analyze.ownership import measured_parts

    real_load, real_stability = an.load_run, an.part_stability

    def pruned_half(run_dir, cache=None):
        est, cache, metrics = real_load(run_dir, cache)
        est.module_.owner[::2] = -1  # every other part weighs nothing in any class
        return est, cache, metrics

    seen = []

    def spy(hits, noisy, labels, classes):
        seen.append(hits.shape[1])
        return real_stability(hits, noisy, labels, classes)

    monkeypatch.setattr(an, "load_run", pruned_half)
    monkeypatch.setattr(an, "part_stability", spy)
    analyses = []
    real_analyse = an.analyse
    import dpnet.analyze.report as rp

    monkeypatch.setattr(rp, "analyse", lambda *a, **k: analyses.append(real_analyse(*a, **k)) or analyses[-1])
    page = rp.build_report(copy.run, k=3, n_show=2, pixel_images=4, pixel_steps=2)
    out = analyses[0]
    est = out.est
    use = measured_parts(est)
    p = est.module_.parts.shape[0]
    assert use.tolist() == [i % 2 == 1 for i in range(p)]
    loc = out.numbers["localisation"]
    rates = np.array(loc["part_hit_rate"])
    assert len(rates) == p and out.numbers["parts"]["measured"] == p // 2
    assert loc["consistency_evalprotopnet"] == pytest.approx(100 * (rates[use] >= 0.8).mean())
    assert loc["consistency_all_parts"] == pytest.approx(100 * (rates >= 0.8).mean())
    purity = np.array(loc["part_purity"])
    assert loc["purity"] == pytest.approx(purity[use].mean()) and loc["purity_all_parts"] == pytest.approx(purity.mean())
    assert "stability_all_parts" in loc and sorted(set(seen)) == [p // 2, p]  # measured parts, then all of them
    assert f"% of the {p // 2} of {p} parts that weigh in a class" in page.read_text()  # the page says so
