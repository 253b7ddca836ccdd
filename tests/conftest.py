"""Fixtures shared by the test modules (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs the suite in pytest-xdist workers, one per core: each takes its share of the
    # cores (set before dpnet or torch start OpenMP), so workers do not oversubscribe them.
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import copy_of_base, tiny_config, tiny_run


def pytest_collection_modifyitems(items):
    """The long tests (marked slow; the longest, with ``seconds=``, before them) first: pytest-xdist's
    workers start them at once and share out the short ones after, so no long test is left to run
    alone at the end."""
    def key(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0))

    items.sort(key=key)


@pytest.fixture
def tiny(tmp_path: Path):
    """The tiny extraction config of tests.helpers.tiny_config, in this test's folder."""
    return tiny_config(tmp_path)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny synthetic cache and a run trained on it, made once for the session (read-only: use ``copy``)."""
    tmp = tmp_path_factory.mktemp("faults")
    tiny_run(tmp)
    return tmp


@pytest.fixture
def copy(base: Path, tmp_path: Path) -> SimpleNamespace:
    """A private copy of the tiny cache and its trained run (files pointed at the copy)."""
    return copy_of_base(base, tmp_path)


@pytest.fixture(scope="session")
def pretrained_tiny_cache(tmp_path_factory) -> Path:
    """The tiny synthetic set (96 px, R = 16, 3 classes x 8) extracted with the backbone's pretrained
    weights, once for the session (read-only)."""
    from dpnet.extract.pipeline import run_extraction

    cfg = tiny_config(tmp_path_factory.mktemp("pretrained"), image_size=96, regions=16, weights=None,
                      synth={"n_classes": 3, "per_class": 8, "image_size": 96})
    return run_extraction(cfg).cache_dir
