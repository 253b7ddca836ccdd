"""Stage 2 runs: DP-Net and the global baselines on one cache, written to ``data/runs/<cache>/``.

Files of a run: ``config.json`` (resolved), ``checkpoint.pt`` (resumable fit state),
``model.pt`` (best-validation model), ``log.csv`` (one row per epoch), ``metrics.json``
(test accuracies of DP-Net and the baselines side by side). ``run_ablation`` adds
``ablation.md`` / ``ablation.csv`` for the eight constraint settings of the paper's Table 2.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from extract.cache import RegionCache, write_json_atomic

from .baselines import run_baselines
from .data import is_val
from .estimator import DPNetClassifier

log = logging.getLogger(__name__)

# The paper's settings per dataset (Table 1 and section 4); `folder` and `synth` follow CUB.
PRESETS: dict[str, dict[str, Any]] = {
    "cub": {"parts_per_class": 20, "epochs": 40, "inner_epochs": 32},
    "mit67": {"parts_per_class": 20, "epochs": 40, "inner_epochs": 32},
    "imagenet": {"parts_per_class": 10, "epochs": 4, "inner_epochs": 10},
    "synth": {"parts_per_class": 20, "epochs": 40, "inner_epochs": 32},
    "folder": {"parts_per_class": 20, "epochs": 40, "inner_epochs": 32},
}

ABLATION = {"none": (), "orth": ("orth",), "assign": ("assign",), "cs": ("cs",), "orth+assign": ("orth", "assign"),
            "cs+orth": ("cs", "orth"), "cs+assign": ("cs", "assign"), "all": ("orth", "assign", "cs")}


@dataclass
class TrainConfig:
    """Everything stage 2 needs; ``None`` fields take the dataset's preset."""

    cache: str
    run_dir: str
    parts_per_class: int | None = None
    epochs: int | None = None
    inner_epochs: int | None = None
    lr: float = 1e-3
    lr_step: int = 10
    batch_size: int = 32
    constraints: tuple[str, ...] = ("orth", "assign", "cs")
    lambdas: dict[str, float] = field(default_factory=lambda: {"orth": 1e-2, "assign": 1e-3, "cs": 1e-3})
    init: str = "random"
    val_fraction: float = 0.15
    memory_budget_mb: float | None = None
    seed: int = 0
    device: str = "auto"
    baselines: bool = True
    progress: bool = True

    def resolved(self, dataset: str) -> "TrainConfig":
        preset = PRESETS.get(dataset, PRESETS["cub"])
        return replace(self, **{k: preset[k] for k in preset if getattr(self, k) is None})


def make_estimator(cfg: TrainConfig) -> DPNetClassifier:
    return DPNetClassifier(parts_per_class=cfg.parts_per_class, epochs=cfg.epochs, inner_epochs=cfg.inner_epochs,
                           lr=cfg.lr, lr_step=cfg.lr_step, batch_size=cfg.batch_size, constraints=cfg.constraints,
                           lambda_orth=cfg.lambdas["orth"], lambda_assign=cfg.lambdas["assign"],
                           lambda_cs=cfg.lambdas["cs"], init=cfg.init, val_fraction=cfg.val_fraction,
                           memory_budget_mb=cfg.memory_budget_mb, seed=cfg.seed, device=cfg.device)


class EpochLog:
    """Appends one CSV row per epoch (rewritten whole, atomically, so a resume never duplicates)."""

    def __init__(self, path: Path, history: list[dict[str, Any]] | None = None):
        self.path, self.rows = path, list(history or [])

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
        log.info("epoch %s: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)),
                 row["epoch"])


def train_run(cfg: TrainConfig) -> dict[str, Any]:
    """Fit DP-Net (resuming from the run's checkpoint) and the baselines; write the run files."""
    cache = RegionCache(cfg.cache)
    cfg = cfg.resolved(cache.manifest["dataset"])
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "config.json", {**asdict(cfg), "cache_manifest": _manifest_summary(cache)})
    est = make_estimator(cfg)
    t0 = time.perf_counter()
    history = _checkpoint_history(run / "checkpoint.pt")
    est.fit(cache, checkpoint=run / "checkpoint.pt", on_epoch=EpochLog(run / "log.csv", history),
            progress=cfg.progress)
    fit_s = time.perf_counter() - t0
    est.save(run / "model.pt")
    metrics = {"dpnet": {**est.evaluate(cache, "test"), "val_top1": est.history_[est.best_epoch_ - 1]["val_top1"],
                         "best_epoch": est.best_epoch_, "params": int(est.module_.parts.numel() + est.module_.classifier.numel()),
                         "fit_seconds": round(fit_s, 2)},
               "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
               "n_fit": None, "cache": str(cache.path)}
    if cfg.baselines:
        metrics.update(run_baselines(cache, metrics["dpnet"]["params"], cfg.epochs, cfg.inner_epochs, cfg.lr,
                                     cfg.lr_step, cfg.batch_size, cfg.val_fraction, cfg.seed))
    metrics["n_fit"] = int((~is_val(cache.read("image_ids", "train"), cfg.val_fraction, cfg.seed)).sum())
    write_json_atomic(run / "metrics.json", metrics)
    return metrics


def _checkpoint_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    import torch

    return torch.load(path, map_location="cpu", weights_only=False).get("history", [])


def _manifest_summary(cache: RegionCache) -> dict[str, Any]:
    keys = ("dataset", "backbone", "weights", "R", "D", "image_size", "n_images", "n_train", "n_test", "n_classes")
    return {k: cache.manifest.get(k) for k in keys}


def run_ablation(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train the eight constraint settings of Table 2; write ablation.md and ablation.csv."""
    rows = []
    for name, constraints in ABLATION.items():
        sub = replace(cfg, constraints=constraints, run_dir=str(Path(cfg.run_dir) / "ablation" / name), baselines=False)
        m = train_run(sub)["dpnet"]
        rows.append({"constraints": name, "top1": round(m["top1"], 2), "mean_class": round(m["mean_class"], 2),
                     "val_top1": round(m["val_top1"], 2), "best_epoch": m["best_epoch"]})
        log.info("ablation %s: top1 %.2f", name, m["top1"])
    write_ablation(Path(cfg.run_dir), rows)
    return rows


def write_ablation(run: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    with open(run / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (run / "ablation.md").write_text("\n".join(lines) + "\n")
