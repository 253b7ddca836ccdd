"""DP-Net's constraint terms on U and V, as method.md writes them (signs and absolute value corrected).

The assignment term C_assign lives in the fused training op of :mod:`train.model` (it needs the
scores S); :class:`train.model.DPNetModule` puts the terms together into the loss.
Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONSTRAINTS = ("orth", "assign", "cs")  # the paper's
KNOWN_CONSTRAINTS = CONSTRAINTS + ("clst",)  # clst: ProtoPNet's cluster cost (cosine similarity only)


def orthogonality(parts: torch.Tensor) -> torch.Tensor:
    """C_orth = (1/P^2) sum_{i != j} (u^_i . u^_j)^2 on L2-normalised parts.

    Args:
        parts: U, Tensor[P, D].
    """
    p = parts.shape[0]
    un = F.normalize(parts, dim=1)
    gram = un @ un.T  # (P, P)
    return (gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / p**2


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


