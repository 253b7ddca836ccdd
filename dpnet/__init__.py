"""dpnet: what every stage shares (errors, files, devices) and the ``dpnet`` console command.

The stages are ``dpnet.extract`` (stage 1, folder ``extract/``), ``dpnet.train`` (stage 2,
``train/``) and ``dpnet.analyze`` (stage 3, ``analyze/``), mapped by setup.cfg's ``package_dir``;
imports flow dpnet -> extract -> train -> analyze, and nothing here imports a stage until a
command runs.
"""

import os
import time
from pathlib import Path

__version__ = "0.2.0"

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "setup.cfg").is_file() and all((_CHECKOUT / s / "__init__.py").is_file()
                                               for s in ("extract", "train", "analyze")):
    # A source checkout: dpnet.<stage> is the stage folder beside this one (the design card's layout),
    # found before the editable install's mapping, so a second checkout (a git worktree) runs its
    # own stages and `PYTHONPATH=. python -m dpnet.train` works without an install. An installed
    # dpnet has its stages inside this folder and nothing is added.
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a package's own __path__

# How OpenMP threads wait for work, set before torch starts its OpenMP runtime (each stage imports
# dpnet first). "passive": idle threads sleep, so a process sharing the cores (a report beside a
# training, a shared CI machine) is not slowed by threads spinning for a core they do not get;
# "runtime": OpenMP's own default (spin about 300,000 times, then sleep), faster on a quiet machine;
# "brief": spin GOMP_SPINCOUNT=BRIEF_SPINS times; "active": always spin. "auto" (the default) takes
# passive when other processes keep the CPUs this process may use busy as it starts (at least
# BUSY_SHARE of them, over BUSY_WINDOW_S while it sleeps), else runtime. Not the load average: it
# stays above 1 for a minute after a job ends, so `make extract && make train` started training in
# passive wait (its fit 26-28 s against 20-22 s on cub50-dev). Measured side by side by
# benchmarks/bench_contention.py (README, "Sharing the cores"). OMP_WAIT_POLICY or
# DPNET_OMP_WAIT_POLICY override it.
OMP_WAIT_POLICY_DEFAULT = "auto"
BRIEF_SPINS = 10_000
BUSY_SHARE = 0.4
BUSY_WINDOW_S = 0.1
PROC_STAT, PROC_LOADAVG = "/proc/stat", "/proc/loadavg"


def cpus() -> int:
    """The CPUs this process may run on (its affinity), not the machine's count."""
    return max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _read_proc_stat() -> str:
    with open(PROC_STAT, encoding="ascii") as f:
        return f.read()


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, all) jiffies since boot of the CPUs this process may use; None where /proc/stat is unreadable."""
    try:
        mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        busy = total = 0
        for line in _read_proc_stat().splitlines():
            name, *values = line.split()
            if name in mine:
                v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(v)
                busy += sum(v) - v[3] - v[4]
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return (busy, total) if total else None


def busy_cpus(window: float = BUSY_WINDOW_S) -> float | None:
    """How many of the CPUs this process may use other processes keep busy now: measured over
    ``window`` seconds while this one sleeps. None where /proc/stat cannot tell."""
    a = _busy_jiffies()
    time.sleep(window)
    b = _busy_jiffies()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return cpus() * (b[0] - a[0]) / (b[1] - a[1])


def wait_policy(policy: str) -> str:
    """The policy "auto" resolves to here and now (see OMP_WAIT_POLICY_DEFAULT)."""
    if policy != "auto":
        return policy
    busy = busy_cpus()
    if busy is None:  # no /proc/stat: the load average, the best left
        try:
            with open(PROC_LOADAVG, encoding="ascii") as f:
                busy = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return "runtime"
    return "passive" if busy >= BUSY_SHARE * cpus() else "runtime"


def _thread_defaults() -> None:
    """Thread pools sized to the CPUs this process may use (not the machine's), waiting as measured.
    An OMP_WAIT_POLICY already set wins, and then no policy is worked out (auto's look takes 0.1 s)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        policy = wait_policy(os.environ.get("DPNET_OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT).lower())
        if policy in ("passive", "active"):
            os.environ["OMP_WAIT_POLICY"] = policy.upper()
        elif policy == "brief":
            os.environ.setdefault("GOMP_SPINCOUNT", str(BRIEF_SPINS))
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cpus())


_thread_defaults()
