"""The default synthetic set, end to end: parts must beat the global linear baseline.

Extracts the default set (10 classes x 60 images, EfficientNet-Lite0, R = 500, 544 px) once
for the module: about two minutes on a 2-core CPU.
"""

import pytest

from extract.pipeline import ExtractConfig, run_extraction
from train.run import TrainConfig, train_run


@pytest.fixture(scope="module")
def default_synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = ExtractConfig(dataset="synth", data_dir=str(tmp / "raw"), out_root=str(tmp / "cache"), progress=False)
    return run_extraction(cfg).cache_dir


@pytest.mark.slow
def test_dpnet_beats_global_linear_on_default_synth(default_synth, tmp_path):
    cfg = TrainConfig(cache=str(default_synth), run_dir=str(tmp_path / "run"), epochs=12, inner_epochs=2,
                      lr=1e-2, lr_step=4, progress=False)
    m = train_run(cfg)
    assert m["dpnet"]["top1"] > m["global_linear"]["top1"] + 5
    assert m["dpnet"]["top1"] > 50  # 10 classes: chance is 10
