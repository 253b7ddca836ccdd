"""DPNetClassifier: DP-Net as a small estimator in scikit-learn's spirit, fitted from a cache.

``__init__`` stores hyper-parameters (its signature is their one definition: ``get_params``, the
typed config of ``train.config`` and the command line are built from it); ``fit(cache)`` streams
the cache's shards with the paper's batch-level epochs (``inner_epochs`` passes over each loaded
shard before the next), keeps the epoch with the best validation accuracy, and sets the learned
attributes ending in ``_``. Checkpoints are atomic; a fit interrupted and started again with the
same checkpoint path resumes and ends with the same weights.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dpnet.device import resolve_device
from dpnet.errors import CacheMismatchError, DpnetError, NonFiniteError
from dpnet.memory import large_buffers_reused
from extract.cache import RegionCache, check_compatible

from .data import Chunk, PreparedChunks, ShardSource, check_finite, pca_basis, region_stats, split_arrays
from . import distributed
from .finish import pooled_bags, project_parts, prune_parts, refit_class_layer
from .losses import KNOWN_CONSTRAINTS
from .model import POSITIVE_FOREIGN_INIT, DPNetModule
from .params import FIELDS, check_params, docstring_args
from .serialize import flatten, load_file, optimizer_parts, optimizer_state, save_file, unflatten

log = logging.getLogger(__name__)

MANIFEST_KEYS = ("dataset", "backbone", "R", "D", "image_size", "n_classes", "cache_id")
PCA_REGIONS = 64  # random regions per training image behind the PCA basis


GEMM_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_gemm_dtype(name: str, dev: torch.device) -> torch.dtype:
    """The training GEMMs' dtype: "auto" is bfloat16 on CUDA and on CPUs whose oneDNN has native
    bfloat16 (AMX / AVX512-BF16: about 2x float32 there), else float32."""
    if GEMM_DTYPES[name] is not None:
        return GEMM_DTYPES[name]
    if dev.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_bf16_units() else torch.float32


def cpu_has_bf16_units() -> bool:
    """Whether this CPU's oneDNN has native bfloat16 matrix units (AMX / AVX512-BF16)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def training_path(est: "DPNetClassifier", dev: torch.device | None = None) -> str:
    """In words, the arithmetic a fit takes on ``dev`` (default: the estimator's device): GEMM dtype
    and why, PCA or full D, the backward, and the pool + entropy kernel (logged at fit, printed by
    the benchmarks)."""
    from . import native

    dev = dev or resolve_device(est.device)
    dtype = str(resolve_gemm_dtype(est.gemm_dtype, dev)).replace("torch.", "")
    if dev.type == "cpu":
        units = "bfloat16 matrix units (AMX / AVX512-BF16)" if cpu_has_bf16_units() else "no bfloat16 matrix units (AVX2)"
        kernel = "compiled C pool + entropy" if native.load() is not None else "torch pool + entropy"
    else:
        units, kernel = dev.type, "torch pool + entropy"
    space = f"PCA {est.pca_dim}" if est.pca_dim else "full D"
    return f"GEMMs in {dtype} ({est.gemm_dtype}; {units}), {space}, {est.backward} backward, {kernel}"


class NotFittedError(DpnetError):
    """The estimator was used before ``fit`` or ``load``."""


class DPNetClassifier:
    """Discriminative parts on cached region descriptors.

    Hyper-parameters are keyword arguments, one per field of :class:`train.params.FitParams`
    (declared there once, with their help and range; the signature is made from it).

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

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyper-parameters by name (scikit-learn's contract)."""
        return {k: getattr(self, k) for k in self.param_names()}

    def set_params(self, **params: Any) -> "DPNetClassifier":
        unknown = set(params) - set(self.param_names())
        if unknown:
            raise ValueError(f"unknown hyper-parameters {sorted(unknown)}; known: {', '.join(self.param_names())}")
        for k, v in params.items():
            setattr(self, k, tuple(v) if k == "constraints" else v)
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
                           basis_dim=self._basis_dim(dim), similarity=self.similarity, class_layer=self.class_layer,
                           centre=self.centre, presence=self.presence)

    # -------------------------------------------------------------------------- fit
    def fit(self, cache: RegionCache, checkpoint: str | os.PathLike | None = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None, progress: bool = False) -> "DPNetClassifier":
        """Learn U and V from the training split of ``cache``; resumes from ``checkpoint`` if present."""
        self._validate()
        self._buf: torch.Tensor | None = None
        self._val: tuple[list[torch.Tensor], np.ndarray] | None = None
        self._cache = cache
        torch.manual_seed(self.seed)
        dev = resolve_device(self.device)
        source = ShardSource(cache, self.val_fraction, self.seed, self.memory_budget_mb)
        module = self.make_module(cache.dim, cache.n_classes).to(dev)
        log.info("training path: %s", training_path(self, dev))
        opt = torch.optim.Adam(module.parameters(), lr=self.lr)
        self.cache_manifest_ = {k: cache.manifest.get(k) for k in MANIFEST_KEYS}
        self.cache_path_ = cache.path
        self.classes_ = list(cache.manifest["classes"])
        state = self._resume(checkpoint, cache, module, opt)
        if state is None:
            self._initialise(module, source)
            state = {"epoch": 0, "history": [], "best_val": -1.0, "best_epoch": 0,
                     "best_state": {k: v.clone() for k, v in module.state_dict().items()}}
        data = source
        if module.basis is not None:  # prepare once (with the statistics and basis of the fit, or of the checkpoint)
            data = PreparedChunks(source, lambda x: module.prepare(x.to(dev)).cpu(), module.basis.shape[1],
                                  self.memory_budget_mb)
        with large_buffers_reused():
            for epoch in range(state["epoch"], self.epochs):
                if self._plateaued(state):
                    break
                self._epoch(module, opt, data, cache, epoch, dev, progress, state, checkpoint, on_epoch)
        module.load_state_dict(state["best_state"])
        if self.project_parts or self.prune_parts or self.last_layer_steps:
            with large_buffers_reused():
                self._finish(module, data, cache, dev)
        del self._buf, self._cache, self._val
        self.module_, self.history_, self.best_epoch_ = module.eval(), state["history"], state["best_epoch"]
        return self

    def _plateaued(self, state: dict[str, Any]) -> bool:
        """Whether validation top-1 has not improved for ``patience`` epochs, counted from the last
        learning-rate drop at the latest (never without a validation split). Read from the state,
        so a resumed fit stops where an unbroken one does."""
        if not self.patience or not self.val_fraction or not state["history"]:
            return False
        phase_start = (state["epoch"] - 1) // self.lr_step * self.lr_step  # epochs before this learning rate
        return state["epoch"] - max(state["best_epoch"], phase_start) >= self.patience

    def _finish(self, module: DPNetModule, data, cache: RegionCache, dev: torch.device) -> None:
        """ProtoPNet's last steps on the best state: each part replaced by its best region among its
        own class's training images, then the class layer refitted alone on the parts' scores."""
        if self.project_parts:
            project_parts(module, self._prepared_batches(module, data, dev))
        if self.prune_parts or self.last_layer_steps:
            bags, labels = pooled_bags(module, self._prepared_batches(module, data, dev))
        if self.prune_parts:
            prune_parts(module, bags, labels)
        if self.last_layer_steps:
            refit_class_layer(module, bags, labels, self.last_layer_steps, self.lr, self.seed, self.last_layer_l1)

    def _prepared_batches(self, module: DPNetModule, data, dev: torch.device, size: int = 16):
        """(z (b, R, W) prepared regions, labels (b,)) over the fitting images, in order."""
        for chunk in data.chunks():
            for a in range(0, len(chunk), size):
                idx = np.arange(a, min(a + size, len(chunk)))
                x = torch.from_numpy(np.asarray(chunk.batch(idx), np.float32)).to(dev)
                with torch.no_grad():
                    z = x if module.basis is not None else module.prepare(x)
                yield z, torch.from_numpy(chunk.labels[idx].astype(np.int64)).to(dev)

    def _epoch(self, module: DPNetModule, opt: torch.optim.Optimizer, data, cache: RegionCache, epoch: int,
               dev: torch.device, progress: bool, state: dict[str, Any], checkpoint, on_epoch) -> None:
        """One epoch, then validation, the best state, the checkpoint and the callback."""
        row = self._run_epoch(module, opt, data, epoch, dev, progress)
        row["val_top1"] = self._val_accuracy(module, cache, dev)
        if np.isnan(row["val_top1"]) or row["val_top1"] > state["best_val"]:  # no val split: keep the last
            state.update(best_val=row["val_top1"], best_epoch=epoch + 1,
                         best_state={k: v.detach().clone() for k, v in module.state_dict().items()})
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if checkpoint and distributed.is_main():  # under torchrun, rank 0 writes it
            self._save_checkpoint(Path(checkpoint), module, opt, state)
        if on_epoch:
            on_epoch(row)

    def _initialise(self, module: DPNetModule, source: ShardSource) -> None:
        pca = module.basis is not None
        mean, std, corr = region_stats(source, PCA_REGIONS if pca else 0, self.seed)
        module.mean.copy_(torch.from_numpy(mean))
        module.std.copy_(torch.from_numpy(std))
        if pca:
            module.basis.copy_(torch.from_numpy(pca_basis(corr, module.basis.shape[1])))
        p, c = module.parts.shape[0], module.classifier.shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        if self.init == "random":
            module.parts.data.copy_(torch.randn(p, module.parts.shape[1], generator=gen) / module.parts.shape[1] ** 0.5)
        else:
            module.parts.data.copy_(self._region_prototypes(module, source, gen))
        if self.init == "random" and self.similarity == "dot":
            module.classifier.data.copy_(torch.randn(c, p, generator=gen) * 0.01)
        else:
            foreign = POSITIVE_FOREIGN_INIT if self.class_layer == "positive" else -0.5
            module.classifier.data.copy_(torch.where(module.own_mask().cpu(), 1.0, foreign))

    def _region_prototypes(self, module: DPNetModule, source: ShardSource, gen: torch.Generator) -> torch.Tensor:
        """Each part starts at a random standardised region of a random training image of its class."""
        c, q, width = module.classifier.shape[0], self.parts_per_class, module.parts.shape[1]
        rng = np.random.default_rng(self.seed)
        picks: list[list[np.ndarray]] = [[] for _ in range(c)]
        for chunk in source.chunks():
            for cls in range(c):
                rows = np.flatnonzero(chunk.labels == cls)
                if len(rows) and len(picks[cls]) < 4 * q:
                    take = rng.choice(rows, size=min(len(rows), 4 * q - len(picks[cls])), replace=True)
                    regions = rng.integers(0, chunk.regions.shape[1], len(take))
                    picks[cls] += list(chunk.regions[chunk.rows[take], regions].astype(np.float32))
        out = torch.randn(c * q, width, generator=gen) / width**0.5
        for cls in range(c):
            if picks[cls]:
                chosen = rng.choice(len(picks[cls]), size=q, replace=len(picks[cls]) < q)
                x = torch.from_numpy(np.stack([picks[cls][i] for i in chosen])).to(module.mean.device)
                out[cls * q:(cls + 1) * q] = torch.nn.functional.normalize(module.prepare(x), dim=1).cpu()
        return out

    def _run_epoch(self, module: DPNetModule, opt: torch.optim.Optimizer, source, epoch: int,
                   dev: torch.device, progress: bool) -> dict[str, Any]:
        lr = self.lr * self.lr_gamma ** (epoch // self.lr_step)
        for group in opt.param_groups:
            group["lr"] = lr
        t0, sums, steps, correct, seen = time.perf_counter(), {}, 0, 0, 0
        chunks = source.chunks()
        if progress:
            chunks = tqdm(chunks, desc=f"epoch {epoch + 1}/{self.epochs}", unit="shard", leave=False)
        for chunk in chunks:
            for inner in range(self.inner_epochs):
                for terms, right, n in self._chunk_steps(module, opt, chunk, epoch, inner, dev):
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    steps, correct, seen = steps + 1, correct + right, seen + n
            del chunk  # free this shard before the next is taken (at most two in memory)
        row = {"epoch": epoch + 1, "lr": lr, "seconds": round(time.perf_counter() - t0, 3),
               "train_top1": 100.0 * correct / max(seen, 1)}
        row.update({f"loss_{k}": v / max(steps, 1) for k, v in sums.items()})
        return row

    def _micro(self, cache_shape: tuple[int, int], dev: torch.device) -> int:
        """Images per forward/backward piece: the whole batch on CUDA; on CPU the batch split
        evenly into pieces of at most about 24 MB of float32 (32 images at R=500, D=1280: 4 of 8).

        Pieces much smaller than that pay the per-piece Python and autograd cost more often; an
        uneven split (6+6+6+6+6+2) pays it for a runt piece.
        """
        if self.micro_batch > 0:
            return self.micro_batch
        if dev.type == "cuda":
            return self.batch_size
        r, d = cache_shape
        pieces = -(-self.batch_size * r * d * 4 // (24 << 20))  # ceil
        return max(1, -(-self.batch_size // max(pieces, 1)))

    def _micro_input(self, chunk: Chunk, idx: np.ndarray, dev: torch.device) -> torch.Tensor:
        """Images ``idx`` of ``chunk`` as the step's input (b, R, D): float16 on the GPU; on CPU
        float32, converted straight into one reused buffer.

        Reusing the buffer (autograd is done with it before the next micro-batch) avoids fresh
        multi-MB allocations per micro-batch, which grow glibc's heap and the process's RSS.
        """
        if dev.type != "cpu":
            return torch.from_numpy(chunk.batch(idx)).to(dev, non_blocking=True)
        need = len(idx) * chunk.regions.shape[1] * chunk.regions.shape[2]
        if self._buf is None or self._buf.numel() < need:
            self._buf = torch.empty(need, dtype=torch.float32)
        return chunk.batch_into(idx, self._buf)

    def _entropy_rows(self, rng: np.random.Generator, n: int, n_regions: int, dev: torch.device) -> torch.Tensor | None:
        """(n, k) random distinct regions per image for the entropy estimate, or None for all."""
        k = self.entropy_regions
        if not {"assign", "occur"} & set(self.constraints) or k <= 0 or k >= n_regions:
            return None
        return torch.from_numpy(rng.random((n, n_regions)).argsort(1)[:, :k]).to(dev)

    def _chunk_steps(self, module: DPNetModule, opt: torch.optim.Optimizer, chunk: Chunk, epoch: int,
                     inner: int, dev: torch.device):
        """Minibatch steps over one chunk, shuffled by (seed, epoch, shard, inner pass).

        Each step's batch is pushed through in micro-batches whose gradients add up to the
        batch's (the CE and assignment terms are means over images; the terms on U and V alone
        are added once), so memory per step stays at a few MB whatever the batch size.
        """
        order = np.random.default_rng([self.seed, epoch, chunk.shard, inner]).permutation(len(chunk))
        rows_rng = np.random.default_rng([self.seed, epoch, chunk.shard, inner, 1])
        micro = self._micro(chunk.regions.shape[1:], dev)
        prepared = module.prepares  # the data is prepared already (PCA), or each micro-batch is (cosine)
        per_batch = prepared and module.basis is None
        train = {"gemm_dtype": resolve_gemm_dtype(self.gemm_dtype, dev),
                 "sparse": self.backward == "sparse", "prepared": prepared}
        for a in range(0, len(order), self.batch_size):
            idx = np.sort(order[a:a + self.batch_size])
            opt.zero_grad(set_to_none=True)
            terms, right = {}, 0
            parts = module.step_parts(prepared)  # U folded once per step; its gradient is carried back below
            for piece, m in enumerate(range(0, len(idx), micro)):
                sub = idx[m:m + micro]
                if not distributed.mine(piece):  # another rank's share of the batch (under torchrun)
                    self._entropy_rows(rows_rng, len(sub), chunk.regions.shape[1], dev)  # same draws on every rank
                    continue
                x = self._micro_input(chunk, sub, dev)  # (b, R, D)
                if per_batch:
                    with torch.no_grad():
                        x = module.prepare(x)
                y = torch.from_numpy(chunk.labels[sub].astype(np.int64)).to(dev)
                rows = self._entropy_rows(rows_rng, len(sub), x.shape[1], dev)
                loss, part_terms, logits = module.data_loss(x, y, parts=parts, rows=rows, **train)
                if not torch.isfinite(loss):
                    self._raise_nonfinite(logits, y, chunk, sub, epoch)
                share = len(sub) / len(idx)
                (loss * share).backward()
                for k, v in part_terms.items():
                    terms[k] = terms.get(k, 0.0) + float(v.detach()) * share
                right += int((logits.argmax(1) == y).sum())
            parts.backward()
            if distributed.world()[1] > 1:
                distributed.sum_gradients([p for p in module.parameters() if p.requires_grad])
                terms, right = self._sum_terms(terms, right)
            weight, weight_terms = module.weight_loss()
            if weight_terms:
                weight.backward()
                terms.update({k: float(v.detach()) for k, v in weight_terms.items()})
            opt.step()
            yield terms, right, len(idx)

    @staticmethod
    def _sum_terms(terms: dict[str, float], right: int) -> tuple[dict[str, float], int]:
        """The step's loss terms and correct count added up over the ranks (each holds its pieces' share)."""
        keys = ("ce",) + KNOWN_CONSTRAINTS  # every term a step can log; those no rank has are dropped
        total = distributed.sum_numbers([float(right)] + [terms.get(k, 0.0) for k in keys]
                                        + [float(k in terms) for k in keys])
        return {k: total[1 + i] for i, k in enumerate(keys) if total[1 + len(keys) + i] > 0}, int(round(total[0]))

    def _raise_nonfinite(self, logits: torch.Tensor, y: torch.Tensor, chunk: Chunk, idx: np.ndarray, epoch: int):
        check_finite(chunk.batch(idx), chunk.image_ids[idx], self._cache.shard_location(chunk.shard))  # the data?
        per = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        bad = (~torch.isfinite(per)).nonzero().flatten().tolist() or [0]
        ids = [int(chunk.image_ids[idx[i]]) for i in bad]
        raise NonFiniteError(f"non-finite loss at epoch {epoch + 1}, shard {chunk.shard:05d}, image id(s) {ids[:10]}. "
                             f"Lower LR, or check those images' descriptors in the cache.")

    def _val_accuracy(self, module: DPNetModule, cache: RegionCache, dev: torch.device) -> float:
        if self.val_fraction <= 0:  # no validation images: nothing to read
            return float("nan")
        if module.basis is None:
            scores, labels = self._scores_split(module, cache, "val", dev)
        else:  # projected once (D / W times less work each epoch), like the fitting images
            if self._val is None:
                self._val = self._prepared_split(module, cache, "val", dev)
            with torch.no_grad():
                scores = np.concatenate([module(z.to(dev), prepared=True).float().cpu().numpy()
                                         for z in self._val[0]]) if self._val[0] else np.zeros((0, 1))
            labels = self._val[1]
        return float(100.0 * (scores.argmax(1) == labels).mean()) if len(labels) else float("nan")

    def _prepared_split(self, module: DPNetModule, cache: RegionCache, split: str,
                        dev: torch.device) -> tuple[list[torch.Tensor], np.ndarray]:
        """A split's regions prepared (projected) once, in batches of 64, and its labels."""
        return self._map_split(module.prepare, cache, split, dev)

    @torch.no_grad()
    def _map_split(self, fn, cache: RegionCache, split: str, dev: torch.device) -> tuple[list[torch.Tensor], np.ndarray]:
        """``fn`` over a split's raw regions in batches of 64 (outputs on the CPU), and its labels;
        a non-finite output is blamed on its descriptors, named by shard and image."""
        out, labels = [], []
        for shard, arrays in split_arrays(cache, split, self.val_fraction, self.seed, ("regions", "labels"),
                                          with_shard=True):
            for a in range(0, len(arrays["labels"]), 64):
                y = fn(torch.from_numpy(arrays["regions"][a:a + 64]).to(dev)).cpu()
                if not torch.isfinite(y).all():
                    check_finite(arrays["regions"][a:a + 64], arrays["image_ids"][a:a + 64], cache.shard_location(shard))
                out.append(y)
            labels.append(arrays["labels"])
        return out, (np.concatenate(labels) if labels else np.zeros(0, np.int64))

    # ------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, Any]:
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        return {"params": params, "manifest": self.cache_manifest_, "classes": self.classes_}

    def _save_checkpoint(self, path: Path, module: DPNetModule, opt: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
        opt_meta, opt_tensors = optimizer_parts(opt)
        meta = {**self._meta(), "opt": opt_meta, **{k: state[k] for k in ("epoch", "history", "best_val", "best_epoch")}}
        save_file(path, "dpnet-fit", meta, {**flatten("module", module.state_dict()),
                                             **flatten("best", state["best_state"]), **opt_tensors})

    def _resume(self, checkpoint: str | os.PathLike | None, cache: RegionCache, module: DPNetModule,
                opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        if not checkpoint or not Path(checkpoint).is_file():
            return None
        _, meta, tensors = load_file(Path(checkpoint), ("dpnet-fit",))
        check_compatible(cache.manifest, meta["manifest"], f"cache {cache.path} against checkpoint {checkpoint}")
        # a checkpoint from an older version lacks options added since: they had their defaults
        saved = {**type(self)().get_params(), **meta["params"]}
        saved["constraints"] = tuple(saved["constraints"])
        if saved != self.get_params():
            diff = {k: (saved.get(k), v) for k, v in self.get_params().items() if saved.get(k) != v}
            raise CacheMismatchError(f"checkpoint {checkpoint} was made with other hyper-parameters {diff}; "
                                     f"delete it to start over, or pass the same settings to resume")
        module.load_state_dict(unflatten("module", tensors))
        opt.load_state_dict(optimizer_state(meta["opt"], tensors))
        log.info("resuming from %s at epoch %d", checkpoint, meta["epoch"])
        state = {k: meta[k] for k in ("epoch", "history", "best_val", "best_epoch")}
        state["best_state"] = unflatten("best", tensors)
        return state

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
        known = set(cls.param_names())
        est = cls(**{k: v for k, v in meta["params"].items() if k in known})
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
        """b, the bag of parts (see :meth:`train.model.DPNetModule.bag`), float32 (N, P)."""
        return self._batched(regions, lambda x: self.module_.pool(self.module_.scores(x)).b)

    def region_scores(self, regions: np.ndarray) -> np.ndarray:
        """S, float32 (N, P, R): s_pr = u_p . x_r on standardised descriptors."""
        return self._batched(regions, lambda x: self.module_.scores(x).transpose(1, 2), batch=8)

    @torch.no_grad()
    def _scores_split(self, module: DPNetModule, cache: RegionCache, split: str,
                      dev: torch.device) -> tuple[np.ndarray, np.ndarray]:
        scores, labels = self._map_split(lambda x: module(x).float(), cache, split, dev)
        if not scores:
            return np.zeros((0, module.classifier.shape[0]), np.float32), labels
        return torch.cat(scores).numpy(), labels

    def evaluate(self, cache: RegionCache, split: str = "test") -> dict[str, float]:
        """Top-1 and mean per-class accuracy (percent) on a split of ``cache``, streamed."""
        self._check_fitted()
        check_compatible(cache.manifest, self.cache_manifest_, f"cache {cache.path} against this model")
        scores, labels = self._scores_split(self.module_, cache, split, self.module_.mean.device)
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
