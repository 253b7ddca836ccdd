"""DP-Net's loss terms, as method.md writes them (signs and absolute value corrected).

Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def orthogonality(parts: torch.Tensor) -> torch.Tensor:
    """C_orth = (1/P^2) sum_{i != j} (u^_i . u^_j)^2 on L2-normalised parts.

    Args:
        parts: U, Tensor[P, D].
    """
    p = parts.shape[0]
    un = F.normalize(parts, dim=1)
    gram = un @ un.T  # (P, P)
    return (gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / p**2


def assignment_entropy(parts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """C_assign: per-region entropy of the softmax over parts of U^ X^T, mean over R and N.

    Args:
        parts: U, Tensor[P, D] (normalised inside).
        regions: X, Tensor[N, R, D].
    """
    un = F.normalize(parts, dim=1)
    logits = regions @ un.T  # (N, R, P)
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def assignment_entropy_from_scores(scores: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """C_assign from the model's scores S (N, R, P) = U X^T: U^ X^T is S / ||u_p||, no new GEMM."""
    logp = (scores / parts.norm(dim=1).clamp_min(1e-12)).log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def class_specific(weights: torch.Tensor, parts_per_class: int) -> torch.Tensor:
    """C_cs = (1/(P(C-1))) sum_c sum_{p not of class c} |v_cp|; part p belongs to class p // q.

    Args:
        weights: V, Tensor[C, P].
        parts_per_class: q.
    """
    c, p = weights.shape
    return (weights.abs() * foreign_mask(c, p, parts_per_class, weights)).sum() / (p * max(c - 1, 1))


def foreign_mask(n_classes: int, n_parts: int, parts_per_class: int, like: torch.Tensor) -> torch.Tensor:
    """(C, P) mask, 1 where part p does not belong to class c."""
    owner = torch.arange(n_parts, device=like.device) // parts_per_class  # (P,)
    return (owner[None, :] != torch.arange(n_classes, device=like.device)[:, None]).to(like.dtype)


CONSTRAINTS = ("orth", "assign", "cs")


def constraint_loss(parts: torch.Tensor, weights: torch.Tensor, parts_per_class: int, constraints: tuple[str, ...],
                    lambdas: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """The terms that depend on U and V only ("orth", "cs"), weighted and summed; returns (loss, terms)."""
    terms = {}
    if "orth" in constraints:
        terms["orth"] = orthogonality(parts)
    if "cs" in constraints:
        terms["cs"] = class_specific(weights, parts_per_class)
    loss = sum((lambdas[k] * v for k, v in terms.items()), torch.zeros((), device=parts.device))
    return loss, {k: float(v.detach()) for k, v in terms.items()}


def total_loss(logits: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor, weights: torch.Tensor,
               scores: torch.Tensor, parts_per_class: int, constraints: tuple[str, ...],
               lambdas: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + sum of the switched-on constraints with their lambdas; returns (loss, terms).

    ``scores`` is S (N, R, P) on standardised descriptors, as the model computed it.
    """
    ce = F.cross_entropy(logits, labels)
    terms = {"ce": ce}
    if "orth" in constraints:
        terms["orth"] = orthogonality(parts)
    if "assign" in constraints:
        terms["assign"] = assignment_entropy_from_scores(scores, parts)
    if "cs" in constraints:
        terms["cs"] = class_specific(weights, parts_per_class)
    loss = ce + sum(lambdas[k] * v for k, v in terms.items() if k != "ce")
    return loss, {k: float(v.detach()) for k, v in terms.items()}
