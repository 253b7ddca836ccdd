"""Fixtures shared by the test modules (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs the suite in pytest-xdist workers, one per core: each takes its share of the
    # cores (set before dpnet or torch start OpenMP), so workers do not oversubscribe them.
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import tiny_config, tiny_run


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
    src = next((base / "cache").glob("synth-*"))
    cache = tmp_path / "cache" / src.name
    shutil.copytree(src, cache)
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    for name in ("metrics.json", "config.json"):
        text = (run / name).read_text().replace(str(src), str(cache))
        (run / name).write_text(text)
    return SimpleNamespace(cache=cache, run=run, tmp=tmp_path)
