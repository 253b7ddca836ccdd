"""Fixtures shared by the test modules (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_config


@pytest.fixture
def tiny(tmp_path: Path):
    """The tiny extraction config of tests.helpers.tiny_config, in this test's folder."""
    return tiny_config(tmp_path)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield
