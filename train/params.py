"""DP-Net's hyper-parameters, declared once: one typed field each, with its help, choices and range.

:class:`FitParams` is the one place a hyper-parameter is declared. The estimator's signature and
docstring (:class:`dpnet.train.estimator.DPNetClassifier`), its validation (:func:`check_params`), the
command line (``python -m dpnet.train --help``, :func:`dpnet.train.config.add_fit_arguments`) and the saved
run config are all made from it; a new hyper-parameter is its field here and the code that uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

from dpnet.options import check_fields, flag, option

from .losses import KNOWN_CONSTRAINTS
from .optim import OPTIMIZERS

SIMILARITIES = ("dot", "cosine")
CLASS_LAYERS = ("free", "owned", "positive")
BACKWARDS = ("dense", "sparse")
INITS = ("random", "regions")
GEMM_DTYPE_NAMES = ("auto", "float32", "bfloat16")


def param(default: Any, help: str, *, choices: tuple | None = None, check: Callable[[Any], bool] | None = None,
          want: str = "", flags: tuple[str, ...] = (), module: bool = False) -> Any:
    """A hyper-parameter's field (:func:`dpnet.options.option`): its default, help (the --help text),
    allowed ``choices`` or a ``check`` with the range it stands for (``want``), and extra command-line
    ``flags``. ``module``: :class:`dpnet.train.model.DPNetModule` takes it as the keyword argument of
    the same name."""
    return option(default, help, choices=choices, check=check, want=want, flags=flags, module=module)


def _at_least(n: float) -> Callable[[Any], bool]:
    return lambda v: v >= n


@dataclass(frozen=True)
class FitParams:
    """DPNetClassifier's hyper-parameters (each field's metadata holds its help and range)."""

    parts_per_class: int = param(20, "q; P = q * C, part p belongs to class p // q.", check=_at_least(1),
                                 want=">= 1", flags=("--q",))
    epochs: int = param(8, "outer epochs; the learning rate is multiplied by lr_gamma every lr_step.",
                        check=_at_least(1), want=">= 1")
    inner_epochs: int = param(2, "passes over each loaded shard before the next is read (batch-level epochs).",
                              check=_at_least(1), want=">= 1")
    lr: float = param(1e-2, "Adam's initial learning rate.", check=lambda v: v > 0, want="> 0")
    optimizer: str = param("row-adam", "row-adam (one Adam second moment per part: a part's step does not depend on "
                                       "the basis its coordinates are in, so the PCA path's low-variance components "
                                       "are not inflated; dpnet.train.optim.RowAdam), or adam (one per coordinate; "
                                       "the paper preset's).", choices=OPTIMIZERS)
    lr_step: int = param(4, "epochs between learning-rate drops.", check=_at_least(1), want=">= 1")
    lr_gamma: float = param(0.1, "the factor of each drop.", check=lambda v: 0 < v <= 1, want="in (0, 1]")
    batch_size: int = param(32, "images per optimiser step.", check=_at_least(1), want=">= 1")
    constraints: tuple[str, ...] = param(
        ("orth", "assign", "cs", "clst"),
        "subset of (orth, assign, cs, clst, occur, agree); clst (cosine similarity only; left out, with a warning, for dot) is "
        "ProtoPNet's cluster cost: each part of a class should find a close region in every image of the class.",
        check=lambda v: set(v) <= set(KNOWN_CONSTRAINTS), want=f"a subset of {', '.join(KNOWN_CONSTRAINTS)}")
    lambda_orth: float = param(1e-2, "weight of C_orth.", check=_at_least(0), want=">= 0")
    lambda_assign: float = param(1e-3, "weight of C_assign.", check=_at_least(0), want=">= 0")
    lambda_cs: float = param(1e-3, "weight of C_cs.", check=_at_least(0), want=">= 0")
    lambda_clst: float = param(0.8, "weight of C_clst.", check=_at_least(0), want=">= 0")
    lambda_agree: float = param(1.0, "weight of C_agree (constraint agree, with a view cache: train --views): two "
                                     "views of each image assign each region alike and put each own part at the same "
                                     "region (PIP-Net's alignment; DPNetModule.view_agreement).", check=_at_least(0),
                                want=">= 0")
    lambda_occur: float = param(0.1, "weight of C_occur (constraint occur, off by default): region grouping's prior "
                                     "on part occurrence, each part occurring in as many images of a batch as its "
                                     "class has there (dpnet.train.losses.occurrence_cost).", check=_at_least(0),
                                want=">= 0")
    init: str = param("random", "random (Gaussian U; V Gaussian with dot similarity, else +1 on a part's own class "
                                "and -0.5 elsewhere, or a small positive weight with the positive class layer) or "
                                "regions (each part starts at a random training region of its class).", choices=INITS)
    backward: str = param("sparse", "dense (dW = dS^T X, a second GEMM) or sparse (the max-pool's gradient as a "
                                    "gather of the argmax rows); the same gradient either way.", choices=BACKWARDS)
    entropy_regions: int = param(32, "regions per image the assignment entropy (and the occurrence and agreement "
                                     "terms) is averaged over at each step, "
                                     "drawn at random (an unbiased estimate); 0 takes every region.",
                                 check=_at_least(0), want=">= 0 (0: every region)")
    pca_dim: int = param(256, "D' > 0 learns the parts in the D'-dimensional PCA subspace of the standardised "
                              "training descriptors and trains on descriptors projected once (D / D' times less "
                              "work per pass); the parts are still scored in descriptor space. 0, or D' >= D: no "
                              "projection.", check=_at_least(0), want=">= 0 (0: no projection)")
    similarity: str = param("cosine", "dot (the paper's u . x) or cosine (parts and standardised regions "
                                      "normalised).", choices=SIMILARITIES, module=True)
    class_layer: str = param("free", "free (V weighs any part for any class), owned (each class weighs only its own "
                                     "parts: its explanation is its parts) or positive (PIP-Net's non-negative V: a "
                                     "decision is a sum of parts found, none weighted against).", choices=CLASS_LAYERS,
                             module=True)
    centre: bool = param(False, "subtract from each image's standardised regions their mean over the image before "
                                "scoring: parts then meet what distinguishes a region within its image.", module=True)
    presence: float = param(0.0, "with cosine similarity, a part's entry in the bag is how far its best cosine passes "
                                 "this value (0 below it): parts absent from an image add nothing to any class. 0: "
                                 "the best cosine itself.", check=lambda v: 0 <= v < 1, want="in [0, 1) (a cosine)",
                            module=True)
    class_top_k: int = param(0, "K > 0: each class's logit is the sum of its K contributions v_cp b_p of largest size "
                                "(for or against), so a decision rests on at most 2 K parts, all of which the evidence "
                                "table can list (DPNetModule.contributions). 0: every part counts (V b).",
                             check=_at_least(0), want=">= 0 (0: every part)", module=True)
    sparse_parts: int = param(0, "K > 0: after the epochs, the class layer becomes sparse and non-negative in stages "
                                "of 4K, 2K and K parts per class (each class's parts ranked by a non-negative L1 fit "
                                "on the training bags, the layer refitted on them, then U and V fine-tuned for "
                                "sparse_epochs; dpnet.train.finish.sparsify_class_layer): a decision is then the sum "
                                "of at most 2 K positive part matches, all of which the evidence table lists. 0: off.",
                             check=_at_least(0), want=">= 0 (0: off)", module=True)
    sparse_epochs: int = param(2, "with sparse_parts, the epochs of fine-tuning after each stage's refit.",
                               check=_at_least(1), want=">= 1")
    sparse_lr: float = param(3e-3, "with sparse_parts, the learning rate of the fine-tuning.",
                             check=lambda v: v > 0, want="> 0")
    project_parts: bool = param(False, "after training, replace each part by its best-scoring training region among "
                                       "its own class's images (ProtoPNet's projection): every part is then a real "
                                       "patch.")
    prune_parts: bool = param(False, "after training (and projection), ProtoPNet's pruning: a part whose 6 best "
                                     "training images hold fewer than 3 of its own class belongs to no class and "
                                     "weighs nothing (dpnet.train.finish.prune_parts); the report counts them "
                                     "(parts.pruned).")
    last_layer_steps: int = param(0, "after training (projection and pruning), optimise the class layer alone for "
                                     "this many full-batch steps on the fixed parts' scores (a convex problem); "
                                     "0: none.", check=_at_least(0), want=">= 0")
    last_layer_l1: float = param(0.0, "with last_layer_steps, the weight of an L1 cost on the class layer's links "
                                      "from a part to a class not its own (ProtoPNet's last-layer step: they go to "
                                      "0, so a class speaks through its own parts).", check=_at_least(0), want=">= 0")
    gemm_dtype: str = param("auto", "the dtype of the training GEMMs: auto (bfloat16 on CUDA and on CPUs with native "
                                    "bfloat16 matrix units, e.g. AMX or AVX512-BF16; float32 elsewhere), float32 or "
                                    "bfloat16. Everything after the GEMMs (pooling, entropy, gradients) is float32.",
                            choices=GEMM_DTYPE_NAMES)
    val_fraction: float = param(0.15, "share of training images held out to choose the best epoch.",
                                check=lambda v: 0 <= v < 1, want="in [0, 1)")
    patience: int = param(3, "stop when validation top-1 has not improved for this many epochs at the current "
                             "learning rate (each drop starts a new count; needs a validation split); 0: run every "
                             "epoch.", check=_at_least(0), want=">= 0 (0: run every epoch)")
    memory_budget_mb: float | None = param(None, "hold the training split in memory when it fits (None: RAM / 4).",
                                           check=lambda v: v is None or v >= 0, want=">= 0")
    micro_batch: int = param(0, "images per forward/backward piece of a step (0: auto, see dpnet.train.trainer.Trainer._micro); "
                                "the gradient is the batch's either way, up to float summation order.",
                             check=_at_least(0), want=">= 0 (0: auto)")
    seed: int = param(0, "seeds the initialisation, the shuffles and the entropy's regions.", check=_at_least(0),
                      want=">= 0")
    device: str = param("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")


FIELDS = dataclasses.fields(FitParams)

# What a field's value was in files (checkpoints, models, run configs) written before the field
# existed, where that is not its default now: the default optimizer became row-adam after files
# without the field had been fitted with Adam.
BEFORE_FIELD: dict[str, Any] = {"optimizer": "adam"}


def saved_params(saved: dict[str, Any]) -> dict[str, Any]:
    """Every hyper-parameter of a file's saved ``params``, the missing ones (an older version's file)
    taking the value they had then (:data:`BEFORE_FIELD`, else the default)."""
    defaults = {f.name: f.default for f in FIELDS}
    return {**defaults, **BEFORE_FIELD, **{k: v for k, v in saved.items() if k in defaults}}


def check_params(values: dict[str, Any]) -> None:
    """Every hyper-parameter inside what it can take, from the fields' choices and ranges; else a
    ConfigError naming the first that is not (and its command-line option)."""
    check_fields(SimpleNamespace(**values), FIELDS, label_of=lambda f: f"{f.name} ({flag(f)})")


def docstring_args() -> str:
    """The Args section of a docstring, from the fields' help."""
    return "\n".join(f"        {f.name}: {f.metadata['help']}" for f in FIELDS)
