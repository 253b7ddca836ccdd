"""Model and checkpoint files: named tensors plus JSON metadata, never pickled objects.

A file is a ``torch.save`` of ``{"format": FORMAT, "kind": ..., "meta": <JSON text>, "tensors":
{name: Tensor}}`` and is read with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers: a file with a pickled object (a planted payload, or a file of an
older dpnet that pickled Python objects) is refused with a clear error and none of its code runs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from dpnet.errors import DpnetError, UnsafeFileError
from dpnet.files import atomic_path

FORMAT = "dpnet-file/2"


def save_file(path: Path, kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically (a temp file, then a rename)."""
    payload = {"format": FORMAT, "kind": kind, "meta": json.dumps(meta),
               "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_file(path: Path, kinds: tuple[str, ...]) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_file`: (kind, meta, tensors).

    Raises:
        UnsafeFileError: the file holds pickled Python objects; it is not loaded.
        DpnetError: it is not a dpnet file of one of ``kinds``, or it is damaged.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path} holds Python objects besides tensors, and reading it could run code, so it was not read. "
            f"dpnet writes tensors and JSON only: if an older dpnet wrote this file, train again (make train) "
            f"to replace it; otherwise delete it.") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise DpnetError(f"{path} is damaged or not a dpnet file ({type(exc).__name__}: {exc}); delete it "
                         f"(make train writes it again)") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("kind") not in kinds:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DpnetError(f"{path} is not a dpnet {' or '.join(kinds)} file of this version (format {found!r}, "
                         f"expected {FORMAT!r}): train again (make train) to write one")
    try:
        return obj["kind"], json.loads(obj["meta"]), dict(obj["tensors"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DpnetError(f"{path} is damaged ({exc}); delete it (make train writes it again)") from exc


def flatten(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix.name: tensor}`` for a state dict."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved under ``prefix`` by :func:`flatten`, names without the prefix."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimiser's state as (JSON-able groups and scalar state, tensors)."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def optimizer_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The state dict :func:`optimizer_parts` took apart, for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
