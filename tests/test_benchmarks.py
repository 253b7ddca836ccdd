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


def test_the_gemm_dtype_benchmark_fits_both_dtypes_on_the_same_seeds(pretrained_tiny_cache):
    """gemm_dtype.py: one fit per dtype and seed, the speed-up and the top-1 cost taken from them, and
    what auto takes on this CPU; a folder that is no cache is skipped, named."""
    import json

    from dpnet.train.gemm import cpu_has_bf16_units

    out = subprocess.run([sys.executable, "benchmarks/gemm_dtype.py", str(pretrained_tiny_cache), "--seeds", "0", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["seeds"] == [0, 1] and line["bf16_units"] == cpu_has_bf16_units()
    assert line["auto"] == ("bfloat16" if cpu_has_bf16_units() else "float32")
    assert abs(line["bf16_speedup"] - line["float32_fit_seconds"] / line["bfloat16_fit_seconds"]) < 0.05
    assert abs(line["bf16_top1_cost"] - (line["float32_top1"] - line["bfloat16_top1"])) < 0.02
    assert "| float32 |" in out.stdout and "| bfloat16 |" in out.stdout
    missing = subprocess.run([sys.executable, "benchmarks/gemm_dtype.py", str(ROOT / "no-such-cache")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 0 and "skipped" in missing.stdout and "no-such-cache" in missing.stdout
