"""Stage 2 runs: DP-Net and the global baselines on one cache, written to ``data/runs/<cache>/``.

Files of a run: ``config.json`` (resolved), ``checkpoint.pt`` (resumable fit state),
``model.pt`` (best-validation model with its class-level part weights d(p, c)), ``log.csv``
(one row per epoch), ``metrics.json`` (test accuracies of DP-Net and the baselines side by
side), ``global_linear.pt`` (the linear baseline, for its class activation maps). ``run_ablation`` adds ``ablation.md`` / ``ablation.csv`` for the eight constraint
settings of the paper's Table 2. The run folder is locked while a run works in it; temporary
files of dead runs are removed when the next one starts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dpnet.errors import CacheMismatchError, CheckpointMismatchError, DpnetError
from dpnet.files import FolderLock, claim_folder, keep_mark, read_json, remove_stale_temps, write_json_atomic
from dpnet.files import write_text_atomic
from dpnet.extract.cache import RegionCache, is_url

from . import distributed
from .baselines import run_baselines
from .class_parts import fit_class_parts
from .config import SCHEDULE_KEYS, TrainConfig
from .data import is_val
from .estimator import DPNetClassifier
from .serialize import load_file

log = logging.getLogger(__name__)

ABLATION = {"none": (), "orth": ("orth",), "assign": ("assign",), "cs": ("cs",), "orth+assign": ("orth", "assign"),
            "cs+orth": ("cs", "orth"), "cs+assign": ("cs", "assign"), "all": ("orth", "assign", "cs")}


class EpochLog:
    """Writes ``log.csv``: one row per epoch, the whole file rewritten atomically each time."""

    def __init__(self, path: Path, history: list[dict[str, Any]] | None = None):
        self.path, self.rows = path, list(history or [])

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()
        log.info("epoch %s: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)),
                 row["epoch"])

    def write(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        out = io.StringIO()
        w = csv.DictWriter(out, keys)
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, out.getvalue())


def train_run(cfg: TrainConfig) -> dict[str, Any]:
    """Fit DP-Net (resuming from the run's checkpoint) and the baselines; write the run files.

    Raises:
        InUseError: another live process works in the run folder.
    """
    if distributed.world()[0] > 0:  # under torchrun: rank 0 claims and locks the folder; the others only fit
        distributed.barrier()
        return _follow(cfg)
    run = claim_folder(Path(cfg.run_dir), "training", RUN_FILES)
    with FolderLock(run, "training"):
        keep_mark(run, "training")
        remove_stale_temps(run)
        distributed.barrier()
        return _train_locked(cfg, run)


def _follow(cfg: TrainConfig) -> dict[str, Any]:
    """A rank > 0's part of a run: the same fit, from the same checkpoint; rank 0 writes everything."""
    cache = RegionCache(cfg.cache)
    est = DPNetClassifier(**dataclasses.asdict(cfg.fit_params(cache.manifest["dataset"])))
    est.fit(cache, checkpoint=Path(cfg.run_dir) / "checkpoint.pt", views=_views(cfg))
    return {}


def _views(cfg: TrainConfig) -> RegionCache | None:
    return RegionCache(cfg.views) if cfg.views else None


# What a run folder of an older version (before marks) holds: such a folder is still a run.
RUN_FILES = (r"\.lock|config\.json|checkpoint\.pt|model\.pt|log\.csv|metrics\.json|global_linear\.pt|report|explain|"
             r"ablation(\.md|\.csv)?")


def _train_locked(cfg: TrainConfig, run: Path) -> dict[str, Any]:
    cache = RegionCache(cfg.cache)
    warn_thin_classes(cache)
    fit = cfg.fit_params(cache.manifest["dataset"])
    write_json_atomic(run / "config.json", {"cache": cfg.cache, "run_dir": cfg.run_dir, "preset": cfg.preset,
                                            "schedule": cfg.schedule, "views": cfg.views,
                                            "baselines": cfg.baselines, "fit": _jsonable(fit),
                                            "cache_manifest": _manifest_summary(cache)})
    est = DPNetClassifier(**dataclasses.asdict(fit))
    epochs = EpochLog(run / "log.csv", _checkpoint_history(run / "checkpoint.pt"))
    epochs.write()  # a run killed between its checkpoint and its log row gets the row back here
    t0 = time.perf_counter()
    try:
        est.fit(cache, checkpoint=run / "checkpoint.pt", on_epoch=epochs, progress=cfg.progress, views=_views(cfg))
    except CheckpointMismatchError as exc:  # the run folder's checkpoint; a view's mismatch says its own fix
        raise CacheMismatchError(f"{exc}\nThe run folder {run} holds the training of another cache: delete it to "
                                 f"train afresh here (rm -r {run}), or train into a new folder (--run-dir, or "
                                 f"extract with --name to give the cache, and so its run, another name).") from None
    fit_s = time.perf_counter() - t0
    fit_class_parts(est, cache)
    est.save(run / "model.pt")
    metrics = {"dpnet": {**est.evaluate(cache, "test"), "val_top1": est.history_[est.best_epoch_ - 1]["val_top1"],
                         "best_epoch": est.best_epoch_, "params": int(est.module_.parts.numel() + est.module_.classifier.numel()),
                         "fit_seconds": round(fit_s, 2)},
               "config": {"preset": cfg.preset, "schedule": cfg.schedule, **_jsonable(fit)}, "n_fit": None,
               **cache_reference(cache.path, run)}
    if cfg.baselines:
        metrics.update(run_baselines(cache, metrics["dpnet"]["params"], fit.epochs, fit.inner_epochs, fit.lr,
                                     fit.lr_step, fit.batch_size, fit.val_fraction, fit.seed, run / "global_linear.pt"))
    metrics["n_fit"] = int((~is_val(cache.read("image_ids", "train"), fit.val_fraction, fit.seed)).sum())
    write_json_atomic(run / "metrics.json", metrics)
    return metrics


MIN_TRAIN_PER_CLASS = 2


def warn_thin_classes(cache: RegionCache) -> list[str]:
    """Warn (and return the warnings) for classes with fewer than MIN_TRAIN_PER_CLASS training images:
    their parts learn from nothing, or from one picture, and a class only in the test split cannot
    be predicted at all."""
    labels = np.asarray(cache.read("labels", "train"), np.int64)
    counts = np.bincount(labels, minlength=cache.n_classes)
    names = cache.manifest["classes"]
    thin = [f"{names[c]!r} ({int(counts[c])})" for c in range(cache.n_classes) if counts[c] < MIN_TRAIN_PER_CLASS]
    if not thin:
        return []
    msg = (f"warning: {len(thin)} class(es) of {cache.path} have fewer than {MIN_TRAIN_PER_CLASS} training images: "
           f"{', '.join(thin[:10])}{' ...' if len(thin) > 10 else ''}. Their parts learn from (almost) nothing, and "
           f"a class with no training image is never predicted: add images or drop the class folder.")
    log.warning(msg)
    return [msg]


def cache_reference(cache: Path | str, run: Path) -> dict[str, str]:
    """How a run names its cache in metrics.json: the absolute path, and the path from the run folder
    (so a run finds its cache from any working folder, and after the two are moved together)."""
    if is_url(cache):
        return {"cache": str(cache)}
    cache = Path(cache).resolve()
    return {"cache": str(cache), "cache_from_run": os.path.relpath(cache, Path(run).resolve())}


def read_run(run: Path) -> tuple[dict[str, Any], Path | str]:
    """A finished run's metrics and the location of its cache.

    Raises:
        DpnetError: the run has no model, or its training did not finish (no metrics.json), or
            its cache is found nowhere (the message says where it looked and the fix).
    """
    run = Path(run)
    if not (run / "model.pt").is_file():
        raise DpnetError(f"no trained model in {run} (model.pt missing): run `make train` first, or pass RUN=<run folder>")
    if not (run / "metrics.json").is_file():
        raise DpnetError(f"the training of {run} did not finish (model.pt is there, metrics.json is not): run the same "
                         f"`make train` again to finish it (it resumes from its checkpoint)")
    metrics = read_json(run / "metrics.json", "run `make train` again to rewrite it", DpnetError)
    ref = metrics.get("cache", "")
    if is_url(ref):
        return metrics, ref
    tried = [Path(ref)]
    if metrics.get("cache_from_run"):
        tried.append(run / metrics["cache_from_run"])
    if not Path(ref).is_absolute():  # runs of older versions: relative to the folder above data/runs/<run>
        tried.append(run.resolve().parent.parent.parent / ref)
    for path in tried:
        if (path / "manifest.json").is_file():
            return metrics, path
    raise DpnetError(f"the cache of run {run} is not where it was ({', '.join(map(str, dict.fromkeys(tried)))}): "
                     f"extract it again with the same settings (`make extract ...`), or move it back")


def _jsonable(fit: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(fit).items()}


def _checkpoint_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return load_file(path, ("dpnet-fit",))[1].get("history", [])


def _manifest_summary(cache: RegionCache) -> dict[str, Any]:
    keys = ("dataset", "backbone", "weights", "R", "D", "image_size", "n_images", "n_train", "n_test", "n_classes",
            "cache_id")
    return {k: cache.manifest.get(k) for k in keys}


def run_ablation(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train the eight constraint settings of Table 2 on the run's model, then the run's own
    setting and the paper's model (``PRESET=paper``) at the run's schedule (the paper's own
    takes hours on a CPU: ``SCHEDULE=paper``); write ablation.md and ablation.csv."""
    rows = []
    fit = cfg.fit_params(RegionCache(cfg.cache).manifest["dataset"])
    schedule = {k: getattr(fit, k) for k in SCHEDULE_KEYS}
    settings = [(name, replace(cfg, options={**cfg.options, "constraints": constraints}))
                for name, constraints in ABLATION.items()]
    settings += [(f"{cfg.preset} preset ({'+'.join(fit.constraints) or 'none'})", cfg),
                 ("paper preset, this schedule", replace(cfg, preset="paper", options={**cfg.options, **schedule}))]
    for name, setting in settings:
        folder = re.sub(r"[^A-Za-z0-9+_-]+", "_", name).strip("_")
        sub = replace(setting, run_dir=str(Path(cfg.run_dir) / "ablation" / folder), baselines=False)
        m = train_run(sub)["dpnet"]
        rows.append({"constraints": name, "top1": round(m["top1"], 2), "mean_class": round(m["mean_class"], 2),
                     "val_top1": round(m["val_top1"], 2), "best_epoch": m["best_epoch"]})
        log.info("ablation %s: top1 %.2f", name, m["top1"])
    write_ablation(Path(cfg.run_dir), rows)
    return rows


def write_ablation(run: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    out = io.StringIO()
    w = csv.DictWriter(out, keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(run / "ablation.csv", out.getvalue())
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    write_text_atomic(run / "ablation.md", "\n".join(lines) + "\n")
