"""Global baselines on the stored global descriptor (mean of the whole map), tuned fairly.

Each baseline chooses its regularisation on the same validation split as DP-Net (carved
from the training images) and keeps its best validation epoch, as DP-Net does:
- ``global_linear``: one linear layer; weight decay chosen on validation.
- ``global_mlp``: two layers with about DP-Net's parameter count (hidden ~ P); weight
  decay chosen on validation.
- ``global_logreg``: scikit-learn's logistic regression on the standardised descriptor,
  its C chosen on validation.
The torch baselines use DP-Net's schedule (``lr`` divided by 10 every ``lr_step`` epochs,
``epochs x inner_epochs`` passes over the data) with AdamW, whose decoupled weight decay is the
regularisation chosen on validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpnet.extract.cache import RegionCache

from .data import check_finite, split_arrays
from .estimator import accuracy
from .serialize import save_file

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
LINEAR_KIND = "dpnet-global-linear"
LOGREG_CS = (0.01, 0.1, 1.0, 10.0)
# The torch baselines' matrices are tiny (a batch of 32 by D x C or D x h): on a 2-core AVX2 machine one
# thread was never slower than two beside a busy process, and alone faster in some runs, slower in
# others (benchmarks/bench_contention.py --baselines-only, README "Sharing the cores").
BASELINE_THREADS = 1


@dataclass
class GlobalData:
    """Standardised global descriptors: fit (train minus val), val and test splits, and the
    fit split's mean and std (D,) they were standardised with."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    n_classes: int
    mean: np.ndarray
    std: np.ndarray


def load_global(cache: RegionCache, val_fraction: float, seed: int) -> GlobalData:
    """The global descriptors of the fit, val and test splits, standardised with the fit split's statistics.

    Raises:
        NonFiniteError: a descriptor holds NaN or inf; names its shard and image.
    """
    x, y = {}, {}
    for split in ("fit", "val", "test"):
        parts = []
        for shard, arrays in split_arrays(cache, split, val_fraction, seed, ("global", "labels"), with_shard=True):
            if not np.isfinite(arrays["global"]).all():
                check_finite(arrays["global"], arrays["image_ids"], cache.shard_location(shard), "global descriptors")
            parts.append(arrays)
        x[split] = np.concatenate([p["global"] for p in parts]).astype(np.float32) if parts else np.zeros((0, cache.dim), np.float32)
        y[split] = np.concatenate([p["labels"] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    mean, std = x["fit"].mean(0), x["fit"].std(0) + 1e-3
    return GlobalData({k: (v - mean) / std for k, v in x.items()}, y, cache.n_classes, mean, std)


def mlp_hidden(dim: int, n_classes: int, dpnet_params: int) -> int:
    """Hidden width h with D*h + h + h*C + C about DP-Net's parameter count."""
    return max(1, round((dpnet_params - n_classes) / (dim + 1 + n_classes)))


def _make_net(kind: str, dim: int, n_classes: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, n_classes)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def _train_torch(data: GlobalData, kind: str, hidden: int, wd: float, epochs: int, passes: int, lr: float,
                 lr_step: int, batch_size: int, seed: int) -> tuple[nn.Module, float]:
    """Train one net; returns it at its best validation epoch, with that accuracy."""
    torch.manual_seed(seed)
    net = _make_net(kind, data.x["fit"].shape[1], data.n_classes, hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    x, y = torch.from_numpy(data.x["fit"]), torch.from_numpy(data.y["fit"])
    xv, yv = torch.from_numpy(data.x["val"]), torch.from_numpy(data.y["val"])
    best, best_state = -1.0, None
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * 0.1 ** (epoch // lr_step)
        net.train()
        for _ in range(passes):
            for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // batch_size)):
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            val = float((net(xv).argmax(1) == yv).float().mean()) * 100 if len(yv) else 0.0
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net, best


def fit_torch_baseline(data: GlobalData, kind: str, hidden: int, epochs: int, passes: int, lr: float,
                       lr_step: int, batch_size: int, seed: int) -> tuple[dict, nn.Module]:
    """Grid over weight decay on validation; test accuracy of the chosen net, and the net. Trains in
    :data:`BASELINE_THREADS` torch threads, and gives the caller's count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BASELINE_THREADS)
    try:
        trials = [(wd, *_train_torch(data, kind, hidden, wd, epochs, passes, lr, lr_step, batch_size, seed))
                  for wd in WEIGHT_DECAYS]
    finally:
        torch.set_num_threads(threads)
    wd, net, val = max(trials, key=lambda t: t[2])
    with torch.no_grad():
        pred = net(torch.from_numpy(data.x["test"])).argmax(1).numpy()
    out = accuracy(pred, data.y["test"], data.n_classes)
    out.update(val_top1=val, weight_decay=wd, params=sum(p.numel() for p in net.parameters()))
    return out, net


def fit_logreg(data: GlobalData) -> dict:
    """scikit-learn logistic regression, C chosen on validation."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in LOGREG_CS:
        clf = LogisticRegression(C=c, max_iter=2000).fit(data.x["fit"], data.y["fit"])
        val = float((clf.predict(data.x["val"]) == data.y["val"]).mean() * 100) if len(data.y["val"]) else 0.0
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    out = accuracy(clf.predict(data.x["test"]), data.y["test"], data.n_classes)
    out.update(val_top1=val, C=c)
    return out


def run_baselines(cache: RegionCache, dpnet_params: int, epochs: int, passes: int, lr: float, lr_step: int,
                  batch_size: int, val_fraction: float, seed: int, linear_file: Path | None = None) -> dict[str, dict]:
    """All three global baselines, side by side; the linear one's weights go to ``linear_file``
    (the report draws its class activation maps, the CAM baseline of the faithfulness measures)."""
    data = load_global(cache, val_fraction, seed)
    hidden = mlp_hidden(cache.dim, cache.n_classes, dpnet_params)
    common = dict(epochs=epochs, passes=passes, lr=lr, lr_step=lr_step, batch_size=batch_size, seed=seed)
    linear, net = fit_torch_baseline(data, "linear", 0, **common)
    if linear_file is not None:
        save_file(linear_file, LINEAR_KIND, {"cache_id": cache.cache_id},
                  {"weight": net.weight.detach(), "bias": net.bias.detach(), "mean": torch.from_numpy(data.mean),
                   "std": torch.from_numpy(data.std)})
    return {"global_linear": linear,
            "global_mlp": {**fit_torch_baseline(data, "mlp", hidden, **common)[0], "hidden": hidden},
            "global_logreg": fit_logreg(data)}
