"""Does a part speak for the class that owns it? Each part is made for one class
(:func:`dpnet.train.losses.part_classes`); these measures check whether the class layer V agrees.

Glossary: N images, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import numpy as np

from dpnet.train.losses import part_classes


def owners(n_parts: int, parts_per_class: int) -> np.ndarray:
    """(P,) the class each part belongs to (the model's rule, :func:`dpnet.train.losses.part_classes`)."""
    return part_classes(n_parts, parts_per_class).numpy()


def model_part_classes(est) -> np.ndarray:
    """(P,) each part's class as the fitted model says (``DPNetModule.part_classes``), for numpy measures."""
    return est.module_.part_classes().cpu().numpy()


def measured_parts(est) -> np.ndarray:
    """(P,) bool: the parts the part measures (consistency, stability, purity) are taken over, those that weigh
    in some class's logit (``DPNetModule.class_weights``), PIP-Net's relevant prototypes. A part that weighs in
    none (pruned, or outside a sparse layer's support) is in no explanation. A free layer's parts all weigh."""
    return (est.module_.class_weights() != 0).any(0).cpu().numpy()


def own_top3_share(d: np.ndarray, parts_per_class: int) -> float:
    """Percent of classes whose three parts of highest d(p, c) are all their own. d: (C, P)."""
    top = np.argsort(-d, axis=1, kind="stable")[:, :3]  # (C, 3)
    own = owners(d.shape[1], parts_per_class)[top] == np.arange(len(d))[:, None]
    return float(100 * own.all(1).mean())


def own_evidence_share(contributions: np.ndarray, classes: np.ndarray, parts_per_class: int) -> float:
    """Percent of a class's positive evidence carried by its own parts, averaged over images.

    Args:
        contributions: (N, P) v_cp b_p of each image for its explained class (the prediction).
        classes: (N,) that class. Images without positive evidence are left out.
    """
    pos = np.maximum(contributions, 0.0)
    own = owners(contributions.shape[1], parts_per_class)[None, :] == np.asarray(classes)[:, None]
    total = pos.sum(1)
    keep = total > 0
    return float(100 * ((pos * own).sum(1)[keep] / total[keep]).mean()) if keep.any() else float("nan")


def owned_parts(d: np.ndarray, parts_per_class: int) -> np.ndarray:
    """(P,) bool: ownership holds for part p when its owner gives it the highest d(p, c) of all
    classes, and a positive one; only those parts are labelled "of <owner>"."""
    owner = owners(d.shape[1], parts_per_class)
    best = d.argmax(0)
    return (best == owner) & (d[owner, np.arange(d.shape[1])] > 0)
