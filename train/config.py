"""Stage 2's typed config: the estimator's hyper-parameters, the run's options, and named presets.

The hyper-parameters are declared once, as the fields of :class:`dpnet.train.params.FitParams` (type,
default, help, range). The estimator's signature, the command line (:func:`add_fit_arguments`)
and the saved run config are made from it; the resolved :class:`FitParams` is passed whole to
the estimator and saved with the run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dpnet.options import add_arguments, given

from .estimator import DPNetClassifier
from .params import FitParams

# Named schedules: only how long and how fast the fit runs, on top of a preset's model.
# "paper": the paper's 40 x 32 batch-level epochs at lr 1e-3 (hours on a CPU; see the README).
PAPER_SCHEDULE = {"epochs": 40, "inner_epochs": 32, "lr": 1e-3, "lr_step": 10, "lr_gamma": 0.1, "patience": 0}
SCHEDULE_KEYS = tuple(PAPER_SCHEDULE)
SCHEDULES: dict[str, dict[str, Any]] = {"default": {}, "paper": PAPER_SCHEDULE}

# Named settings. "paper": the paper's model and schedule (Table 1, section 4); "default": the
# estimator's own defaults, chosen by measurement (see the README). Per-dataset differences below.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"parts_per_class": 20, **PAPER_SCHEDULE, "batch_size": 32, "constraints": ("orth", "assign", "cs"),
              "lambda_orth": 1e-2, "lambda_assign": 1e-3, "lambda_cs": 1e-3, "init": "random", "backward": "dense",
              "entropy_regions": 0, "pca_dim": 0, "similarity": "dot", "class_layer": "free", "centre": False, "presence": 0.0,
              "project_parts": False, "prune_parts": False, "last_layer_steps": 0, "optimizer": "adam"},
    "default": {},
}
DATASET_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "imagenet": {"paper": {"parts_per_class": 10, "epochs": 4, "inner_epochs": 10}, "default": {"parts_per_class": 10}},
}


def preset(name: str, dataset: str, schedule: str = "default") -> dict[str, Any]:
    """The hyper-parameters a preset (then a schedule) sets for a dataset (the rest are the
    estimator's defaults)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known schedules: {', '.join(SCHEDULES)}")
    per_dataset = DATASET_PRESETS.get(dataset, {})
    out = {**PRESETS[name], **per_dataset.get(name, {})}
    if schedule != "default":  # the schedule's keys, with this dataset's own values of them
        out.update({**SCHEDULES[schedule],
                    **{k: v for k, v in per_dataset.get(schedule, {}).items() if k in SCHEDULE_KEYS}})
    return out


@dataclass
class TrainConfig:
    """Everything stage 2 needs.

    Attributes:
        cache: the cache folder or URL.
        run_dir: where the run's files go.
        options: hyper-parameters given explicitly; the others come from ``preset``, then from
            the estimator's defaults (see :meth:`fit_params`).
        preset: a name of :data:`PRESETS`.
        schedule: a name of :data:`SCHEDULES` (applied over the preset).
        baselines: also fit the global baselines.
        progress: show progress bars.
        views: the cache's view cache (extracted with FLIP=1), for the agree constraint.
    """

    cache: str
    run_dir: str
    options: dict[str, Any] = field(default_factory=dict)
    preset: str = "default"
    baselines: bool = True
    progress: bool = True
    schedule: str = "default"
    views: str | None = None

    def fit_params(self, dataset: str) -> FitParams:
        """The resolved hyper-parameters for a cache of ``dataset``."""
        unknown = set(self.options) - {f.name for f in dataclasses.fields(FitParams)}
        if unknown:
            raise ValueError(f"unknown hyper-parameters {sorted(unknown)}; known: {', '.join(DPNetClassifier.param_names())}")
        return FitParams(**{**preset(self.preset, dataset, self.schedule), **self.options})

    @classmethod
    def from_options(cls, cache: str, run_dir: str, preset: str = "default", baselines: bool = True,
                     progress: bool = True, schedule: str = "default", views: str | None = None,
                     **options: Any) -> "TrainConfig":
        """A config from flat keyword options (hyper-parameters mixed with the run's own)."""
        return cls(cache, run_dir, options, preset, baselines, progress, schedule, views)


# ------------------------------------------------------------------------- command line
def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name-with-dashes`` option per hyper-parameter (default: unset, so the preset applies)."""
    group = parser.add_argument_group("hyper-parameters (unset: the preset's value, then the default)")
    add_arguments(group, FitParams, switches=False)


def fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameters given on the command line."""
    return given(args, FitParams)
