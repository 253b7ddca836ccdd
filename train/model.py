"""The DP-Net module: parts U, class layer V, max-pooled bag of parts.

Glossary: N images, R regions, D descriptor size, P parts, C classes.
Inputs are standardised region descriptors (the model holds the mean and std it was
fitted with); S = U X^T, b = max_r S, b <- b / ||b||, logits = V b with no bias, so the
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

    def region_scores(self, x: torch.Tensor) -> torch.Tensor:
        """S: standardised Tensor[N, R, D] -> Tensor[N, P, R], s_pr = u_p . x_r."""
        return torch.einsum("nrd,pd->npr", x, self.parts)

    def bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b, L2-normalised, Tensor[N, P], and the argmax region of each part, Tensor[N, P]."""
        s = self.region_scores(x)  # (N, P, R)
        best, where = s.max(dim=2)  # (N, P)
        return F.normalize(best, dim=1), where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised Tensor[N, R, D] -> logits Tensor[N, C]."""
        b, _ = self.bag(x)
        return b @ self.classifier.T  # (N, C)
