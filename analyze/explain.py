"""Explainers: plain arrays of documented shape from a trained model and region descriptors.

In the spirit of pytorch-grad-cam: an explainer computes arrays, drawing is elsewhere
(``dpnet.analyze.draw``). The maths (scores, pooling, contributions) is the model's own
(:class:`dpnet.train.model.DPNetModule`); these are numpy wrappers around it.
Glossary: N images, R regions, D descriptor size, P parts, C classes, (H, W) the feature grid;
boxes are grid cells ``(x0, y0, x1, y1)``, half-open.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpnet.train.estimator import DPNetClassifier


@dataclass
class Evidence:
    """ProtoPNet's "this looks like that" table for one image and one class, parts by points.

    ``points`` = each part's contribution (:meth:`dpnet.train.model.DPNetModule.contributions`: ``b * v``,
    0 outside the class's K weightiest with ``class_top_k``); ``points.sum()`` equals the class logit.
    """

    cls: int
    parts: np.ndarray  # (P,) part ids, most points first
    region: np.ndarray  # (P,) this image's best region of each part
    b: np.ndarray  # (P,) the bag of parts (DPNetModule.bag: L2-normalised for dot, best cosines for cosine)
    v: np.ndarray  # (P,) the class weights v_cp
    points: np.ndarray  # (P,) the contributions
    logit: float


@dataclass
class MarginEvidence:
    """Why class ``pred`` and not the runner-up ``runner``, part by part, weightiest (|margin|) first.

    ``margin[i]`` = b_p (v_pred,p - v_runner,p) for part ``parts[i]``; ``margin.sum()`` equals
    logit[pred] - logit[runner] (the class layer has no bias), so the rows a table lists carry
    a known share of the decision and the rest carry the remainder.
    """

    pred: int
    runner: int
    parts: np.ndarray  # (P,) part ids, most margin first
    region: np.ndarray  # (P,) this image's best region of each part
    b: np.ndarray  # (P,)
    dv: np.ndarray  # (P,) v_pred,p - v_runner,p
    margin: np.ndarray  # (P,) b * dv
    total: float


EVIDENCE_ROWS = 10  # parts an evidence table lists (by their share of the margin)


def margin_contributions(contributions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-part shares of the decision of each image.

    Args:
        contributions: (N, C, P) v_cp b_p (see :meth:`DPNetExplainer.contributions`).

    Returns:
        preds (N,), runners-up (N,), and m (N, P) with m[n, p] = contributions[n, pred, p] -
        contributions[n, runner, p]; m.sum(1) is each image's margin.
    """
    logits = contributions.sum(-1)  # (N, C)
    order = np.argsort(-logits, axis=1, kind="stable")
    preds, runners = order[:, 0], order[:, 1]
    rows = np.arange(len(logits))
    return preds, runners, contributions[rows, preds] - contributions[rows, runners]


def margin_shares(m: np.ndarray, shown: int = EVIDENCE_ROWS, share: float = 0.9
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How much of each image's margin a table of its ``shown`` weightiest parts carries, what it
    leaves out, and how many weightiest parts carry ``share`` of it (PIP-Net's local explanation size).

    Parts are ranked by the size of their contribution |m| (for and against). What a table leaves
    out is measured in absolute value: left-out parts that cancel each other are still hidden
    evidence (a signed sum would let a large hidden plus and minus pass for nothing).

    Args:
        m: (N, P) margin contributions (:func:`margin_contributions`).

    Returns:
        shown_share (N,): the listed parts' signed sum over the margin (1 is the whole of it);
        hidden_share (N,): the left-out parts' sum of |m| over the margin; parts_needed (N,) int: the
        fewest weightiest parts whose left-out rest has sum |m| at most (1 - ``share``) of the margin
        (P when even all but none leave too much: never, since then nothing is left out).
    """
    mag = np.abs(m)
    order = np.argsort(-mag, axis=1, kind="stable")
    ranked, ranked_mag = np.take_along_axis(m, order, 1), np.take_along_axis(mag, order, 1)  # (N, P)
    total = m.sum(1)
    safe = np.where(np.abs(total) > 1e-12, np.abs(total), np.nan)
    shown_share = ranked[:, :shown].sum(1) / safe
    left = ranked_mag[:, ::-1].cumsum(1)[:, ::-1]  # left[:, k]: sum |m| of the parts ranked k and after
    hidden_share = (left[:, shown] if shown < m.shape[1] else np.zeros(len(m))) / safe
    rest = np.concatenate([left[:, 1:], np.zeros((len(m), 1))], 1)  # rest[:, k-1]: left out by the top k
    reached = rest <= (1 - share) * np.abs(total[:, None]) + 1e-12
    needed = reached.argmax(1) + 1  # the last column (nothing left out) always qualifies
    return shown_share, hidden_share, needed


class DPNetExplainer:
    """Explanations of a fitted :class:`DPNetClassifier`.

    Args:
        est: the fitted model.
        d: optional (C, P) class-level part weights d(p, c), used to pick a class's parts for
            heatmaps; by default the ones saved with the model (``est.class_parts_``), else the
            class's own q parts by v.
    """

    def __init__(self, est: DPNetClassifier, d: np.ndarray | None = None):
        est._check_fitted()
        self.est, self.module = est, est.module_
        self.d = d if d is not None else getattr(est, "class_parts_", None)
        self.v = self.module.class_weights().detach().cpu().numpy()  # (C, P)
        self.q = est.parts_per_class

    @torch.no_grad()
    def scores(self, regions: np.ndarray) -> np.ndarray:
        """S, float32 (N, R, P): raw part scores of every region."""
        return self.est.region_scores(regions)

    @torch.no_grad()
    def pool(self, scores: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, R, P) scores -> the bag b (N, P) and best region (N, P); ``keep`` (N, R) masks regions out."""
        out = self.module.pool(torch.from_numpy(np.ascontiguousarray(scores)),
                               None if keep is None else torch.from_numpy(np.asarray(keep, bool)))
        return out.b.numpy(), out.where.numpy()

    def contributions(self, b: np.ndarray) -> np.ndarray:
        """v_cp * b_p, float32 (N, C, P); summed over P it gives the logits (N, C)."""
        with torch.no_grad():
            return self.module.contributions(torch.from_numpy(np.asarray(b, np.float32))).numpy()

    def evidence(self, scores: np.ndarray, cls: int) -> Evidence:
        """The evidence table of one image (scores (R, P)) for class ``cls``."""
        b, where = self.pool(scores[None])
        points = self.contributions(b)[0, cls]
        order = np.argsort(-points, kind="stable")
        return Evidence(cls, order, where[0, order], b[0, order], self.v[cls, order], points[order],
                        float(points.sum()))

    def margin_evidence(self, scores: np.ndarray) -> MarginEvidence:
        """Why one image (scores (R, P)) gets its class and not the runner-up, part by part."""
        b, where = self.pool(scores[None])
        preds, runners, m = margin_contributions(self.contributions(b))
        pred, runner = int(preds[0]), int(runners[0])
        order = np.argsort(-np.abs(m[0]), kind="stable")  # weightiest first, for and against
        dv = self.v[pred] - self.v[runner]
        return MarginEvidence(pred, runner, order, where[0, order], b[0, order], dv[order], m[0, order],
                              float(m[0].sum()))

    def class_parts(self, cls: int, n: int) -> np.ndarray:
        """The n parts that matter most for ``cls``: by d(p, c) when known, else its own parts by v."""
        if self.d is not None:
            return np.argsort(-self.d[cls], kind="stable")[:n]
        own = self.module.own_parts(cls).cpu().numpy()
        return own[np.argsort(-self.v[cls, own], kind="stable")][:n]

    def heatmaps(self, scores: np.ndarray, boxes: np.ndarray, grid: tuple[int, int], classes: np.ndarray,
                 top_n: int = 3, top_m: int = 5) -> np.ndarray:
        """The paper's Fig. 3: top-N parts of each image's class, their top-M regions painted.

        Args:
            scores: (N, R, P) raw scores. boxes: (N, R, 4) grid boxes. grid: (H, W).
            classes: (N,) the class to explain per image.

        Returns:
            float32 (N, H, W) in [0, 1]: the sum over painted regions of their positive score.
        """
        n, (h, w) = len(scores), grid
        out = np.zeros((n, h, w), np.float32)
        for i in range(n):
            for p in self.class_parts(int(classes[i]), top_n):
                for r in np.argsort(-scores[i, :, p], kind="stable")[:top_m]:
                    x0, y0, x1, y1 = (int(t) for t in boxes[i, r])
                    out[i, y0:y1, x0:x1] += max(float(scores[i, r, p]), 0.0)
            peak = out[i].max()
            if peak > 0:
                out[i] /= peak
        return out

    def assignment_maps(self, scores: np.ndarray, boxes: np.ndarray, grid: tuple[int, int],
                        classes: np.ndarray) -> np.ndarray:
        """Each cell gets the part (of the image's class) whose best region covering it scores highest.

        Returns:
            int64 (N, H, W) part ids, -1 where no best region of those parts covers the cell.
        """
        n, (h, w) = len(scores), grid
        out = np.full((n, h, w), -1, np.int64)
        _, where = self.pool(scores)
        for i in range(n):
            cls = int(classes[i])
            best = np.full((h, w), -np.inf)
            for p in self.module.own_parts(cls).tolist():
                r = where[i, p]
                x0, y0, x1, y1 = (int(t) for t in boxes[i, r])
                cell = best[y0:y1, x0:x1]
                win = scores[i, r, p] > cell
                cell[win] = scores[i, r, p]
                out[i, y0:y1, x0:x1][win] = p
        return out


def named_regions(expl: DPNetExplainer, scores: np.ndarray, cls: int, k: int) -> np.ndarray:
    """The regions an explanation names: the best regions of the top-k contributing parts (unique, in order)."""
    ev = expl.evidence(scores, cls)
    return np.array(list(dict.fromkeys(int(r) for r in ev.region[:k])), np.int64)


def deletion_scores(expl: DPNetExplainer, scores: np.ndarray, cls: np.ndarray, steps: int = 10,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class score as the named regions are removed, against removing as many random regions.

    Removal is exact in region space: removed regions leave the max-pool, b is recomputed.

    Args:
        scores: (N, R, P); cls: (N,) the class explained (its logit is tracked).
        steps: the k of "top-k contributing parts" goes 0..steps.

    Returns:
        named (N, steps + 1) and random (N, steps + 1) class logits; column 0 is the intact image.
    """
    n, r, _ = scores.shape
    rng = np.random.default_rng(seed)
    named, rand = np.zeros((n, steps + 1)), np.zeros((n, steps + 1))
    for i in range(n):
        c = int(cls[i])
        ranked = expl.evidence(scores[i], c).region[:steps]  # best region of each part, by points
        order = np.array(list(dict.fromkeys(int(x) for x in ranked)), np.int64)  # = named_regions(.., steps)
        named_count = [len(set(ranked[:k].tolist())) for k in range(steps + 1)]  # regions named by top-k
        perm = rng.permutation(r)
        keep = np.ones((2 * (steps + 1), r), bool)  # every step of both curves as one batch of masks
        for k in range(steps + 1):
            keep[k, order[:named_count[k]]] = False
            keep[steps + 1 + k, perm[:named_count[k]]] = False
        with torch.no_grad():
            b = expl.module.pool_removed(torch.from_numpy(np.ascontiguousarray(scores[i])), torch.from_numpy(~keep))
            logit = expl.module.logits(b)[:, c].numpy()
        named[i], rand[i] = logit[:steps + 1], logit[steps + 1:]
    return named, rand
