"""The default synthetic set, end to end: parts must beat the global linear baseline, and the
report's explanations must be faithful and land on the parts that define the classes.

Extracts the default set (10 classes x 60 images, EfficientNet-Lite0, R = 500, 544 px) once
for the module: about two minutes on a 2-core CPU.
"""

import json

import pytest

from dpnet.extract.pipeline import ExtractConfig, run_extraction
from dpnet.train.config import TrainConfig
from dpnet.train.run import train_run


@pytest.fixture(scope="module")
def default_synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = ExtractConfig(dataset="synth", data_dir=str(tmp / "raw"), out_root=str(tmp / "cache"), progress=False)
    return run_extraction(cfg).cache_dir


@pytest.mark.slow(seconds=240)  # a default-size extraction, fit and report: the suite's longest
def test_dpnet_beats_global_linear_on_default_synth(default_synth, tmp_path):
    cfg = TrainConfig.from_options(cache=str(default_synth), run_dir=str(tmp_path / "run"), epochs=12, inner_epochs=2,
                      lr=1e-2, lr_step=4, progress=False)
    m = train_run(cfg)
    assert m["dpnet"]["top1"] > m["global_linear"]["top1"] + 5
    assert m["dpnet"]["top1"] > 50  # 10 classes: chance is 10

    from dpnet.analyze.report import build_report

    page = build_report(tmp_path / "run", k=4, n_show=4, pixel_images=8)  # pixel measures on a small sample (their ranges)
    numbers = json.loads((page.parent / "analysis.json").read_text())
    assert 0 <= numbers["faithfulness"]["deletion_auc"] <= 1 and 0 <= numbers["faithfulness"]["insertion_auc"] <= 1
    for k in ("k1", "k3", "k5"):  # removing the named regions costs more than removing random ones
        f = numbers["faithfulness"][k]
        assert f["drop_named"] > max(f["drop_random"], 0) + 0.01, (k, f)
    loc = numbers["localisation"]
    assert loc["top_part_on_defining_part"] > loc["chance_region_on_defining_part"], loc
