"""The DP-Net module: the one home of its maths.

Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
Inputs are raw region descriptors; the module standardises them with the training statistics
it holds, folded into the parts so that the scores stay one GEMM::

    s_pr = u_p . (x_r - mean) / std                scores S (N, R, P) ("dot", the paper's)
    s_pr = cos(u_p, (x_r - mean) / std)             ("cosine")
    b_p = max_r s_pr,  b <- b / ||b||               the bag of parts (N, P); with cosine the maxima
                                                    themselves (they are bounded already)
    logits = V b                                    (N, C): v_cp b_p are exact per-part contributions
    loss = CE + l_orth C_orth + l_assign C_assign + l_cs C_cs          (docs: method.md)
           + l_clst C_clst                          (cosine: each class's parts present in its images)
           + l_occur C_occur                        (region grouping's occurrence prior, off by default)
           + l_agree C_agree                        (two views agree: assignments and peaks; needs a view cache)

With ``class_layer="owned"`` V keeps only each class's own parts (v_cp = 0 for p not of c), so
every class is explained by its own parts alone.

Every stage computes these through this module: training (:meth:`DPNetModule.loss`, backed by
one fused op), prediction, and the analysis (thin numpy wrappers in ``dpnet.analyze.explain``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dpnet.train import native

from .losses import CONSTRAINTS, KNOWN_CONSTRAINTS, class_specific, distribution_agreement, occurrence_cost
from .losses import orthogonality, part_classes
from .params import CLASS_LAYERS, FIELDS, SIMILARITIES

# each term's default weight: its lambda_<term> field's (declared once, in train/params.py)
LAMBDAS = {k: next(f.default for f in FIELDS if f.name == f"lambda_{k}") for k in KNOWN_CONSTRAINTS}
POSITIVE_FOREIGN_INIT = 0.01  # a positive layer's start for other classes' parts: alive (ReLU), nearly silent
PEAK_SHARPEN = 5.0  # a part's soft peak over regions: softmax_r of its assignment logits times this (cosine: x 50)
COSINE_ASSIGN_SCALE = 10.0  # cosines times this are the assignment logits (softmax over P parts of values in
# [-1, 1] would be nearly uniform whatever the parts)


class Pooled(NamedTuple):
    """The max-pool of scores (N, R, P) over regions."""

    b: torch.Tensor  # (N, P) the bag of parts (see DPNetModule.bag)
    raw: torch.Tensor  # (N, P) each part's best score, before normalisation
    where: torch.Tensor  # (N, P) int64, each part's best region


class _TrainOp(torch.autograd.Function):
    """S = X W^T - c, b_raw = max_r S, and the mean assignment entropy of softmax_p(S_r * inv_norm)
    over the regions ``rows`` (all when None), in one op that never keeps an autograd graph of S.

    Backward, two ways to the same gradient:
      - dense (``sparse=False``): dS (N, R, P) holds the max's gradient at each argmax and the
        entropy's on its rows, and dW = dS^T X is a second GEMM as large as the forward's.
      - sparse: the max's part of dW is a gather of the N P argmax rows, sum_n g_np x_{n r*(n, p)};
        the entropy's part runs over its rows only, dS_e^T X_e. With a few entropy rows per
        image the backward costs a small fraction of the forward GEMM.
    On the CPU in float32 the pool and the entropy run in the compiled kernel (train/native.py).
    Shapes: x (N, R, D) without grad, w (P, D), c (P,), inv_norm (P,), rows (N, R') int64 or None
    -> b_raw (N, P), where (N, P), mean entropy (scalar; 0 when off).
    """

    @staticmethod
    def forward(ctx, x, w, c, inv_norm, rows, entropy: bool, sparse: bool):
        n, r, d = x.shape
        if x.dtype == w.dtype == c.dtype:  # the bias rides in the GEMM (beta * c): one pass fewer
            s = torch.addmm(c, x.reshape(n * r, d), w.T, alpha=1.0, beta=-1.0).view(n, r, -1)
        else:
            s = x @ w.T  # (N, R, P)
            s = (s.float() if s.dtype in (torch.bfloat16, torch.float16) else s).sub_(c)  # >= float32
        use_native = native.usable(s)
        whole = entropy and rows is None  # entropy on every region: one kernel pass gives all
        if use_native:
            best, where, lse, h = native.forward(s, inv_norm, whole)
        else:
            best, where = s.max(dim=1)
            lse = h = None
        s_e = pick_rows(s, rows) if entropy else None
        if entropy and not whole and use_native:
            _, _, lse, h = native.forward(s_e, inv_norm, True)
        plogp = p = None
        if entropy and not use_native:
            logp = (s_e * inv_norm).log_softmax(dim=-1)
            p = logp.exp()
            plogp = p * logp  # kept: the backward reuses it
            h = plogp.sum(-1).neg_()  # (N, R')
        ctx.entropy, ctx.sparse, ctx.native, ctx.whole = entropy, sparse, use_native, whole
        ctx.shape, ctx.w_dtype = s.shape, w.dtype
        ctx.save_for_backward(x, s, s_e, rows, inv_norm, best, where, lse, h, p, plogp)
        ctx.mark_non_differentiable(where)
        return best, where, (h.mean() if entropy else s.new_zeros(()))

    @staticmethod
    def backward(ctx, g_best, _g_where, g_entropy):
        x, s, s_e, rows, inv_norm, best, where, lse, h, p, plogp = ctx.saved_tensors
        n, r, _ = ctx.shape
        g_best = g_best.to(s.dtype).contiguous()
        if ctx.native and ctx.whole and not ctx.sparse:  # the old single pass: max and entropy together
            k = float(-g_entropy / (n * r))
            ds, g_inv, g_c = native.backward(s, inv_norm, lse, h, best, g_best, k, True)  # overwrites s
            return None, _gemm_grad(ds, x, ctx.w_dtype), g_c, g_inv, None, None, None
        ds_e, g_inv, g_c_e = _entropy_grad(ctx, s_e, inv_norm, lse, h, best, p, plogp, g_entropy)
        if ctx.sparse:
            g_w = _argmax_grad(x, where, g_best)
            if ds_e is not None:
                x_e = pick_rows(x, rows)
                g_w += _gemm_grad(ds_e, x_e, g_w.dtype)
            g_c = -g_best.sum(0) + (g_c_e if ds_e is not None else 0.0)
            return None, g_w.to(ctx.w_dtype), g_c, g_inv, None, None, None
        if ds_e is not None and rows is None:
            ds = ds_e  # the entropy's dS covers every region already
        else:
            ds = s.zero_() if ctx.native else torch.zeros_like(s)  # the kernel's path reuses S's buffer
            if ds_e is not None:
                ds.scatter_add_(1, rows.unsqueeze(-1).expand(-1, -1, ds.shape[2]), ds_e)
        ds.scatter_add_(1, where.unsqueeze(1), g_best.unsqueeze(1))  # max: gradient to the argmax row
        return None, _gemm_grad(ds, x, ctx.w_dtype), -ds.sum((0, 1)), g_inv, None, None, None


def _entropy_grad(ctx, s_e, inv_norm, lse, h, best, p, plogp, g_entropy):
    """dL/dS_e (N, R', P) of the mean entropy (in S_e's buffer), dL/d inv_norm (P,), dL/dc (P,)."""
    if not ctx.entropy:
        return None, None, None
    n, r_e, _ = s_e.shape
    k = -g_entropy / (n * r_e)
    if ctx.native:  # g = 0: the kernel's max term vanishes, only the entropy's gradient is written
        zeros = torch.zeros_like(best)
        return native.backward(s_e, inv_norm, lse, h, best, zeros, float(k), True)
    # d mean(H) / dz = k (p log p + p H), z = s * inv_norm; k is folded into the (P,) factors
    dz = torch.addcmul(plogp, p, h.unsqueeze(-1))  # dz / k
    g_inv = (dz * s_e).sum((0, 1)).mul_(k)
    ds_e = dz.mul_(inv_norm * k)
    return ds_e, g_inv, -ds_e.sum((0, 1))


def _gemm_grad(ds: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dW = dS^T X: (N, R, P) and (N, R, D) -> (P, D)."""
    return (ds.flatten(0, 1).T.to(x.dtype) @ x.flatten(0, 1)).to(out_dtype)


def _argmax_grad(x: torch.Tensor, where: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_n g_np x_{n, where_np}: the max-pool's dW as a gather of N P rows. -> float32 (P, D).

    One row gather and one reduction over N. (An einsum here becomes a matmul batched over the P parts,
    which on the CPU copies each part's operands apart from D of a few hundred on: P times the ops.)"""
    rows = take_rows(x, where)  # (N, P, D): each part's argmax row
    return (rows.to(g.dtype) * g.unsqueeze(-1)).sum(0)


class DPNetModule(nn.Module):
    """U (P, D), V (C, P), the input standardisation (D,) buffers, and the loss's settings.

    With ``basis_dim`` = D' > 0 the parts live in a D'-dimensional subspace of the standardised
    descriptors, spanned by the orthonormal columns of ``basis`` (D, D'): ``parts`` is then
    (P, D') and the parts in descriptor space are ``parts @ basis.T``. Scores, norms and inner
    products of parts are the same in both spaces (u . x = u' . x' for u in the subspace), so
    the trainer can work on projected descriptors x' = basis^T (x - mean) / std, D / D' times
    cheaper, while everything that scores raw descriptors (prediction, the analysis) does not
    see the difference.

    Args:
        dim: D. n_parts: P. n_classes: C.
        parts_per_class: q; each class has q parts (losses.part_classes says which).
        constraints: subset of ("orth", "assign", "cs") in the loss.
        lambdas: weight of each constraint (defaults: method.md's).
        basis_dim: D' of the parts' subspace; 0: the parts live in descriptor space.
        similarity: "dot" (the paper's) or "cosine" (parts and standardised regions normalised).
        class_layer: "free" (any part for any class) or "owned" (each class weighs its own parts only).
        centre: subtract from each image's standardised regions their mean over the image, so parts
            meet what distinguishes a region within its image, not what the whole image shares.
        presence: cosine bag only: a part counts max(best cosine - presence, 0).
        class_top_k: K > 0: a class's logit is the sum of its K contributions v_cp b_p of largest size
            (see :meth:`contributions`); 0: V b, every part.
        sparse_parts: K > 0: the class layer can be made sparse (:meth:`set_support`): each class then
            weighs at most K parts, with non-negative weights (``support`` (C, P) says which); until
            then it is the ``class_layer`` one. 0: never.
    """

    def __init__(self, dim: int, n_parts: int, n_classes: int, parts_per_class: int = 1,
                 constraints: tuple[str, ...] = CONSTRAINTS, lambdas: dict[str, float] | None = None,
                 basis_dim: int = 0, similarity: str = "dot", class_layer: str = "free", centre: bool = False,
                 presence: float = 0.0, class_top_k: int = 0, sparse_parts: int = 0):
        super().__init__()
        self.parts = nn.Parameter(torch.zeros(n_parts, basis_dim or dim))  # U, or U' in the subspace
        self.classifier = nn.Parameter(torch.zeros(n_classes, n_parts))  # V
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("basis", torch.zeros(dim, basis_dim) if basis_dim else None)
        self.parts_per_class, self.constraints = parts_per_class, tuple(constraints)
        # each part's class (losses.part_classes); -1 once pruned (finish.prune_parts)
        self.register_buffer("owner", part_classes(n_parts, parts_per_class))
        self.lambdas = {**LAMBDAS, **(lambdas or {})}
        if similarity not in SIMILARITIES or class_layer not in CLASS_LAYERS:
            raise ValueError(f"similarity must be one of {SIMILARITIES} and class_layer one of {CLASS_LAYERS}, "
                             f"got {similarity!r} and {class_layer!r}")
        self.similarity, self.class_layer, self.centre = similarity, class_layer, centre
        self.presence = float(presence)  # cosine bag: max(best - presence, 0); 0 keeps the best cosine
        self.class_top_k = int(class_top_k)  # a class's logit: its K weightiest v_cp b_p; 0: all of them
        # with sparse_parts: the parts each class may weigh (C, P), and whether the layer is sparse yet (a 0-d
        # buffer, so that a checkpoint knows; mirrored in ``sparse`` so class_weights needs no device sync)
        self.register_buffer("support", torch.ones(n_classes, n_parts, dtype=torch.bool) if sparse_parts else None)
        self.register_buffer("made_sparse", torch.zeros((), dtype=torch.bool) if sparse_parts else None)
        self.sparse = False

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; a state saved before pruning existed has no ``owner``: each part is its class's."""
        if "owner" not in state_dict:
            state_dict = {**state_dict, "owner": self.owner.clone()}
        out = super().load_state_dict(state_dict, strict, assign)
        self.sparse = self.made_sparse is not None and bool(self.made_sparse)
        return out

    @torch.no_grad()
    def set_support(self, support: torch.Tensor, weights: torch.Tensor) -> None:
        """Make the class layer sparse: class c weighs only the parts where ``support`` (C, P) is true, with
        the non-negative ``weights`` (C, P) (:func:`dpnet.train.finish.sparsify_class_layer` chooses both)."""
        if self.support is None:
            raise ValueError("set_support needs a module made with sparse_parts > 0")
        self.support.copy_(support)
        self.classifier.copy_(weights * support)
        self.made_sparse.fill_(True)
        self.sparse = True

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator, parts: torch.Tensor | None = None) -> None:
        """U and V's start. U: ``parts`` (P, W) when given (e.g. training regions), else Gaussian with
        variance 1/W. V: with the paper's dot similarity and Gaussian parts, small Gaussian weights;
        else +1 on each class's own parts and -0.5 on the others' (free; owned masks them), or
        POSITIVE_FOREIGN_INIT with the positive class layer (alive under its ReLU, nearly silent).
        Draws from ``gen`` in that order (U, then V)."""
        p, width = self.parts.shape
        gaussian = parts is None
        if gaussian:
            parts = torch.randn(p, width, generator=gen) / width**0.5
        self.parts.copy_(parts)
        if gaussian and self.similarity == "dot":
            self.classifier.copy_(torch.randn(self.classifier.shape, generator=gen) * 0.01)
        else:
            foreign = POSITIVE_FOREIGN_INIT if self.class_layer == "positive" else -0.5
            self.classifier.copy_(torch.where(self.own_mask(), 1.0, foreign))

    # ------------------------------------------------------------------ the model
    def standardise(self, regions: torch.Tensor) -> torch.Tensor:
        """(N, R, D) any float dtype -> (x - mean) / std (N, R, D) in the module's dtype (float32)."""
        return (regions.to(self.mean.dtype) - self.mean) / self.std

    def descriptor_parts(self) -> torch.Tensor:
        """U in descriptor space, (P, D)."""
        return self.parts if self.basis is None else self.parts @ self.basis.T

    def fold(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows A (K, D) that act on standardised descriptors -> (A' (K, D), c (K,)) with
        A_k . (x - mean) / std = A'_k . x - c_k: the standardisation folded into a linear map."""
        return rows / self.std, (self.mean / self.std) @ rows.T

    def folded_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (P, D), c (P,)) with u_p . (x - mean) / std = W_p . x - c_p."""
        return self.fold(self.descriptor_parts())

    def project(self, regions: torch.Tensor) -> torch.Tensor:
        """Raw (N, R, D) (or any (..., D)) -> the standardised descriptors in the parts' subspace,
        float32 (N, R, D').

        The standardisation rides in the GEMM: ((x - mean) / std) B = x (B / std) - (mean / std) B,
        one addmm and no elementwise pass over the (N, R, D) descriptors (half of a projection's time
        on CPU when it was one)."""
        b, c = self.fold(self.basis.T)  # (D', D), (D',)
        flat = regions.reshape(-1, regions.shape[-1]).to(b.dtype)
        return torch.addmm(c, flat, b.T, beta=-1.0).view(*regions.shape[:-1], b.shape[0])

    @property
    def prepares(self) -> bool:
        """Whether scoring needs the regions prepared (projected, centred or normalised) rather than raw."""
        return self.basis is not None or self.similarity == "cosine" or self.centre

    def prepare(self, regions: torch.Tensor) -> torch.Tensor:
        """Raw (N, R, D) -> what the parts meet, float32 (N, R, W): the standardised descriptors, in
        the parts' subspace when there is one, centred on the image's mean (``centre``), of unit
        length with cosine similarity."""
        z = self.standardise(regions) if self.basis is None else self.project(regions)
        if self.centre:
            z = z - z.mean(dim=1, keepdim=True)
        return F.normalize(z, dim=-1) if self.similarity == "cosine" else z

    def unit_parts(self) -> torch.Tensor:
        """The parts as the scores use them, (P, W): normalised with cosine similarity."""
        return F.normalize(self.parts, dim=1) if self.similarity == "cosine" else self.parts

    def scores(self, regions: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        """S: raw Tensor[N, R, D] -> float32 Tensor[N, R, P], s_pr = u_p . (x_r - mean) / std (or its cosine).
        ``prepared``: the regions are :meth:`prepare`'s output (N, R, W) already."""
        if prepared:
            return regions @ self.unit_parts().T
        if self.prepares:
            return self.prepare(regions) @ self.unit_parts().T
        w, c = self.folded_parts()
        return regions.to(w.dtype) @ w.T - c

    def pool(self, scores: torch.Tensor, keep: torch.Tensor | None = None) -> Pooled:
        """Scores (N, R, P) -> :class:`Pooled`. ``keep`` (N, R) bool leaves regions out of the max
        (a part with no region left scores 0)."""
        if keep is not None:
            scores = scores.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        raw, where = scores.max(dim=1)
        if keep is not None:
            raw = _none_left_as_zero(raw)
        return Pooled(self.bag(raw), raw, where)

    def pool_removed(self, scores: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """One image's bag with regions left out, for M sets at once: scores (R, P), removed (M, R)
        bool -> b (M, P), equal to ``pool(scores.expand(M, R, P), ~removed).b``.

        Only each part's k best regions are looked at (k = the most regions a set removes, plus
        one): the best region left is among them. Cost M k P, not M R P.
        """
        r = scores.shape[0]
        k = min(int(removed.sum(1).max()) + 1, r)
        top, idx = scores.topk(k, dim=0)  # (k, P), best first
        left = ~removed[:, idx]  # (M, k, P): which of each part's k best are still there
        raw = torch.where(left, top, float("-inf")).amax(1)  # (M, P) the best one left (13x an argmax of the first)
        return self.bag(_none_left_as_zero(raw))

    def bag(self, best: torch.Tensor) -> torch.Tensor:
        """Each part's best score (N, P) -> the bag of parts b: L2-normalised (dot); with cosine, as is, or
        with ``presence`` > 0 how far it passes that cosine (0 below): a part then counts only where it is
        found, so an image's decision rests on the few parts present, not on every part a little."""
        if self.similarity != "cosine":
            return F.normalize(best, dim=1)
        return F.relu(best - self.presence) if self.presence > 0 else best

    def class_weights(self) -> torch.Tensor:
        """V as the logits use it, (C, P): with an owned class layer, zero outside each class's own parts;
        with a positive one (PIP-Net's), its non-negative part, so that every point of evidence is a part
        found, never a part missed. A pruned part (owner -1, :func:`dpnet.train.finish.prune_parts`) weighs
        nothing in any class. Once made sparse (:meth:`set_support`), only each class's supported parts weigh,
        none negatively."""
        if self.class_layer == "owned":
            v = self.classifier * self.own_mask()
        else:
            v = self.classifier if self.class_layer == "free" else F.relu(self.classifier)
            v = v * (self.owner >= 0)  # pruned parts (owner -1) weigh nothing; no branch, so no device sync
        if self.sparse:  # sparse_parts, once sparse: each class's few non-negative weights
            v = F.relu(v) * self.support
        return v

    def own_mask(self) -> torch.Tensor:
        """(C, P) bool: true where part p belongs to class c."""
        c = self.classifier.shape[0]
        return self.owner[None, :] == torch.arange(c, device=self.owner.device)[:, None]

    def own_parts(self, cls: int) -> torch.Tensor:
        """The ids (q,) of the parts class ``cls`` owns."""
        return torch.nonzero(self.owner == cls).flatten()

    def logits(self, b: torch.Tensor) -> torch.Tensor:
        """Bag of parts (N, P) -> logits (N, C) = V b (with ``class_top_k``, each class's K weightiest terms)."""
        if self.class_top_k:
            return self.contributions(b).sum(-1)
        return b @ self.class_weights().T

    def contributions(self, b: torch.Tensor) -> torch.Tensor:
        """v_cp * b_p, (N, C, P); summed over P it gives the logits. With ``class_top_k`` = K > 0 only
        each (image, class)'s K terms of largest size (for or against) are kept, the rest are 0: a
        decision then rests on at most 2 K parts (K of each of the two top classes)."""
        points = b.unsqueeze(1) * self.class_weights().unsqueeze(0)
        if not self.class_top_k or self.class_top_k >= points.shape[-1]:
            return points
        chosen = points.abs().topk(self.class_top_k, dim=-1).indices  # (N, C, K)
        return torch.zeros_like(points).scatter(-1, chosen, points.gather(-1, chosen))

    def forward(self, regions: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        """Raw Tensor[N, R, D] (or prepared (N, R, W)) -> logits Tensor[N, C]."""
        return self.logits(self.pool(self.scores(regions, prepared)).b)

    # ------------------------------------------------------------------- the loss
    def training_fold(self, prepared: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, c (P,), a (P,)): what the fused training op takes from U: S = X W^T - c, and the
        assignment logits S * a. W is (P, D) folded for raw descriptors, or the (unit) parts (P, W)
        for :meth:`prepare`-d ones (then c = 0). a is 1/||u_p|| (dot), or a constant scale (cosine)."""
        p, inv_norm = self.parts.shape[0], self.assign_scale()
        if prepared:
            return self.unit_parts(), self.parts.new_zeros(p), inv_norm
        w, c = self.folded_parts()
        return w, c, inv_norm

    def assign_scale(self) -> torch.Tensor:
        """a (P,): the assignment logits are S * a; 1/||u_p|| (dot), or COSINE_ASSIGN_SCALE (cosine)."""
        if self.similarity == "cosine":
            return self.parts.new_full((self.parts.shape[0],), COSINE_ASSIGN_SCALE)
        return 1.0 / self.parts.norm(dim=1).clamp_min(1e-12)

    def step_parts(self, prepared: bool = False) -> "StepParts":
        """The folded parts of one optimiser step, shared by its micro-batches (see StepParts)."""
        return StepParts(self, prepared)

    def forward_train(self, regions: torch.Tensor, entropy: bool, gemm_dtype: torch.dtype = torch.float32,
                      parts: "StepParts | None" = None, rows: torch.Tensor | None = None,
                      sparse: bool = False, prepared: bool = False) -> "TrainOut":
        """Logits (N, C), the mean assignment entropy (0 when ``entropy`` is off) and each part's
        best score (N, P), for training.

        The same numbers as :meth:`forward` and the entropy of softmax_p(S / ||u_p||), from one fused
        op. The GEMMs run in ``gemm_dtype`` (bfloat16 on CUDA), everything after them in float32.
        ``rows`` (N, R') picks the regions the entropy is averaged over (all when None): a random
        subset gives an unbiased estimate of the mean and of its gradient. ``sparse`` takes the
        gather backward (see _TrainOp). ``prepared``: ``regions`` are already :meth:`prepare`-d.
        With ``parts`` (from :meth:`step_parts`) the folded U is taken from there and its gradient
        collects there until ``parts.backward()``.
        """
        w, c, inv_norm = self.training_fold(prepared) if parts is None else (parts.w, parts.c, parts.inv_norm)
        if gemm_dtype != w.dtype:
            w = w.to(gemm_dtype)
        best, _, ent = _TrainOp.apply(regions.to(gemm_dtype), w, c, inv_norm, rows, entropy, sparse)
        return TrainOut(self.logits(self.bag(best)), ent, best)

    def data_loss(self, regions: torch.Tensor, labels: torch.Tensor, view: torch.Tensor | None = None,
                  **train) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The terms of one batch (CE, l_assign C_assign, l_clst C_clst, ...): (loss, terms, logits).
        ``view``: the same images' view (N, R, D or W), region r the mirror of region r, for C_agree.
        ``train``: see :meth:`forward_train`."""
        assign = "assign" in self.constraints
        out = self.forward_train(regions, assign, **train)
        terms = {"ce": F.cross_entropy(out.logits, labels)}
        if assign:
            terms["assign"] = out.entropy
        if "clst" in self.constraints:
            terms["clst"] = cluster_cost(out.best, labels, self.part_classes())
        if "occur" in self.constraints:
            terms["occur"] = occurrence_cost(self.occurrence(regions, train.get("rows"), train.get("prepared", False)),
                                             labels, self.owner)
        if "agree" in self.constraints:
            if view is None:
                raise ValueError("the agree constraint needs a view of each image (train --views <cache>)")
            terms["agree"] = self.view_agreement(regions, view, labels, train.get("rows"), train.get("prepared", False))
        loss = terms["ce"] + sum(self.lambdas[k] * v for k, v in terms.items() if k != "ce")
        return loss, terms, out.logits

    def occurrence(self, regions: torch.Tensor, rows: torch.Tensor | None = None,
                   prepared: bool = False) -> torch.Tensor:
        """tau (N, P): each part's occurrence in each image, region grouping's part detector: the most
        any region is assigned to it, max_r softmax_p(s_pr a_p) with the assignment logits of C_assign.
        ``rows`` (N, R') takes those regions only (the assignment entropy's random ones), else all."""
        s = self.scores(pick_rows(regions, rows), prepared)  # (N, R', P)
        return (s * self.assign_scale()).softmax(dim=-1).amax(dim=1)

    def part_classes(self) -> torch.Tensor:
        """(P,) the class each part is made for (losses.part_classes), pruned parts included: what the
        constraints group parts by."""
        return part_classes(self.parts.shape[0], self.parts_per_class, self.parts.device)

    def own_index(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, q) the parts each image's class is made with (:meth:`part_classes`)."""
        return self.part_classes().argsort(stable=True).view(-1, self.parts_per_class)[labels]

    def view_agreement(self, regions: torch.Tensor, view: torch.Tensor, labels: torch.Tensor,
                       rows: torch.Tensor | None = None, prepared: bool = False) -> torch.Tensor:
        """C_agree (issue 16 lever 3, PIP-Net's alignment in the cache): two views of each image (region r
        of ``view`` shows the mirror of region r) should (1) assign each region alike, over the regions
        ``rows`` (all when None): the assignment softmax_p(s_pr a_p) of C_assign; and (2) put each of the
        image's own class's parts at the same region: its soft peak softmax_r(s_pr a_p PEAK_SHARPEN).
        Each is -mean log of the two distributions' dot product (losses.distribution_agreement);
        C_agree is their sum.
        """
        a = self.assign_scale()
        z, z_view = (self.scores(pick_rows(x, rows), prepared) * a for x in (regions, view))  # (N, R', P) logits
        own = self.own_index(labels)  # (N, q)
        if prepared:
            u = self.unit_parts()[own]  # (N, q, W)
            peaks = [torch.einsum("nrw,nqw->nrq", x.to(u.dtype), u) for x in (regions, view)]
        else:  # raw descriptors: score every part, keep the own ones (tests and small models)
            peaks = [self.scores(x).gather(2, own.unsqueeze(1).expand(-1, x.shape[1], -1)) for x in (regions, view)]
        sharp = a[own].unsqueeze(1) * PEAK_SHARPEN  # (N, 1, q)
        pi, pi_view = ((s * sharp).transpose(1, 2) for s in peaks)  # soft-peak logits over regions (N, q, R)
        return distribution_agreement(z, z_view) + distribution_agreement(pi, pi_view)

    def weight_loss(self) -> tuple[torch.Tensor, dict]:
        """The terms on U and V alone (C_orth, C_cs), weighted and summed: (loss, terms)."""
        terms = {}
        if "orth" in self.constraints:
            terms["orth"] = orthogonality(self.parts)
        if "cs" in self.constraints and self.class_layer != "owned":  # owned: foreign weights are 0 already
            terms["cs"] = class_specific(self.class_weights(), self.part_classes())
        loss = sum((self.lambdas[k] * v for k, v in terms.items()), self.parts.new_zeros(()))
        return loss, terms

    def loss(self, regions: torch.Tensor, labels: torch.Tensor, **train) -> tuple[torch.Tensor, dict]:
        """The training loss of one batch, every switched-on term: (loss, terms).

        The trainer splits a step's batch into micro-batches: it sums their :meth:`data_loss`,
        weighted by their share of the batch, and adds :meth:`weight_loss` once; that equals this.
        """
        data, terms, _ = self.data_loss(regions, labels, **train)
        weight, more = self.weight_loss()
        return data + weight, {**terms, **more}


def _none_left_as_zero(raw: torch.Tensor) -> torch.Tensor:
    """A masked max-pool's (..., P) best scores, with -inf (no region left to a part) read as 0."""
    return torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))


def pick_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x (N, R, K) -> x at the regions ``rows`` (N, R') of each image, (N, R', K); all of x when None."""
    return x if rows is None else take_rows(x, rows)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, R, K) and index (N, M) into R -> (N, M, K), row ``index[n, m]`` of image n: x.gather along R,
    as whole rows of K values (an index_select of the flattened rows, not a gather value by value)."""
    n, r, k = x.shape
    flat = (index + torch.arange(n, device=index.device).unsqueeze(1) * r).reshape(-1)
    return x.reshape(n * r, k).index_select(0, flat).view(n, index.shape[1], k)


class TrainOut(NamedTuple):
    """What :meth:`DPNetModule.forward_train` returns."""

    logits: torch.Tensor  # (N, C)
    entropy: torch.Tensor  # () mean assignment entropy, 0 when off
    best: torch.Tensor  # (N, P) each part's best score


def cluster_cost(best: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """C_clst = mean over images of 1 - the mean best cosine of their class's own parts.

    ProtoPNet's cluster cost in cosine form: each of a class's parts should find a close region in
    every image of the class, which makes it a part the class always shows. best: (N, P), labels (N,),
    classes (P,): each part's class (losses.part_classes).
    """
    own = (labels[:, None] == classes.to(labels.device)[None, :]).to(best.dtype)  # (N, P)
    return (1.0 - (best * own).sum(1) / own.sum(1).clamp_min(1)).mean()


class StepParts:
    """W (P, D), c (P,) and 1/||u_p|| (P,) folded once per optimiser step, as leaves.

    A step's micro-batches all use the same U, so folding it (and back-propagating through the
    fold) once per step instead of once per micro-batch saves a few (P, D) passes each time:
    each micro-batch's backward stops at these leaves, and ``backward()`` carries their summed
    gradients into U at the end of the step.
    """

    def __init__(self, module: DPNetModule, prepared: bool = False):
        self._graph = module.training_fold(prepared)
        self.w, self.c, self.inv_norm = (t.detach().requires_grad_() for t in self._graph)

    def backward(self) -> None:
        """Add the gradient collected on the leaves to U (a no-op when nothing reached them)."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self._graph, (self.w, self.c, self.inv_norm))
                 if leaf.grad is not None and t.requires_grad]  # prepared input: c is a constant 0
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
