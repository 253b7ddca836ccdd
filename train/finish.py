"""ProtoPNet's last steps, after the epochs: prototype projection and a last-layer refit.

- :func:`project_parts` replaces each part by the prepared descriptor of its best-scoring region
  among the training images of its own class, so each part is literally a training patch.
- :func:`prune_parts` (ProtoPNet's pruning) silences each part whose best training images are
  mostly of other classes.
- :func:`refit_class_layer` optimises V alone on the fixed bags of parts (a convex problem: a
  multinomial logistic regression on b), with the constraint on foreign weights when V is free.
- :func:`sparsify_class_layer` (``sparse_parts`` K) makes V sparse and non-negative: each class keeps
  the K parts a non-negative L1 fit (:func:`fit_nonneg`) ranks first, and V is refitted on them, so a
  decision is the sum of a few positive part matches (PIP-Net's explanation) that a table can list.

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


SPARSE_L1 = 5e-3  # the L1 weight, per unit of a bag entry's standard deviation, of the fit that ranks parts
SPARSE_L2 = 1e-3  # the L2 weight of the refit on the chosen parts (keeps few images from pushing a weight up)
SPARSE_STEPS = 2000
SPARSE_STAGES = (4, 2, 1)  # sparse_parts K: the stages keep 4K, then 2K, then K parts per class


def sparse_stages(k: int, n_parts: int) -> list[int]:
    """The parts per class of each stage: 4K, 2K, K, leaving out the stages of P parts or more (they would
    keep every part), but never K itself."""
    return [k * f for f in SPARSE_STAGES if k * f < n_parts or f == 1]


def fit_nonneg(bags: torch.Tensor, labels: torch.Tensor, allowed: torch.Tensor, l1: float = 0.0, l2: float = 0.0,
               steps: int = SPARSE_STEPS) -> torch.Tensor:
    """A non-negative multinomial logistic regression on fixed bags, by FISTA (accelerated projected
    gradient with a fixed step 1/L): the V >= 0, zero where ``allowed`` is false, that minimises

        CE(b V^T, y) + l1 sum_cp sd_p v_cp + l2 / 2 |V|^2,

    sd_p being the standard deviation of bag entry p (the L1 of the standardised problem). On v >= 0
    the L1 term is linear, so the prox step is a shift and a clip.

    Args:
        bags: (N, P) b. labels: (N,). allowed: (C, P) bool.

    Returns:
        V (C, P), in the bags' dtype.
    """
    n, c = len(bags), allowed.shape[0]
    allowed = allowed.to(bags.device)
    sd = bags.std(0) if n > 1 else torch.ones_like(bags[0])
    # the gradient of the mean CE is 1/2 |b|_2^2 / N Lipschitz (softmax's Hessian is at most 1/2)
    step = 1.0 / (0.5 * float(torch.linalg.matrix_norm(bags, 2)) ** 2 / n + l2 + 1e-12)
    v = prev = torch.zeros(c, bags.shape[1], dtype=bags.dtype, device=bags.device)
    t = 1.0
    for _ in range(steps):
        y = v.detach().requires_grad_(True)
        loss = F.cross_entropy(bags @ y.T, labels) + l2 / 2 * (y * y).sum()
        (grad,) = torch.autograd.grad(loss, (y,))
        with torch.no_grad():
            nxt = ((y - step * grad - step * l1 * sd).clamp_min(0)) * allowed
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            v, prev, t = nxt + (t - 1) / t_next * (nxt - prev), nxt, t_next
    return prev


def sparse_support(bags: torch.Tensor, labels: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """(C, P) bool: each class's at most ``k`` parts, among ``allowed`` (C, P), by their points on the
    class's own images: v_cp times the class's mean b_p, v from the L1 fit (:data:`SPARSE_L1`); a part with
    no weight is never chosen."""
    c = allowed.shape[0]
    v = fit_nonneg(bags, labels, allowed, l1=SPARSE_L1)
    onehot = F.one_hot(labels, c).to(bags.dtype)  # (N, C)
    means = (onehot.T @ bags) / onehot.sum(0).clamp_min(1)[:, None]  # (C, P) each class's mean bag
    rank = v * means
    top = rank.topk(min(k, rank.shape[1]), dim=1).indices
    return torch.zeros_like(allowed).scatter(1, top, True) & (v > 0)


def sparsify_class_layer(module: DPNetModule, bags: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Make the class layer sparse with ``k`` parts per class (chosen among the ones it has, once sparse,
    and never a pruned part), refitted non-negative on those parts alone (:func:`fit_nonneg`);
    returns the support (C, P)."""
    live = (module.owner >= 0)[None, :].expand_as(module.classifier).to(bags.device)
    allowed = live & module.support.to(bags.device) if module.sparse else live
    with torch.enable_grad():
        support = sparse_support(bags, labels, allowed, k)
        v = fit_nonneg(bags, labels, support, l2=SPARSE_L2, steps=SPARSE_STEPS)
    module.set_support(support.to(module.support.device), v.to(module.classifier))
    log.info("class layer made sparse: %d parts per class at most, %d parts in use", k,
             int(support.any(0).sum()))
    return support
