"""Shared fixtures: tiny synthetic sets and fast extraction configs (random weights, 64 px)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extract.pipeline import ExtractConfig


def tiny_config(tmp: Path, **overrides) -> ExtractConfig:
    """A config that extracts in about a second: random-weight Lite0 at 64 px, R = 12."""
    base = dict(dataset="synth", data_dir=str(tmp / "raw"), weights="random", regions=12, image_size=64,
                out_root=str(tmp / "cache"), shard_mb=12 * 1280 * 2 * 5 / 2**20, batch_size=3, workers=0,
                progress=False, synth={"n_classes": 3, "per_class": 6, "image_size": 64})
    base.update(overrides)
    return ExtractConfig(**base)


@pytest.fixture
def tiny(tmp_path: Path) -> ExtractConfig:
    return tiny_config(tmp_path)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield
