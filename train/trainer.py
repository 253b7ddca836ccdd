"""The fit's machinery: the epoch loop, micro-batches, validation and checkpoints.

:class:`Trainer` runs one fit of a :class:`dpnet.train.estimator.DPNetClassifier` (which keeps the
hyper-parameters, the fitted model, prediction and save/load): the paper's batch-level epochs
(``inner_epochs`` passes over each loaded shard before the next), the best epoch by validation
accuracy, atomic checkpoints, and a resume that ends with the same weights as an unbroken fit.
Glossary: N images, R regions, D descriptor size, P parts, C classes, q parts per class.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dpnet.device import resolve_device
from dpnet.errors import CacheMismatchError, CheckpointMismatchError, ConfigError, NonFiniteError
from dpnet.memory import large_buffers_reused
from dpnet.extract.cache import RegionCache, check_compatible

from . import distributed
from .data import Chunk, PreparedChunks, ShardSource, check_finite, pca_basis, region_stats, split_arrays
from .finish import pooled_bags, project_parts, prune_parts, refit_class_layer, sparse_stages, sparsify_class_layer
from .gemm import resolve_gemm_dtype, training_path
from .losses import KNOWN_CONSTRAINTS
from .model import DPNetModule
from .optim import make_optimizer
from .params import saved_params
from .serialize import flatten, load_file, optimizer_parts, optimizer_state, save_file, unflatten

if TYPE_CHECKING:
    from .estimator import DPNetClassifier

log = logging.getLogger(__name__)

PCA_REGIONS = 64  # random regions per training image behind the PCA basis


class Trainer:
    """One fit of ``est`` on ``cache``: reads the hyper-parameters from the estimator, writes nothing
    to it (the estimator sets its fitted attributes from :meth:`run`'s result).

    Args:
        est: the estimator whose hyper-parameters (and checkpoint metadata) this fit uses.
        cache: the region cache to fit on (None only for driving single steps in tests).
        device: where to train (default: the estimator's ``device``).
        views: a view cache of ``cache`` (FLIP=1), for the agree constraint.
    """

    def __init__(self, est: "DPNetClassifier", cache: RegionCache | None = None, device: torch.device | None = None,
                 views: RegionCache | None = None):
        self.est, self.cache, self.views = est, cache, views
        self.dev = device or resolve_device(est.device)
        self._buf: torch.Tensor | None = None  # the reused CPU input buffer of the micro-batches
        self._val: tuple[list[torch.Tensor], np.ndarray] | None = None  # the projected validation split

    def run(self, checkpoint: str | os.PathLike | None = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None,
            progress: bool = False) -> tuple[DPNetModule, dict[str, Any]]:
        """Train from the start, or from ``checkpoint`` when it exists; returns the module (at its best
        epoch, finished by projection / pruning / the last-layer refit when asked) and the state
        (``history``, ``best_epoch``, ...)."""
        est, cache, dev = self.est, self.cache, self.dev
        torch.manual_seed(est.seed)
        if ("agree" in est.constraints) != (self.views is not None):
            raise ConfigError("the agree constraint and a view cache go together: pass --views <the cache extracted "
                              "with FLIP=1> with --constraints ...,agree, or neither")
        source = ShardSource(cache, est.val_fraction, est.seed, est.memory_budget_mb, self.views)
        module = est.make_module(cache.dim, cache.n_classes).to(dev)
        log.info("training path: %s", training_path(est, dev))
        opt = make_optimizer(module, est.optimizer, est.lr)
        state = self._resume(checkpoint, cache, module, opt)
        if state is None:
            self._initialise(module, source)
            state = {"epoch": 0, "history": [], "best_val": -1.0, "best_epoch": 0,
                     "best_state": {k: v.clone() for k, v in module.state_dict().items()}}
        data = source
        if module.basis is not None:  # prepare once (with the statistics and basis of the fit, or of the checkpoint)
            data = PreparedChunks(source, lambda x: module.prepare(x.to(dev)).cpu(), module.basis.shape[1],
                                  est.memory_budget_mb)
        with large_buffers_reused():
            for epoch in range(state["epoch"], est.epochs):
                if state.get("sparse_from") is not None or self._plateaued(state):
                    break
                self._epoch(module, opt, data, cache, epoch, dev, progress, state, checkpoint, on_epoch)
            if est.sparse_parts:
                self._sparse_stages(module, opt, data, cache, dev, progress, state, checkpoint, on_epoch)
        module.load_state_dict(state["best_state"])
        if est.project_parts or est.prune_parts or est.last_layer_steps:
            with large_buffers_reused():
                self._finish(module, data, cache, dev)
        self._buf = self._val = None
        return module.eval(), state

    def _sparse_stages(self, module: DPNetModule, opt: torch.optim.Optimizer, data, cache: RegionCache,
                       dev: torch.device, progress: bool, state: dict[str, Any], checkpoint, on_epoch) -> None:
        """``sparse_parts`` K: from the best epoch, stages of :data:`SPARSE_STAGES` x K parts per class. Each
        stage chooses its parts and refits V on them (:func:`sparsify_class_layer`, on the fitting images'
        bags), then fine-tunes U and V for ``sparse_epochs`` with a fresh optimiser at ``sparse_lr``. The
        best epoch is then the last stage's best (the model must be K-sparse). The epochs count on from the
        last dense one (``state["sparse_from"]``), so a resumed fit takes up the stage it was in."""
        est = self.est
        stages = sparse_stages(est.sparse_parts, module.parts.shape[0])
        if state.get("sparse_from") is None:
            state["sparse_from"] = state["epoch"]
            module.load_state_dict(state["best_state"])
        n = est.sparse_epochs
        for i in range(state["epoch"] - state["sparse_from"], len(stages) * n):
            stage, step = divmod(i, n)
            if step == 0:
                bags, labels = pooled_bags(module, self._prepared_batches(module, data, dev))
                sparsify_class_layer(module, bags, labels, stages[stage])
                del bags
                opt.load_state_dict(make_optimizer(module, est.optimizer, est.sparse_lr).state_dict())
                if stage == len(stages) - 1:
                    state.update(best_val=-1.0)
            self._epoch(module, opt, data, cache, state["epoch"], dev, progress, state, checkpoint, on_epoch,
                        lr=est.sparse_lr, extra={"sparse_parts": stages[stage]})

    def _plateaued(self, state: dict[str, Any]) -> bool:
        """Whether validation top-1 has not improved for ``patience`` epochs, counted from the last
        learning-rate drop at the latest (never without a validation split). Read from the state,
        so a resumed fit stops where an unbroken one does."""
        if not self.est.patience or not self.est.val_fraction or not state["history"]:
            return False
        phase_start = (state["epoch"] - 1) // self.est.lr_step * self.est.lr_step  # epochs before this learning rate
        return state["epoch"] - max(state["best_epoch"], phase_start) >= self.est.patience

    def _finish(self, module: DPNetModule, data, cache: RegionCache, dev: torch.device) -> None:
        """ProtoPNet's last steps on the best state: each part replaced by its best region among its
        own class's training images, then the class layer refitted alone on the parts' scores."""
        if self.est.project_parts:
            project_parts(module, self._prepared_batches(module, data, dev))
        if self.est.prune_parts or self.est.last_layer_steps:
            bags, labels = pooled_bags(module, self._prepared_batches(module, data, dev))
        if self.est.prune_parts:
            prune_parts(module, bags, labels)
        if self.est.last_layer_steps:
            refit_class_layer(module, bags, labels, self.est.last_layer_steps, self.est.lr, self.est.seed, self.est.last_layer_l1)

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
               dev: torch.device, progress: bool, state: dict[str, Any], checkpoint, on_epoch,
               lr: float | None = None, extra: dict[str, Any] | None = None) -> None:
        """One epoch (at ``lr``, else the schedule's), then validation, the best state, the checkpoint and
        the callback; ``extra`` joins the epoch's log row."""
        row = self._run_epoch(module, opt, data, epoch, dev, progress, lr)
        row.update(extra or {})
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
        """The standardisation (and PCA basis) from the training regions, then U and V (the module's rule)."""
        pca = module.basis is not None
        mean, std, corr = region_stats(source, PCA_REGIONS if pca else 0, self.est.seed)
        module.mean.copy_(torch.from_numpy(mean))
        module.std.copy_(torch.from_numpy(std))
        if pca:
            module.basis.copy_(torch.from_numpy(pca_basis(corr, module.basis.shape[1])))
        gen = torch.Generator().manual_seed(self.est.seed)
        parts = None if self.est.init == "random" else self._region_prototypes(module, source, gen)
        module.init_weights(gen, parts)

    def _region_prototypes(self, module: DPNetModule, source: ShardSource, gen: torch.Generator) -> torch.Tensor:
        """Each part starts at a random standardised region of a random training image of its class."""
        c, q, width = module.classifier.shape[0], self.est.parts_per_class, module.parts.shape[1]
        rng = np.random.default_rng(self.est.seed)
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
                   dev: torch.device, progress: bool, lr: float | None = None) -> dict[str, Any]:
        if lr is None:
            lr = self.est.lr * self.est.lr_gamma ** (epoch // self.est.lr_step)
        for group in opt.param_groups:
            group["lr"] = lr
        t0, sums, steps, correct, seen = time.perf_counter(), {}, 0, 0, 0
        chunks = source.chunks()
        if progress:
            chunks = tqdm(chunks, desc=f"epoch {epoch + 1}" + ("" if epoch >= self.est.epochs else f"/{self.est.epochs}"),
                          unit="shard", leave=False)
        for chunk in chunks:
            for inner in range(self.est.inner_epochs):
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
        if self.est.micro_batch > 0:
            return self.est.micro_batch
        if dev.type == "cuda":
            return self.est.batch_size
        r, d = cache_shape
        pieces = -(-self.est.batch_size * r * d * 4 // (24 << 20))  # ceil
        return max(1, -(-self.est.batch_size // max(pieces, 1)))

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

    @staticmethod
    def _view_input(module: DPNetModule, chunk: Chunk, idx: np.ndarray, dev: torch.device,
                    prepare: bool) -> torch.Tensor | None:
        """The view of the images ``idx`` (b, R, D or W) as the step takes them, or None without views."""
        if chunk.view is None:
            return None
        v = torch.from_numpy(np.asarray(chunk.view_batch(idx), np.float32)).to(dev)
        if prepare:
            with torch.no_grad():
                v = module.prepare(v)
        return v

    def _entropy_rows(self, rng: np.random.Generator, n: int, n_regions: int, dev: torch.device) -> torch.Tensor | None:
        """(n, k) random distinct regions per image for the entropy estimate, or None for all."""
        k = self.est.entropy_regions
        if not {"assign", "occur", "agree"} & set(self.est.constraints) or k <= 0 or k >= n_regions:
            return None
        return torch.from_numpy(rng.random((n, n_regions)).argsort(1)[:, :k]).to(dev)

    def _chunk_steps(self, module: DPNetModule, opt: torch.optim.Optimizer, chunk: Chunk, epoch: int,
                     inner: int, dev: torch.device):
        """Minibatch steps over one chunk, shuffled by (seed, epoch, shard, inner pass).

        Each step's batch is pushed through in micro-batches whose gradients add up to the
        batch's (the CE and assignment terms are means over images; the terms on U and V alone
        are added once), so memory per step stays at a few MB whatever the batch size.
        """
        order = np.random.default_rng([self.est.seed, epoch, chunk.shard, inner]).permutation(len(chunk))
        rows_rng = np.random.default_rng([self.est.seed, epoch, chunk.shard, inner, 1])
        micro = self._micro(chunk.regions.shape[1:], dev)
        prepared = module.prepares  # the data is prepared already (PCA), or each micro-batch is (cosine)
        per_batch = prepared and module.basis is None
        train = {"gemm_dtype": resolve_gemm_dtype(self.est.gemm_dtype, dev),
                 "sparse": self.est.backward == "sparse", "prepared": prepared}
        for a in range(0, len(order), self.est.batch_size):
            idx = np.sort(order[a:a + self.est.batch_size])
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
                view = self._view_input(module, chunk, sub, dev, per_batch)
                loss, part_terms, logits = module.data_loss(x, y, view, parts=parts, rows=rows, **train)
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
        check_finite(chunk.batch(idx), chunk.image_ids[idx], self.cache.shard_location(chunk.shard))  # the data?
        per = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        bad = (~torch.isfinite(per)).nonzero().flatten().tolist() or [0]
        ids = [int(chunk.image_ids[idx[i]]) for i in bad]
        raise NonFiniteError(f"non-finite loss at epoch {epoch + 1}, shard {chunk.shard:05d}, image id(s) {ids[:10]}. "
                             f"Lower LR, or check those images' descriptors in the cache.")

    def _val_accuracy(self, module: DPNetModule, cache: RegionCache, dev: torch.device) -> float:
        """Top-1 % on the validation split; under torchrun each rank scores its share of the images
        (:func:`dpnet.train.data.split_arrays`) and the ranks add their counts."""
        if self.est.val_fraction <= 0:  # no validation images: nothing to read
            return float("nan")
        share = distributed.world()
        if module.basis is None:
            scores, labels = split_scores(module, cache, "val", dev, self.est.val_fraction, self.est.seed, share)
        else:  # projected once (D / W times less work each epoch), like the fitting images
            if self._val is None:
                self._val = map_split(module.prepare, cache, "val", dev, self.est.val_fraction, self.est.seed, share)
            with torch.no_grad():
                scores = np.concatenate([module(z.to(dev), prepared=True).float().cpu().numpy()
                                         for z in self._val[0]]) if self._val[0] else np.zeros((0, 1))
            labels = self._val[1]
        right, n = distributed.sum_numbers([float((scores.argmax(1) == labels).sum()), float(len(labels))])
        return float(100.0 * (right / n)) if n else float("nan")

    def _save_checkpoint(self, path: Path, module: DPNetModule, opt: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
        opt_meta, opt_tensors = optimizer_parts(opt)
        meta = {**self.est._meta(), "opt": opt_meta,
                **{k: state.get(k) for k in ("epoch", "history", "best_val", "best_epoch", "sparse_from")}}
        save_file(path, "dpnet-fit", meta, {**flatten("module", module.state_dict()),
                                             **flatten("best", state["best_state"]), **opt_tensors})

    def _resume(self, checkpoint: str | os.PathLike | None, cache: RegionCache, module: DPNetModule,
                opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        if not checkpoint or not Path(checkpoint).is_file():
            return None
        _, meta, tensors = load_file(Path(checkpoint), ("dpnet-fit",))
        try:
            check_compatible(cache.manifest, meta["manifest"], f"cache {cache.path} against checkpoint {checkpoint}")
        except CacheMismatchError as exc:
            raise CheckpointMismatchError(str(exc)) from None
        saved = saved_params(meta["params"])  # an older version's checkpoint lacks options added since
        saved["constraints"] = tuple(saved["constraints"])
        if saved != self.est.get_params():
            diff = {k: (saved.get(k), v) for k, v in self.est.get_params().items() if saved.get(k) != v}
            raise CheckpointMismatchError(f"checkpoint {checkpoint} was made with other hyper-parameters {diff}; "
                                          f"delete it to start over, or pass the same settings to resume")
        module.load_state_dict(unflatten("module", tensors))
        opt.load_state_dict(optimizer_state(meta["opt"], tensors))
        log.info("resuming from %s at epoch %d", checkpoint, meta["epoch"])
        state = {k: meta[k] for k in ("epoch", "history", "best_val", "best_epoch")}
        state["sparse_from"] = meta.get("sparse_from")  # None: still in the dense epochs (or no sparse_parts)
        state["best_state"] = unflatten("best", tensors)
        return state


@torch.no_grad()
def map_split(fn: Callable[[torch.Tensor], torch.Tensor], cache: RegionCache, split: str, dev: torch.device,
              val_fraction: float, seed: int, share: tuple[int, int] = (0, 1)) -> tuple[list[torch.Tensor], np.ndarray]:
    """``fn`` over a split's raw regions in batches of 64 (outputs on the CPU), and its labels;
    a non-finite output is blamed on its descriptors, named by shard and image. ``val_fraction``
    and ``seed`` place the validation images, ``share`` = (rank, ranks) takes one rank's share of them
    (see :func:`dpnet.train.data.split_arrays`)."""
    out, labels = [], []
    for shard, arrays in split_arrays(cache, split, val_fraction, seed, ("regions", "labels"), with_shard=True,
                                      share=share):
        for a in range(0, len(arrays["labels"]), 64):
            y = fn(torch.from_numpy(arrays["regions"][a:a + 64]).to(dev)).cpu()
            if not torch.isfinite(y).all():
                check_finite(arrays["regions"][a:a + 64], arrays["image_ids"][a:a + 64], cache.shard_location(shard))
            out.append(y)
        labels.append(arrays["labels"])
    return out, (np.concatenate(labels) if labels else np.zeros(0, np.int64))


def split_scores(module: DPNetModule, cache: RegionCache, split: str, dev: torch.device, val_fraction: float,
                 seed: int, share: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Logits float32 (N, C) and labels (N,) of a split (or of a rank's ``share`` of it), streamed."""
    scores, labels = map_split(lambda x: module(x).float(), cache, split, dev, val_fraction, seed, share)
    if not scores:
        return np.zeros((0, module.classifier.shape[0]), np.float32), labels
    return torch.cat(scores).numpy(), labels
