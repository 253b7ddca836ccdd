"""Helpers the tests import: tiny extraction configs, tiny trained runs, and subprocess runs.

Fixtures stay in ``conftest.py``; plain functions live here so that test modules import them
from a module of their own rather than from pytest's conftest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from dpnet.extract.config import ExtractConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, **overrides) -> ExtractConfig:
    """A config that extracts in about a second: random-weight Lite0 at 64 px, R = 12."""
    base = dict(dataset="synth", data_dir=str(tmp / "raw"), weights="random", regions=12, image_size=64,
                out_root=str(tmp / "cache"), shard_mb=12 * 1280 * 2 * 5 / 2**20, batch_size=3, workers=0,
                progress=False, synth={"n_classes": 3, "per_class": 6, "image_size": 64})
    base.update(overrides)
    return ExtractConfig(**base)


def tiny_run(tmp: Path, **train) -> Path:
    """Extract a tiny synthetic cache (96 px, R = 16, 3 classes) and train a tiny run on it; returns the run."""
    from dpnet.extract.pipeline import run_extraction
    from dpnet.train.run import train_run

    cfg = tiny_config(tmp, image_size=96, regions=16, synth={"n_classes": 3, "per_class": 8, "image_size": 96})
    cache = run_extraction(cfg).cache_dir
    run = tmp / "run"
    options = dict(parts_per_class=2, epochs=3, inner_epochs=2, lr=1e-2, batch_size=4, val_fraction=0.0,
                   baselines=False, progress=False)
    options.update(train)
    train_run(train_config(cache=str(cache), run_dir=str(run), **options))
    return run


def train_config(**options):
    """A TrainConfig from flat options (run options and estimator hyper-parameters mixed)."""
    from dpnet.train.config import TrainConfig

    return TrainConfig.from_options(**options)


def python(code: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300,
           check: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the project on its path; returns the finished process."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, env=child_env(env), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn(code: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter (not waited for); stdout and stderr are piped."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd or ROOT, env=child_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def wait_for(cond, timeout: float = 120.0, every: float = 0.05, what: str = "condition") -> None:
    """Poll ``cond()`` until it is true; fail after ``timeout`` seconds."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def copy_of_base(base: Path, dest: Path) -> SimpleNamespace:
    """A private copy of the session's tiny cache and its trained run in ``dest`` (files pointed at the copy)."""
    src = next((base / "cache").glob("synth-*"))
    cache = dest / "cache" / src.name
    shutil.copytree(src, cache)
    run = dest / "run"
    shutil.copytree(base / "run", run)
    for name in ("metrics.json", "config.json"):
        text = (run / name).read_text().replace(str(src), str(cache))
        (run / name).write_text(text)
    return SimpleNamespace(cache=cache, run=run, tmp=dest)
