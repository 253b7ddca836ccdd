"""Issue 12's table: accuracy and every part measure of finished runs, side by side.

Reads each run's ``metrics.json`` and ``report/analysis.json`` (so run ``make train`` and
``make report`` first) and prints one markdown table, a column per run, with the best global
baseline's top-1 beside DP-Net's, the pixel measures' 95% intervals, and what each setting
costs: extraction seconds (recorded in the cache), fit seconds and the cache's size. ``--write-readme`` puts it in the README between
``<!-- measures:start -->`` and ``<!-- measures:end -->``.

    python benchmarks/measures_table.py data/runs/A data/runs/B --names "default" "paper model"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpnet.analyze.report import MEASURES  # noqa: E402  (the report's own list: one definition of the measures)
from readme_block import write_block  # noqa: E402

FAITHFULNESS = [("deletion_auc", "deletion AUC (lower is better)"),
                ("deletion_auc_random", "deletion AUC, same area at random"),
                ("deletion_auc_cam", "deletion AUC, global linear model's CAM"),
                ("insertion_auc", "insertion AUC (higher is better)"),
                ("insertion_auc_random", "insertion AUC, same area at random"),
                ("insertion_auc_cam", "insertion AUC, global linear model's CAM")]


def _cache_cost(cache: Path) -> tuple[float | None, float | None]:
    """(extraction seconds as the cache records them, size on disk in GiB), None where unknown."""
    manifest = json.loads((cache / "manifest.json").read_text()) if (cache / "manifest.json").is_file() else {}
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else None
    return manifest.get("extract_seconds"), None if size is None else size / 2**30


def _cost(metrics: dict, config: dict) -> dict[str, str]:
    """Extraction seconds (the cache's own record), fit seconds and the cache's size on disk; a run
    trained with a view cache (--views) shows the cache's cost + the view's."""
    costs = [_cache_cost(Path(metrics.get("cache", "")))]
    if config.get("views"):
        costs.append(_cache_cost(Path(config["views"])))
    seconds = " + ".join("n/a" if s is None else f"{s:.0f}" for s, _ in costs)
    size = " + ".join("n/a" if g is None else f"{g:.2f}" for _, g in costs)
    return {"extraction seconds (cache)": seconds,
            "fit seconds (DP-Net)": f"{metrics['dpnet'].get('fit_seconds', float('nan')):.0f}",
            "cache size, GiB": size}


def _value(numbers: dict, key: str, digits: str) -> str:
    value = numbers.get(key)
    if value is None:
        return "n/a"
    text = f"{value:{digits}}" if isinstance(value, float) else str(value)
    ci = numbers.get(key + "_ci95")
    return text + (f" [{ci[0]:{digits}}, {ci[1]:{digits}}]" if ci else "")


def column(run: Path) -> dict[str, str]:
    metrics = json.loads((run / "metrics.json").read_text())
    analysis = json.loads((run / "report" / "analysis.json").read_text())
    baselines = {k: v["top1"] for k, v in metrics.items() if k.startswith("global_") and isinstance(v, dict)}
    out = {"top-1": f"{metrics['dpnet']['top1']:.1f}",
           "validation top-1 (what defaults are chosen on)": f"{metrics['dpnet'].get('val_top1', float('nan')):.1f}",
           "best global baseline top-1": (f"{max(baselines.values()):.1f} ({max(baselines, key=baselines.get)})"
                                          if baselines else "not run")}
    for section, key, name, *_ in MEASURES:
        out[name] = _value(analysis.get(section, {}), key, ".3g")
    for key, name in FAITHFULNESS:
        out[name] = _value(analysis.get("faithfulness", {}), key, ".3f")
    parts = analysis.get("parts", {})
    out["parts pruned / silent (weigh for no class)"] = f"{parts.get('pruned', 0)} / {parts.get('silent', 'n/a')}"
    out["parts the part measures count (weigh in some class)"] = f"{parts.get('measured', 'n/a')} of {parts.get('P', 'n/a')}"
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return {**out, **_cost(metrics, config)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--names", nargs="+", default=None)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--block", default="measures", help="the README block to write (<!-- BLOCK:start --> ...)")
    ap.add_argument("--skip-empty", action="store_true", help="leave out rows that are n/a in every column")
    args = ap.parse_args()
    names = args.names or [Path(r).name for r in args.runs]
    cols = [column(Path(r)) for r in args.runs]
    lines = ["| measure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {row} | " + " | ".join(c[row] for c in cols) + " |" for row in cols[0]
              if not (args.skip_empty and all(c[row] in ("n/a", "not run") for c in cols))]
    text = "\n".join(lines)
    print(text)
    if args.write_readme:
        write_block(f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
