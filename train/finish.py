"""ProtoPNet's last steps, after the epochs: prototype projection and a last-layer refit.

- :func:`project_parts` replaces each part by the prepared descriptor of its best-scoring region
  among the training images of its own class, so each part is literally a training patch.
- :func:`prune_parts` (ProtoPNet's pruning) silences each part whose best training images are
  mostly of other classes.
- :func:`refit_class_layer` optimises V alone on the fixed bags of parts (a convex problem: a
  multinomial logistic regression on b), with the constraint on foreign weights when V is free.

Glossary: N images, R regions, W the width of prepared regions, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F

from .losses import class_specific
from .model import DPNetModule

log = logging.getLogger(__name__)


@torch.no_grad()
def project_parts(module: DPNetModule, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Replace each part by its best region among its own class's images; returns those scores (P,).

    Args:
        batches: (z (n, R, W) prepared regions, labels (n,)) over the training images.

    A part whose class has no image keeps its place. With dot similarity the part keeps its
    length (b is normalised across parts, so lengths weigh parts against each other).
    """
    units = module.unit_parts()  # (P, W)
    p, width = units.shape
    owner = module.owner.to(units.device)
    best = torch.full((p,), float("-inf"), device=units.device)
    best_z = module.parts.detach().clone()
    for z, labels in batches:
        s = z @ units.T  # (n, R, P)
        s = s.masked_fill(labels[:, None, None] != owner[None, None, :], float("-inf"))  # own class only
        flat = s.flatten(0, 1)  # (n R, P)
        score, row = flat.max(0)
        better = score > best
        best = torch.where(better, score, best)
        best_z[better] = z.reshape(-1, width)[row[better]]
    found = torch.isfinite(best)
    if module.similarity == "dot":
        best_z = F.normalize(best_z, dim=1) * module.parts.detach().norm(dim=1, keepdim=True)
    module.parts.data[found] = best_z[found].to(module.parts.dtype)
    log.info("projected %d of %d parts onto training regions of their class", int(found.sum()), p)
    return best


@torch.no_grad()
def pooled_bags(module: DPNetModule, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bags of parts b (N, P) and labels (N,) of prepared batches: the model's own scores, pool
    and bag (:class:`~dpnet.train.model.DPNetModule`), so V is refitted on the bags it predicts with."""
    bags, labels = [], []
    for z, y in batches:
        bags.append(module.pool(module.scores(z, prepared=True)).b)
        labels.append(y)
    return torch.cat(bags), torch.cat(labels)


PRUNE_K, PRUNE_TAU = 6, 3  # ProtoPNet's pruning: k nearest training patches, at least tau of the part's class


@torch.no_grad()
def prune_parts(module: DPNetModule, bags: torch.Tensor, labels: torch.Tensor, k: int = PRUNE_K,
                tau: int = PRUNE_TAU) -> torch.Tensor:
    """ProtoPNet's pruning: a part whose ``k`` best training images (by its bag entry) hold fewer
    than ``tau`` of its own class is given to no class (owner -1), so it weighs nothing in any
    logit (:meth:`DPNetModule.class_weights`); returns the pruned part ids.

    Args:
        bags: (N, P) the training images' bags (:func:`pooled_bags`). labels: (N,).
    """
    top = bags.topk(min(k, len(bags)), dim=0).indices  # (k, P)
    own = (labels[top] == module.owner[None, :].to(labels.device)).sum(0)  # (P,)
    pruned = torch.nonzero((own < tau) & (module.owner >= 0).to(own.device)).flatten()
    module.owner[pruned] = -1
    log.info("pruned %d of %d parts (fewer than %d of their %d best training images are of their class)",
             len(pruned), len(own), tau, k)
    return pruned


def refit_class_layer(module: DPNetModule, bags: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                      seed: int = 0, l1: float = 0.0) -> float:
    """Optimise V alone on fixed bags (N, P): cross-entropy, plus C_cs on a free class layer, plus
    ``l1`` times the summed size of the weights linking a part to a class not its own (ProtoPNet's
    last-layer step); returns the loss."""
    torch.manual_seed(seed)
    v = module.classifier
    opt = torch.optim.Adam([v], lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module.logits(bags), labels)
        if "cs" in module.constraints and module.class_layer != "owned":
            loss = loss + module.lambdas["cs"] * class_specific(module.class_weights(), module.part_classes())
        if l1 > 0:
            loss = loss + l1 * (module.class_weights() * ~module.own_mask()).abs().sum()
        loss.backward()
        opt.step()
    return float(loss.detach())
