"""How a fit's arithmetic runs on this machine: the GEMM dtype, and the whole path in words."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dpnet.device import resolve_device

if TYPE_CHECKING:
    from .estimator import DPNetClassifier


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
