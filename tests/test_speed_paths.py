"""The fast paths keep the numbers: the allocator setting, the frozen CPU backbone."""

from __future__ import annotations

import json
import os

import numpy as np

from dpnet.extract.cache import RegionCache
from dpnet.extract.pipeline import run_extraction
from tests.helpers import python, tiny_config

CHURN = """
import json, resource, torch
from dpnet.memory import large_buffers_reused

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def churn():  # an 80 MB tensor made and freed ten times, as a forward pass does with its activations
    a = faults()
    for _ in range(10):
        torch.ones(20_000_000)
    return faults() - a

churn()
plain = churn()
with large_buffers_reused() as applied:
    churn()
    tuned = churn()
after = churn()
print(json.dumps({"applied": applied, "plain": plain, "tuned": tuned, "after": after}))
"""


def test_large_buffers_are_reused_without_page_faults_while_a_job_runs():
    out = json.loads(python(CHURN, check=True).stdout)
    assert out["applied"]
    assert out["plain"] > 100_000  # each fresh 80 MB mapping faults in ~20,000 pages
    assert out["tuned"] < out["plain"] / 50
    assert out["after"] > out["plain"] / 10  # large blocks are mapped (and given back) again after the job


def test_a_users_malloc_settings_win():
    out = json.loads(python(CHURN, env={"MALLOC_TOP_PAD_": "131072"}, check=True).stdout)
    assert not out["applied"]


def test_the_frozen_cpu_backbone_gives_the_eager_descriptors(tmp_path):
    """TorchScript + oneDNN fusion against eager: the same float16 descriptors, to float16's precision."""
    caches = {}
    for runtime in ("eager", "frozen"):
        cfg = tiny_config(tmp_path / runtime, weights=None, runtime=runtime, image_size=96)
        caches[runtime] = RegionCache(run_extraction(cfg).cache_dir)
        assert caches[runtime].manifest["config"]["runtime"] == runtime
    for s in range(caches["eager"].n_shards):
        for field in ("regions", "global"):
            a = caches["eager"].load_shard(s)[field].astype(np.float32)
            b = caches["frozen"].load_shard(s)[field].astype(np.float32)
            scale = np.abs(a).max()
            assert np.abs(a - b).max() <= 2e-3 * scale  # a float16 step is 1e-3 of the value
            assert np.abs(a - b).mean() <= 1e-4 * scale  # and most values are equal


def test_auto_runtime_is_frozen_on_the_cpu_for_caches_that_repay_it(tmp_path):
    import torch

    from dpnet.extract.runtime import FROZEN_MIN_IMAGES, resolve_runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu, FROZEN_MIN_IMAGES) == "frozen"
    assert resolve_runtime("auto", cpu, FROZEN_MIN_IMAGES - 1) == "eager"
    assert resolve_runtime("auto", cuda, 10_000) == "eager"
    assert resolve_runtime("eager", cpu, 10_000) == "eager"
    cache = RegionCache(run_extraction(tiny_config(tmp_path)).cache_dir)
    assert cache.manifest["config"]["runtime"] == "eager"  # 18 images


def test_every_stage_command_runs_with_large_buffers_reused(copy, monkeypatch):
    """The whole of each command, not only its fit or its extraction loop: a report made every pixel
    measure's batch of masked images in freshly mapped pages (a third of its time in the kernel)."""
    from dpnet import memory
    from dpnet.analyze import cli as analyze_cli
    from dpnet.analyze import report
    from dpnet.extract import cli as extract_cli
    from dpnet.train import cli as train_cli

    seen = {}

    def recorder(name, result):
        def body(*args, **kwargs):
            seen[name] = memory.reusing()
            return result
        return body

    monkeypatch.setattr(report, "build_report", recorder("report", copy.run / "report" / "index.html"))
    monkeypatch.setattr(train_cli, "train_run", recorder("train", None))
    monkeypatch.setattr(extract_cli, "run_extraction", recorder("extract", None))
    analyze_cli.main(["report", "--run", str(copy.run), "--no-progress"])
    try:
        train_cli.main(["--cache", str(copy.cache), "--run-dir", str(copy.tmp / "run2"), "--no-progress"])
    except (TypeError, AttributeError):  # the recorder's None is no metrics: the point was reached
        pass
    try:
        extract_cli.main(["--dataset", "synth", "--out-root", str(copy.tmp / "c2"), "--no-progress"])
    except (TypeError, AttributeError):
        pass
    assert seen == {"report": True, "train": True, "extract": True}
    assert not memory.reusing()  # given back when the command ends


def test_the_frozen_backbone_sees_one_batch_shape_whatever_the_shards_leave(tmp_path, monkeypatch):
    """A shard's last batch is short (18 images, 5 to a shard, 3 to a batch: 3, 2, 3, 2, ...). Each new input
    shape costs the frozen graph its profiling runs and a compilation (about a second at 544 px, once per
    shape), so the short batches are padded to the full one; their descriptors stay those of eager."""
    from dpnet.extract import runtime

    seen = set()
    make = runtime.frozen_body

    def spying(body, example):
        graph = make(body, example)

        def run(x):
            seen.add(tuple(x.shape))
            return graph(x)
        return run

    monkeypatch.setattr(runtime, "frozen_body", spying)
    frozen = RegionCache(run_extraction(tiny_config(tmp_path / "frozen", weights=None, runtime="frozen")).cache_dir)
    assert frozen.n_shards == 4
    assert {s[0] for s in seen} == {3}
    eager = RegionCache(run_extraction(tiny_config(tmp_path / "eager", weights=None, runtime="eager")).cache_dir)
    for s in range(frozen.n_shards):
        a, b = (c.load_shard(s)["regions"].astype(np.float32) for c in (eager, frozen))
        assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()


def _fake_proc(tmp_path, load: float, busy_jiffies: list[int], cpus: list[int]):
    """A /proc/loadavg and a /proc/stat per read: cpuN lines whose busy jiffies grow by ``busy_jiffies``
    (one value per CPU of ``cpus``) out of 10 per CPU between two reads."""
    (tmp_path / "loadavg").write_text(f"{load:.2f} {load:.2f} {load:.2f} 1/100 1234\n")
    reads = []
    for k in range(2):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        for cpu, busy in zip(cpus, busy_jiffies):
            used = 1000 + k * busy
            idle = 5000 + k * (10 - busy)
            lines.append(f"cpu{cpu} {used} 0 0 {idle} 0 0 0 0 0 0")
        reads.append("\n".join(lines) + "\n")
    return reads


def test_auto_waits_passively_only_while_other_processes_use_the_cores(tmp_path, monkeypatch):
    """The 1-minute load average stays above 1 for a minute after a job ends: `make extract && make train`
    started every training in passive wait (its fit 26-28 s against 20-22 s, cub50-dev, Zen 5). auto looks
    at what the CPUs this process may use do now, as it starts."""
    import dpnet

    assert dpnet.busy_cpus(0.01) is not None  # this machine's /proc/stat reads
    cpus = sorted(os.sched_getaffinity(0))[:2]
    monkeypatch.setattr(dpnet, "cpus", lambda: len(cpus))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    monkeypatch.setattr(dpnet, "BUSY_WINDOW_S", 0.0)

    def policy(load, busy):
        reads = iter(_fake_proc(tmp_path, load, busy, cpus))
        monkeypatch.setattr(dpnet, "_read_proc_stat", lambda: next(reads))
        monkeypatch.setattr(dpnet, "PROC_LOADAVG", str(tmp_path / "loadavg"))
        return dpnet.wait_policy("auto")

    assert policy(load=1.9, busy=[0, 1][:len(cpus)]) == "runtime"  # an extraction just ended: quiet now
    assert policy(load=0.1, busy=[10, 0][:len(cpus)]) == "passive"  # a process keeps a core busy
    assert policy(load=2.0, busy=[10, 10][:len(cpus)]) == "passive"


def test_a_set_wait_policy_spares_the_start_up_measurement(monkeypatch):
    """With OMP_WAIT_POLICY already set (the user's, or a passive parent's that its ranks inherit) nothing
    auto decides can take effect: the 0.1 s look at the CPUs is not taken."""
    import dpnet

    calls = []
    monkeypatch.setattr(dpnet, "busy_cpus", lambda *a: calls.append(1) or 0.0)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("DPNET_OMP_WAIT_POLICY", "auto")
    dpnet._thread_defaults()
    assert calls == [] and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    dpnet._thread_defaults()
    assert calls == [1]  # unset: auto looks
