"""The DP-Net module: parts U, class layer V, max-pooled bag of parts.

Glossary: N images, R regions, D descriptor size, P parts, C classes.
Inputs are raw region descriptors; the model standardises them with the mean and std it
was fitted with; S = U X^T, b = max_r S, b <- b / ||b||, logits = V b with no bias, so the
per-part contributions v_cp * b_p sum exactly to each logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train import native


class _PoolAndEntropy(torch.autograd.Function):
    """S = X W^T - c, then b_raw = max_r S and the assignment entropy of softmax_p(S * inv_norm).

    One op with a hand-written backward, so the (N, R, P) score tensor is walked a dozen
    times per step instead of the ~25 of the autograd graph; on the CPU in float32 the compiled
    kernel (train/native.py) walks it twice. Shapes: x (N, R, D) without grad,
    w (P, D), c (P,), inv_norm (P,) -> b_raw (N, P), mean entropy (scalar; 0 when off).
    Checked against the plain autograd composition by a float64 gradcheck.
    """

    @staticmethod
    def forward(ctx, x, w, c, inv_norm, entropy: bool):
        n, r, d = x.shape
        if x.dtype == w.dtype == c.dtype:  # the bias rides in the GEMM (beta * c): one pass fewer
            s = torch.addmm(c, x.reshape(n * r, d), w.T, alpha=1.0, beta=-1.0).view(n, r, -1)
        else:
            s = x @ w.T  # (N, R, P)
            s = (s.float() if s.dtype in (torch.bfloat16, torch.float16) else s).sub_(c)  # >= float32
        ctx.entropy, ctx.shape, ctx.w_dtype = entropy, s.shape, w.dtype
        ctx.native = x.dtype == torch.float32 and native.usable(s)
        if ctx.native:  # one pass over s here and one in the backward (train/pool_entropy.c)
            best, lse, h = native.forward(s, inv_norm, entropy)
            ctx.save_for_backward(x, s, inv_norm, lse, h, best)
            return best, (h.mean() if entropy else s.new_zeros(()))
        best, where = s.max(dim=1)  # (N, P)
        if not entropy:
            ctx.save_for_backward(x, where)
            return best, s.new_zeros(())
        logp = (s * inv_norm).log_softmax(dim=-1)
        p = logp.exp()
        plogp = p * logp  # kept: the backward reuses it
        h = plogp.sum(-1).neg_()  # (N, R)
        ctx.save_for_backward(x, where, s, p, plogp, h, inv_norm)
        return best, h.mean()

    @staticmethod
    def backward(ctx, g_best, g_entropy):
        if ctx.native:
            return _PoolAndEntropy._native_backward(ctx, g_best, g_entropy)
        x, where = ctx.saved_tensors[:2]
        n, r, _ = ctx.shape
        g_inv = None
        if ctx.entropy:
            s, p, plogp, h, inv_norm = ctx.saved_tensors[2:]
            # d mean(H) / dz = k (p log p + p H), k = -g / (N R); z = s * inv_norm. k is folded
            # into the (P,) factors, so the (N, R, P) tensor is walked three times in all.
            k = -g_entropy / (n * r)
            dz = torch.addcmul(plogp, p, h.unsqueeze(-1))  # dz / k
            g_inv = (dz * s).sum((0, 1)).mul_(k)
            ds = dz.mul_(inv_norm * k)
        else:
            ds = g_best.new_zeros(ctx.shape)
        ds.scatter_add_(1, where.unsqueeze(1), g_best.unsqueeze(1))  # max: gradient to the argmax row
        g_c = -ds.sum((0, 1))
        g_w = (ds.flatten(0, 1).T.to(x.dtype) @ x.flatten(0, 1)).to(ctx.w_dtype)  # (P, D)
        return None, g_w, g_c, g_inv, None

    @staticmethod
    def _native_backward(ctx, g_best, g_entropy):
        x, s, inv_norm, lse, h, best = ctx.saved_tensors
        n, r, _ = ctx.shape
        k = float(-g_entropy / (n * r)) if ctx.entropy else 0.0
        ds, g_inv, g_c = native.backward(s, inv_norm, lse, h, best, g_best, k, ctx.entropy)  # ds overwrites s
        g_w = ds.flatten(0, 1).T @ x.flatten(0, 1)  # (P, D)
        return None, g_w, g_c, (g_inv if ctx.entropy else None), None


class DPNetModule(nn.Module):
    """U (P, D), V (C, P), and the input standardisation (D,) buffers."""

    def __init__(self, dim: int, n_parts: int, n_classes: int):
        super().__init__()
        self.parts = nn.Parameter(torch.zeros(n_parts, dim))  # U
        self.classifier = nn.Parameter(torch.zeros(n_classes, n_parts))  # V
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def standardise(self, regions: torch.Tensor) -> torch.Tensor:
        """(N, R, D) any float dtype -> float32 (N, R, D), (x - mean) / std."""
        return (regions.float() - self.mean) / self.std

    def folded_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (P, D), c (P,)) with u_p . (x - mean) / std = W_p . x - c_p.

        The standardisation is folded into the parts, so the standardised descriptors are never
        materialised: one GEMM per batch.
        """
        return self.parts / self.std, (self.mean / self.std) @ self.parts.T

    def scores(self, regions: torch.Tensor) -> torch.Tensor:
        """Raw Tensor[N, R, D] -> Tensor[N, R, P], s_pr = u_p . (x_r - mean) / std."""
        w, c = self.folded_parts()
        return regions.to(w.dtype) @ w.T - c  # (N, R, P)

    def region_scores(self, regions: torch.Tensor) -> torch.Tensor:
        """S: raw Tensor[N, R, D] -> Tensor[N, P, R]."""
        return self.scores(regions).transpose(1, 2)

    @staticmethod
    def pool(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N, R, P) -> b, L2-normalised (N, P), and each part's argmax region (N, P)."""
        best, where = scores.max(dim=1)
        return F.normalize(best, dim=1), where

    def bag(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b (N, P) and the argmax region of each part (N, P), from raw (N, R, D)."""
        return self.pool(self.scores(regions))

    def forward_scores(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and the scores (N, R, P) they came from (reused by the assignment term)."""
        s = self.scores(regions)
        b, _ = self.pool(s)
        return b @ self.classifier.T, s

    def training_fold(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W (P, D), c (P,), 1/||u_p|| (P,)): what the fused training op takes from U."""
        w, c = self.folded_parts()
        return w, c, 1.0 / self.parts.norm(dim=1).clamp_min(1e-12)

    def step_parts(self) -> "StepParts":
        """The folded parts of one optimiser step, shared by its micro-batches (see StepParts)."""
        return StepParts(self)

    def forward_train(self, regions: torch.Tensor, entropy: bool, gemm_dtype: torch.dtype = torch.float32,
                      parts: "StepParts | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and the mean assignment entropy (0 when ``entropy`` is off) for training.

        Same numbers as ``forward_scores`` followed by ``assignment_entropy_from_scores``, in one
        fused op that never keeps the autograd graph of the (N, R, P) scores. The two GEMMs run
        in ``gemm_dtype`` (bfloat16 on CUDA); everything after them in float32. With ``parts``
        (from ``step_parts``) the folded U is taken from there and its gradient collects there
        until ``parts.backward()``; without, it is folded here and the gradient reaches U directly.
        """
        w, c, inv_norm = self.training_fold() if parts is None else (parts.w, parts.c, parts.inv_norm)
        if gemm_dtype != w.dtype:
            w = w.to(gemm_dtype)
        best, ent = _PoolAndEntropy.apply(regions.to(gemm_dtype), w, c, inv_norm, entropy)
        return F.normalize(best, dim=1) @ self.classifier.T, ent

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """Raw Tensor[N, R, D] -> logits Tensor[N, C]."""
        return self.forward_scores(regions)[0]


class StepParts:
    """W (P, D), c (P,) and 1/||u_p|| (P,) folded once per optimiser step, as leaves.

    A step's micro-batches all use the same U, so folding it (and back-propagating through the
    fold) once per step instead of once per micro-batch saves a few (P, D) passes each time:
    each micro-batch's backward stops at these leaves, and ``backward()`` carries their summed
    gradients into U at the end of the step.
    """

    def __init__(self, module: DPNetModule):
        self._graph = module.training_fold()
        self.w, self.c, self.inv_norm = (t.detach().requires_grad_() for t in self._graph)

    def backward(self) -> None:
        """Add the gradient collected on the leaves to U (a no-op when nothing reached them)."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self._graph, (self.w, self.c, self.inv_norm))
                 if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
