"""The optimiser of U and V: Adam, or Adam with one second moment per part (``row-adam``).

Plain Adam scales every coordinate of a part by its own gradient history. On the PCA path a part's
coordinates are principal components, whose gradients differ in size by orders of magnitude, so
Adam gives the small, low-variance directions steps as large as the leading ones: the more
components D' keeps, the more of them (cub50-dev: D' 256 / 512 / 1024 -> top-1 75.5 / 73.6 / 69.9).
Sharing the second moment along each part (row) makes a part's step the same in any orthonormal
basis, the descriptor's channels or the principal components alike.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adam", "row-adam")


class RowAdam(torch.optim.Optimizer):
    """Adam whose second moment, in groups with ``row=True``, is one number per row of a 2-D
    parameter: the mean of g^2 over the row (an exponential average, bias-corrected as Adam's).
    Groups with ``row=False`` are plain Adam (no weight decay, no amsgrad).

    Shapes: a row parameter (P, W): first moment (P, W), second moment (P, 1).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, row=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((p.shape[0], 1) if group["row"] else p.shape, dtype=p.dtype,
                                                      device=p.device)
                state["step"] += 1
                g = p.grad
                sq = (g * g).mean(1, keepdim=True) if group["row"] else g * g
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).add_(sq, alpha=1 - b2)
                m = state["exp_avg"] / (1 - b1 ** state["step"])
                v = state["exp_avg_sq"] / (1 - b2 ** state["step"])
                p.sub_(group["lr"] * m / (v.sqrt() + group["eps"]))
        return None


def make_optimizer(module: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """``adam`` (torch's, over every parameter) or ``row-adam`` (:class:`RowAdam`, rows on the parts U)."""
    if name == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr)
    others = [p for n, p in module.named_parameters() if n != "parts"]
    return RowAdam([{"params": [module.parts], "row": True}, {"params": others, "row": False}], lr=lr)
