"""The benchmarks that need real data say so and exit cleanly when it is absent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_accuracy_skips_a_missing_dataset(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/time_to_accuracy.py", "--dataset", "cub", "--data-dir",
                          str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "skipped" in out.stdout and "nowhere" in out.stdout


def test_the_measures_table_adds_a_view_cache_s_cost(tmp_path):
    """A run trained with --views costs its cache and its view: the table shows both, summed by eye."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from measures_table import column

    caches = {}
    for name, seconds in (("c", 90.4), ("c-flip", 212.0)):
        caches[name] = tmp_path / name
        (caches[name] / "shards").mkdir(parents=True)
        (caches[name] / "shards" / "x").write_bytes(b"0" * 2**20)
        (caches[name] / "manifest.json").write_text(json.dumps({"extract_seconds": seconds}))
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"cache": str(caches["c"]), "dpnet": {"top1": 70.0, "fit_seconds": 9}}))
    (run / "report" / "analysis.json").write_text("{}")
    assert column(run)["extraction seconds (cache)"] == "90"
    (run / "config.json").write_text(json.dumps({"views": str(caches["c-flip"])}))
    col = column(run)
    assert col["extraction seconds (cache)"] == "90 + 212" and col["cache size, GiB"] == "0.00 + 0.00"
