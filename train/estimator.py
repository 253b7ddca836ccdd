"""DPNetClassifier: DP-Net as a small estimator in scikit-learn's spirit, fitted from a cache.

It holds the hyper-parameters (one field each in :class:`dpnet.train.params.FitParams`, from which its
signature, docstring, validation, the typed config and the command line are made), the fitted
model (attributes ending in ``_``), prediction and save/load. ``fit(cache)`` hands the work to
:class:`dpnet.train.trainer.Trainer`: the paper's batch-level epochs, the best epoch by validation,
atomic checkpoints, and a resume that ends with the same weights.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator

from dpnet.errors import DpnetError
from dpnet.extract.cache import RegionCache, check_compatible

from .losses import KNOWN_CONSTRAINTS
from .model import DPNetModule
from .params import FIELDS, check_params, docstring_args, saved_params
from .serialize import flatten, load_file, save_file, unflatten
from .trainer import Trainer, split_scores

log = logging.getLogger(__name__)

MANIFEST_KEYS = ("dataset", "backbone", "R", "D", "image_size", "n_classes", "cache_id")


class NotFittedError(DpnetError):
    """The estimator was used before ``fit`` or ``load``."""


class DPNetClassifier(BaseEstimator):
    """Discriminative parts on cached region descriptors.

    Hyper-parameters are keyword arguments, one per field of :class:`dpnet.train.params.FitParams`
    (declared there once, with their help and range; the signature is made from it, so
    scikit-learn's ``get_params``, ``clone`` and ``repr`` work from that one declaration).

    Args:
{args}
    """

    def __init__(self, **params: Any):
        unknown = set(params) - {f.name for f in FIELDS}
        if unknown:
            raise TypeError(f"unknown hyper-parameters {sorted(unknown)}; known: {', '.join(f.name for f in FIELDS)}")
        for f in FIELDS:
            setattr(self, f.name, params.get(f.name, f.default))
        self.constraints = tuple(self.constraints)

    # ----------------------------------------------------------------------- params
    @classmethod
    def param_names(cls) -> list[str]:
        """The hyper-parameters, in signature order."""
        return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]

    def set_params(self, **params: Any) -> "DPNetClassifier":
        """scikit-learn's, with ``constraints`` kept a tuple."""
        super().set_params(**params)
        self.constraints = tuple(self.constraints)
        return self

    def _validate(self) -> None:
        check_params(self.get_params())
        if "clst" in self.constraints and self.similarity != "cosine":
            log.warning("the clst constraint pulls each part's best cosine up: it is left out with similarity=%r",
                        self.similarity)

    def _basis_dim(self, dim: int) -> int:
        """D' of the parts' subspace for descriptors of dimension ``dim``: ``pca_dim`` when it is
        below ``dim``, else 0 (nothing to gain by projecting)."""
        return self.pca_dim if 0 < self.pca_dim < dim else 0

    def make_module(self, dim: int, n_classes: int) -> DPNetModule:
        """An untrained module of this estimator's shape and loss."""
        constraints = tuple(c for c in self.constraints if c != "clst" or self.similarity == "cosine")
        return DPNetModule(dim, self.parts_per_class * n_classes, n_classes, self.parts_per_class, constraints,
                           {k: getattr(self, f"lambda_{k}") for k in KNOWN_CONSTRAINTS},
                           basis_dim=self._basis_dim(dim),
                           **{f.name: getattr(self, f.name) for f in FIELDS if f.metadata["module"]})

    # -------------------------------------------------------------------------- fit
    def fit(self, cache: RegionCache, checkpoint: str | os.PathLike | None = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
            views: RegionCache | None = None) -> "DPNetClassifier":
        """Learn U and V from the training split of ``cache`` (a :class:`dpnet.train.trainer.Trainer` runs
        the fit); resumes from ``checkpoint`` if present. ``on_epoch`` gets each epoch's log row.
        ``views``: the cache's view cache (FLIP=1), for the agree constraint."""
        self._validate()
        self.cache_manifest_ = {k: cache.manifest.get(k) for k in MANIFEST_KEYS}
        self.cache_path_ = cache.path
        self.classes_ = list(cache.manifest["classes"])
        module, state = Trainer(self, cache, views=views).run(checkpoint, on_epoch, progress)
        self.module_, self.history_, self.best_epoch_ = module, state["history"], state["best_epoch"]
        return self


    # ------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, Any]:
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        return {"params": params, "manifest": self.cache_manifest_, "classes": self.classes_}

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model with its hyper-parameters and the manifest of its cache (atomic)."""
        self._check_fitted()
        meta = {**self._meta(), "history": self.history_, "best_epoch": self.best_epoch_}
        tensors = flatten("module", self.module_.state_dict())
        if getattr(self, "class_parts_", None) is not None:
            tensors["class_parts"] = torch.from_numpy(self.class_parts_)
        save_file(Path(path), "dpnet-model", meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, cache: RegionCache | None = None) -> "DPNetClassifier":
        """Read a saved model (or a checkpoint's best state); with ``cache``, refuse it unless the
        cache is the one it was made from (same identity, D, R, C and dataset)."""
        kind, meta, tensors = load_file(Path(path), ("dpnet-model", "dpnet-fit"))
        if cache is not None:
            check_compatible(cache.manifest, meta["manifest"], f"cache {cache.path} against model {path}")
        est = cls(**saved_params(meta["params"]))
        state = unflatten("module" if kind == "dpnet-model" else "best", tensors)
        est.module_ = est.make_module(state["mean"].shape[0], state["classifier"].shape[0])
        est.module_.load_state_dict(state)
        est.module_.eval()
        est.cache_manifest_, est.classes_ = meta["manifest"], meta["classes"]
        est.history_, est.best_epoch_ = meta.get("history", []), meta.get("best_epoch", 0)
        est.class_parts_ = tensors["class_parts"].numpy() if "class_parts" in tensors else None
        return est

    # --------------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("this DPNetClassifier is not fitted: call fit(cache) or DPNetClassifier.load(path)")

    @torch.no_grad()
    def _batched(self, regions: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 64) -> np.ndarray:
        self._check_fitted()
        regions = np.asarray(regions)
        dim = self.module_.mean.shape[0]
        if regions.ndim != 3 or regions.shape[2] != dim:
            raise ValueError(f"regions must be (N, R, D={dim}), got {regions.shape}")
        dev = self.module_.mean.device
        outs = [fn(torch.from_numpy(regions[a:a + batch]).to(dev)).float().cpu().numpy()
                for a in range(0, len(regions), batch)]
        return np.concatenate(outs)

    def decision_function(self, regions: np.ndarray) -> np.ndarray:
        """Logits, float32 (N, C), from region descriptors (N, R, D)."""
        self._check_fitted()
        return self._batched(regions, self.module_)

    def predict(self, regions: np.ndarray) -> np.ndarray:
        """Class indices (N,)."""
        return self.decision_function(regions).argmax(1)

    def part_scores(self, regions: np.ndarray) -> np.ndarray:
        """b, the bag of parts (see :meth:`dpnet.train.model.DPNetModule.bag`), float32 (N, P)."""
        return self._batched(regions, lambda x: self.module_.pool(self.module_.scores(x)).b)

    def region_scores(self, regions: np.ndarray) -> np.ndarray:
        """S, float32 (N, R, P), laid out as :meth:`dpnet.train.model.DPNetModule.scores` gives it: s_pr = u_p . x_r
        on standardised descriptors."""
        return self._batched(regions, self.module_.scores, batch=32)

    def evaluate(self, cache: RegionCache, split: str = "test") -> dict[str, float]:
        """Top-1 and mean per-class accuracy (percent) on a split of ``cache``, streamed."""
        self._check_fitted()
        check_compatible(cache.manifest, self.cache_manifest_, f"cache {cache.path} against this model")
        scores, labels = split_scores(self.module_, cache, split, self.module_.mean.device, self.val_fraction, self.seed)
        return accuracy(scores.argmax(1), labels, cache.n_classes)


def _signature_from_params() -> None:
    """DPNetClassifier's signature and Args, made from FitParams (for inspect, scikit-learn's clone and help())."""
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in FIELDS]
    DPNetClassifier.__init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + fields)
    DPNetClassifier.__doc__ = DPNetClassifier.__doc__.replace("{args}", docstring_args())


_signature_from_params()


def accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """{"top1", "mean_class", "n"}: percent correct overall, and averaged over the classes present."""
    if not len(labels):
        return {"top1": float("nan"), "mean_class": float("nan"), "n": 0}
    right = pred == labels
    per = [right[labels == c].mean() for c in range(n_classes) if (labels == c).any()]
    return {"top1": float(100 * right.mean()), "mean_class": float(100 * np.mean(per)), "n": int(len(labels))}
