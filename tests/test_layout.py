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
