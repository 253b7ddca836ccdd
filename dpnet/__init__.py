"""dpnet: what every stage shares (errors, files, devices) and the ``dpnet`` console command.

The stages are ``dpnet.extract`` (stage 1, folder ``extract/``), ``dpnet.train`` (stage 2,
``train/``) and ``dpnet.analyze`` (stage 3, ``analyze/``), mapped by setup.cfg's ``package_dir``;
imports flow dpnet -> extract -> train -> analyze, and nothing here imports a stage until a
command runs.
"""

import os
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
# passive when other processes already keep this machine's CPUs busy when the job starts (1-minute
# load average at least half the CPUs this process may use), else runtime. Measured side by side by
# benchmarks/bench_contention.py (README, "Sharing the cores"). OMP_WAIT_POLICY or
# DPNET_OMP_WAIT_POLICY override it.
OMP_WAIT_POLICY_DEFAULT = "auto"
BRIEF_SPINS = 10_000
BUSY_LOAD_PER_CPU = 0.5


def cpus() -> int:
    """The CPUs this process may run on (its affinity), not the machine's count."""
    return max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def wait_policy(policy: str) -> str:
    """The policy "auto" resolves to here and now (see OMP_WAIT_POLICY_DEFAULT)."""
    if policy != "auto":
        return policy
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            load = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return "runtime"
    return "passive" if load >= BUSY_LOAD_PER_CPU * cpus() else "runtime"


def _thread_defaults() -> None:
    """Thread pools sized to the CPUs this process may use (not the machine's), waiting as measured."""
    policy = wait_policy(os.environ.get("DPNET_OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT).lower())
    if policy in ("passive", "active"):
        os.environ.setdefault("OMP_WAIT_POLICY", policy.upper())
    elif policy == "brief" and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(BRIEF_SPINS))
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cpus())


_thread_defaults()
