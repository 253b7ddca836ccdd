"""DP-Net's constraint terms on U and V, as method.md writes them (signs and absolute value corrected).

The assignment term C_assign lives in the fused training op of :mod:`dpnet.train.model` (it needs the
scores S); :class:`dpnet.train.model.DPNetModule` puts the terms together into the loss.
Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONSTRAINTS = ("orth", "assign", "cs")  # the paper's
# clst: ProtoPNet's cluster cost (cosine similarity only); occur: region grouping's occurrence prior;
# agree: the views' agreement (PIP-Net's alignment, needs a view cache)
KNOWN_CONSTRAINTS = CONSTRAINTS + ("clst", "occur", "agree")


def orthogonality(parts: torch.Tensor) -> torch.Tensor:
    """C_orth = (1/P^2) sum_{i != j} (u^_i . u^_j)^2 on L2-normalised parts.

    Args:
        parts: U, Tensor[P, D].
    """
    p, d = parts.shape
    un = F.normalize(parts, dim=1)
    # ||U U^T||_F^2 = ||U^T U||_F^2 = tr((U^T U)^2): the smaller Gram gives the sum; with 1,000 parts in
    # a PCA 256 space the (D, D) one is a quarter of the (P, P) one's work, forward and backward
    gram = un @ un.T if p <= d else un.T @ un  # (P, P) or (D, D)
    diagonal = un.pow(2).sum(1)  # (P,) the (P, P) Gram's diagonal: 1, or 0 for a zero part
    return (gram.pow(2).sum() - diagonal.pow(2).sum()) / p**2


def part_classes(n_parts: int, parts_per_class: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(P,) int64: the class each part is made for. Part p belongs to class p // q: the one place that
    says so (the model's owner buffer starts from it; pruning later sets a part's owner to -1, while
    the constraints and the part measures keep grouping it with its class)."""
    return torch.arange(n_parts, device=device) // parts_per_class


def class_specific(weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """C_cs = (1/(P(C-1))) sum_c sum_{p not of class c} |v_cp|.

    Args:
        weights: V, Tensor[C, P].
        classes: Tensor[P], each part's class (:func:`part_classes`).
    """
    c, p = weights.shape
    return (weights.abs() * foreign_mask(c, classes, weights)).sum() / (p * max(c - 1, 1))


def foreign_mask(n_classes: int, classes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C, P) mask, 1 where part p does not belong to class c (``classes`` (P,): each part's class)."""
    classes = classes.to(like.device)
    return (classes[None, :] != torch.arange(n_classes, device=like.device)[:, None]).to(like.dtype)




def occurrence_cost(occurrence: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """C_occur: region grouping's prior on part occurrence (method.md; Huang & Li 2020, eq. 2), the 1-D
    Wasserstein distance between each part's occurrences over the batch and its prior.

    Their prior is a U-shaped Beta (a near-binary switch); its binary limit is a Bernoulli whose
    "on" probability here is the share of the batch that shows the part's class (part p belongs
    to class owner[p]): a part should occur, fully, in as many images as its class has in the batch,
    and nowhere else. Between sorted samples the distance is the mean absolute difference of the
    sorted occurrences and the sorted prior (k_p ones after N - k_p zeros). Pruned parts (owner -1)
    are held to occur nowhere.

    Args:
        occurrence: tau, Tensor[N, P] in [0, 1], each part's occurrence in each image.
        labels: Tensor[N] int64.
        owner: Tensor[P] int64, each part's class.

    Returns:
        The mean over parts of W1, a scalar.
    """
    n = occurrence.shape[0]
    shown = (labels[:, None] == owner[None, :]).sum(0)  # (P,) k_p
    prior = (torch.arange(n, device=occurrence.device)[:, None] >= n - shown[None, :]).to(occurrence.dtype)
    return (occurrence.sort(dim=0).values - prior).abs().mean()


def distribution_agreement(logits: torch.Tensor, logits_view: torch.Tensor) -> torch.Tensor:
    """-mean log(p . p'), p = softmax(logits) over the last axis: PIP-Net's alignment of two views.

    0 when both put all their mass on the same entry; the mean runs over every other axis. Computed
    as a log-sum-exp of log-probabilities, so two sharp distributions that disagree still get an
    exact value and a gradient (their dot product can be far below float eps).

    Args:
        logits, logits_view: Tensor[..., K].
    """
    return -(logits.log_softmax(-1) + logits_view.log_softmax(-1)).logsumexp(-1).mean()
