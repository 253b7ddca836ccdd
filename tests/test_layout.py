"""The house's layout: one namespace, a core that imports no stage, imports that flow one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

STAGES = ("extract", "train", "analyze")


def _run(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_stages_install_under_dpnet_and_no_generic_top_level_name(tmp_path):
    """Outside the checkout, the stages are dpnet.extract / dpnet.train / dpnet.analyze, read from the
    design card's top-level folders; "train" and the others are not names an install takes."""
    got = _run("import importlib.util as u, dpnet.train, dpnet.extract.cache, dpnet.analyze\n"
               "print(dpnet.train.__file__); print(dpnet.extract.cache.__file__)\n"
               "print([n for n in ('train', 'extract', 'analyze') if u.find_spec(n) is not None])", tmp_path)
    train_file, cache_file, generic = got.splitlines()
    assert Path(train_file) == ROOT / "train" / "__init__.py"
    assert Path(cache_file) == ROOT / "extract" / "cache" / "__init__.py"
    assert generic == "[]"


def test_the_core_and_the_command_import_no_stage():
    """dpnet's own modules (errors, files, devices, ...) and the console command load no stage until a
    command runs: the ground floor stands alone."""
    core = sorted(p.stem for p in (ROOT / "dpnet").glob("*.py") if p.stem not in ("__main__",))
    code = ("import sys\n" + "".join(f"import dpnet.{m}\n" for m in core if m != "__init__")
            + "print(sorted({m for m in sys.modules if m.startswith(('dpnet.extract', 'dpnet.train', 'dpnet.analyze'))}))")
    assert _run(code, ROOT) == "[]"


def test_imports_flow_extract_then_train_then_analyze():
    """No stage imports a later one (extract -> train -> analyze), nor the command."""
    order = {s: i for i, s in enumerate(STAGES)}
    bad = []
    for stage in STAGES:
        for path in (ROOT / stage).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "dpnet" and len(parts) > 1 and (parts[1] in order and order[parts[1]] > order[stage]
                                                                 or parts[1] == "cli"):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_a_second_checkout_runs_its_own_stages(tmp_path):
    """A copy of the source (a git worktree, say) imports dpnet.<stage> from its own folders, not from the
    checkout the editable install points at."""
    import shutil

    for name in ("dpnet", *STAGES):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    got = _run("import dpnet.train.model as m, dpnet.extract.pipeline as p; print(m.__file__); print(p.__file__)",
               tmp_path)
    model, pipeline = got.splitlines()
    assert Path(model) == tmp_path / "train" / "model.py" and Path(pipeline) == tmp_path / "extract" / "pipeline.py"


def test_each_stage_s_command_line_is_made_from_its_config_fields():
    """ExtractConfig, FitParams and AnalyzeConfig declare their options once (dpnet.options.option): every
    field marked for the command line has its --flag with the field's help, and its range check names
    the option."""
    import dataclasses

    import pytest

    from dpnet.analyze.cli import build_parser as analyze_parser
    from dpnet.analyze.config import AnalyzeConfig
    from dpnet.errors import ConfigError
    from dpnet.extract.cli import build_parser as extract_parser
    from dpnet.extract.config import ExtractConfig
    from dpnet.train.cli import build_parser as train_parser
    from dpnet.train.params import FitParams

    for cls, parser in ((ExtractConfig, extract_parser()), (FitParams, train_parser()),
                        (AnalyzeConfig, analyze_parser())):
        text = " ".join(parser.format_help().split())
        for f in dataclasses.fields(cls):
            if f.metadata["cli"]:
                assert "--" + f.name.replace("_", "-") in text, (cls.__name__, f.name)
                assert " ".join(f.metadata["help"].split()[:4]) in text, (cls.__name__, f.name)
    with pytest.raises(ConfigError, match=r"REGIONS \(--regions\) must be >= 1"):
        ExtractConfig(regions=0).validate()
    with pytest.raises(ConfigError, match=r"--top-k must be >= 1"):
        AnalyzeConfig(top_k=0).validate()
    args = extract_parser().parse_args(["--dense", "none", "--flip", "--regions", "7"])
    from dpnet.extract.cli import config_from_args

    cfg = config_from_args(args)
    assert (cfg.dense, cfg.flip, cfg.regions, cfg.hypercolumn) == ((), True, 7, False)


def test_which_class_a_part_belongs_to_is_computed_in_one_place():
    """`p // q` (a part's class) is written once, in dpnet.train.losses.part_classes; everything else
    asks the model (part_classes, the owner buffer) or that function."""
    places = []
    for stage in STAGES:
        for path in (ROOT / stage).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
                    right = node.right
                    name = right.id if isinstance(right, ast.Name) else right.attr if isinstance(right, ast.Attribute) else ""
                    if name in ("q", "parts_per_class"):
                        places.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert places == ["train/losses.py:" + places[0].split(":")[1]] and len(places) == 1, places


def test_finding_a_cache_and_its_dataset_belong_to_the_cache():
    """pick_cache's search and dataset_index live with the cache (dpnet.extract.cache); the stages' CLIs
    and the analysis only ask."""
    import inspect

    from dpnet.extract.cache.reader import RegionCache, find_cache

    assert callable(find_cache) and callable(RegionCache.dataset_index)
    from dpnet.train import cli

    assert "find_cache" in inspect.getsource(cli.pick_cache) and ".glob(f\"{" not in inspect.getsource(cli)
