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

    def scores(self, regions: torch.Tensor) -> torch.Tensor:
        """Raw Tensor[N, R, D] -> Tensor[N, R, P], s_pr = u_p . (x_r - mean) / std.

        The standardisation is folded into the parts, (u / std) . x - (u / std) . mean, so the
        standardised descriptors are never materialised: one GEMM per batch.
        """
        w = self.parts / self.std  # (P, D)
        return regions.to(w.dtype) @ w.T - (self.mean / self.std) @ self.parts.T  # (N, R, P)

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

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """Raw Tensor[N, R, D] -> logits Tensor[N, C]."""
        return self.forward_scores(regions)[0]
