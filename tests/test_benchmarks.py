"""The benchmarks that need real data say so and exit cleanly when it is absent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_accuracy_skips_a_missing_dataset(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/time_to_accuracy.py", "--dataset", "cub", "--data-dir",
                          str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "skipped" in out.stdout and "nowhere" in out.stdout
