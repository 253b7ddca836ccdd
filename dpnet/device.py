"""Where tensors run: one resolver for every stage."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """``device``, or for ``"auto"`` CUDA when present (under torchrun the GPU of LOCAL_RANK), else CPU.

    Raises:
        ConfigError: an unknown device, or CUDA asked for where there is none.
    """
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            dev = None
        if dev is None or dev.type not in DEVICE_TYPES:
            raise ConfigError(f"DEVICE={device!r} is not a device dpnet runs on: use auto, cpu, cuda or cuda:N")
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ConfigError(f"DEVICE={device!r} but this machine has {torch.cuda.device_count()} usable CUDA "
                              f"GPU(s): use DEVICE=cpu (or auto, which picks a GPU when there is one)")
        return dev
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return torch.device("cuda")
