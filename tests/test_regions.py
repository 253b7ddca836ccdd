import numpy as np
import pytest
import torch

from dpnet.extract.regions import boxes_to_pixels, global_means, integral_image, region_means, sample_boxes


def brute_means(fmap: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    n, d, h, w = fmap.shape
    out = np.zeros((n, boxes.shape[1], d))
    for i in range(n):
        for r, (x0, y0, x1, y1) in enumerate(boxes[i]):
            out[i, r] = fmap[i, :, y0:y1, x0:x1].astype(np.float64).mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("h,w", [(1, 1), (3, 7), (17, 17)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_region_means_equal_brute_force(dtype, tol, h, w, layout):
    fmap = torch.randn(2, 5, h, w, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    boxes = np.stack([sample_boxes(3, i, 40, h, w) for i in range(2)])
    fast = region_means(fmap, torch.from_numpy(boxes)).double().numpy()
    ref = brute_means(fmap.double().numpy(), boxes)  # reference on the same (rounded) inputs
    np.testing.assert_allclose(fast, ref, atol=tol * 10, rtol=tol)


def test_integral_image_is_padded_cumsum():
    f = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4)
    ii = integral_image(f)
    assert ii.shape == (1, 1, 4, 5)
    assert ii[0, 0, 0].abs().sum() == 0 and ii[0, 0, :, 0].abs().sum() == 0
    assert ii[0, 0, 3, 4] == f.sum() and ii[0, 0, 2, 3] == f[0, 0, :2, :3].sum()


def test_global_mean_is_whole_map_box():
    f = torch.randn(2, 4, 5, 6)
    whole = torch.tensor([[[0, 0, 6, 5]]] * 2)
    torch.testing.assert_close(region_means(f, whole)[:, 0], global_means(f))


def test_boxes_reproducible_and_valid():
    a = sample_boxes(0, 42, 500, 17, 17)
    assert np.array_equal(a, sample_boxes(0, 42, 500, 17, 17))
    assert not np.array_equal(a, sample_boxes(1, 42, 500, 17, 17))
    assert not np.array_equal(a, sample_boxes(0, 43, 500, 17, 17))
    x0, y0, x1, y1 = a.T.astype(int)
    assert (x0 >= 0).all() and (x1 <= 17).all() and (x1 - x0 >= 1).all()
    assert (y0 >= 0).all() and (y1 <= 17).all() and (y1 - y0 >= 1).all()
    assert a.dtype == np.int16 and a.shape == (500, 4)


def test_box_corners_cover_the_grid_uniformly():
    b = np.concatenate([sample_boxes(0, i, 500, 4, 4) for i in range(40)])
    # 4 cells -> 5 grid lines -> 10 distinct pairs, each equally likely
    pairs, counts = np.unique(b[:, [0, 2]], axis=0, return_counts=True)
    assert len(pairs) == 10
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_boxes_to_pixels_scales_each_axis():
    boxes = np.array([[[0, 0, 17, 17], [1, 2, 3, 4]]], np.int16)
    px = boxes_to_pixels(boxes, (17, 17), np.array([[340, 170]]))
    np.testing.assert_allclose(px[0, 0], [0, 0, 340, 170])
    np.testing.assert_allclose(px[0, 1], [20, 20, 60, 40])


def test_region_means_rejects_wrong_box_shape():
    with pytest.raises(ValueError, match="boxes must be"):
        region_means(torch.zeros(2, 3, 4, 4), torch.zeros(3, 5, 4, dtype=torch.long))


def test_dense_windows_cover_every_position_of_each_size():
    from dpnet.extract.regions import dense_boxes, image_boxes

    boxes = dense_boxes((1, 2), 4, 5)
    assert len(boxes) == 4 * 5 + 3 * 4
    want = {(x, y, x + k, y + k) for k in (1, 2) for y in range(4 - k + 1) for x in range(5 - k + 1)}
    assert {tuple(int(t) for t in b) for b in boxes} == want
    full = image_boxes(0, 7, 40, 4, 5, (1, 2))
    assert len(full) == 40 and np.array_equal(full[:32], boxes)  # dense first, then random
    assert np.array_equal(full[32:], sample_boxes(0, 7, 8, 4, 5))
    with pytest.raises(ValueError, match="more than REGIONS"):
        image_boxes(0, 7, 10, 4, 5, (1,))
    with pytest.raises(ValueError, match="does not fit"):
        dense_boxes((6,), 4, 5)


def test_cub_extracts_cropped_with_dense_windows_by_default():
    """CUB's measured defaults (crop to the bird box, 2x2 dense windows); each one word away."""
    from dpnet.extract.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    assert (cfg("--dataset", "cub").crop, cfg("--dataset", "cub").dense) == (True, (2,))
    assert (cfg("--dataset", "cub", "--no-crop", "--dense", "none").crop,
            cfg("--dataset", "cub", "--no-crop", "--dense", "none").dense) == (False, ())
    assert (cfg("--dataset", "folder").crop, cfg("--dataset", "folder").dense) == (False, ())
    assert cfg("--dataset", "folder", "--crop", "--dense", "1,2").dense == (1, 2)


def test_the_per_dataset_defaults_live_in_the_config():
    """ExtractConfig(dataset="cub") is the cache `make extract DATASET=cub` makes (and imagenet's R=100),
    and the command line restates no default: what it leaves unset is the config's."""
    from dpnet.extract.cli import build_parser, config_from_args
    from dpnet.extract.config import ExtractConfig

    for dataset in ("cub", "imagenet", "folder", "synth"):
        from_cli = config_from_args(build_parser().parse_args(["--dataset", dataset]))
        assert from_cli == ExtractConfig(dataset=dataset, progress=True), dataset
    assert ExtractConfig(dataset="cub").cache_name() == "cub-efficientnet_lite0-r500-d2-s544-crop"
    assert ExtractConfig(dataset="imagenet").regions == 100
    assert ExtractConfig(dataset="cub", crop=False, dense=()).cache_name() == "cub-efficientnet_lite0-r500-s544"


def test_a_mirrored_box_on_a_mirrored_map_pools_what_the_box_pools_on_the_map():
    """Lever 3's views: region r of the flipped image is the mirror of region r (exact, any box)."""
    from dpnet.extract.regions import image_boxes, region_means
    from dpnet.extract.runtime import mirror_boxes

    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 5, 7, 7, generator=gen, dtype=torch.float64)
    boxes = torch.from_numpy(np.stack([image_boxes(0, i, 60, 7, 7, (2,)) for i in range(2)]).astype(np.int64))
    mirrored = torch.from_numpy(mirror_boxes(boxes.numpy(), 7))
    torch.testing.assert_close(region_means(fmap.flip(-1), mirrored), region_means(fmap, boxes))
    assert np.array_equal(mirror_boxes(mirrored.numpy(), 7), boxes.numpy())
    assert (mirrored[..., 0] < mirrored[..., 2]).all() and not torch.equal(mirrored, boxes)


def test_data_readme_gives_the_cache_name_pattern_the_config_makes():
    """data/README.md's `cache/<...>/` pattern, read as a regular expression, matches the name of every
    combination of the options that change it (and the docstring of cache_name names each suffix)."""
    import itertools
    import re
    from pathlib import Path

    from dpnet.extract.config import ExtractConfig

    line = next(l for l in (Path(__file__).resolve().parents[1] / "data" / "README.md").read_text().splitlines()
                if l.startswith("| `cache/<dataset>"))
    pattern = line.split("`")[1][len("cache/"):-1]
    regex = re.escape(pattern)
    for placeholder, repl in (("<dataset>", "[a-z0-9]+"), ("<backbone>", "[a-z0-9_]+"), ("<R>", r"\d+"),
                              ("<k>", r"\d+"), ("<size>", r"\d+")):
        regex = regex.replace(re.escape(placeholder), repl)
    regex = re.sub(r"\\\[(.*?)\\\]", r"(?:\1)?", regex)  # [-x] is optional
    for crop, dense, hc, flip in itertools.product((True, False), ((2,), ()), (True, False), (True, False)):
        name = ExtractConfig(dataset="cub", crop=crop, dense=dense, hypercolumn=hc, flip=flip).cache_name()
        assert re.fullmatch(regex, name), (pattern, name)
    for suffix in ("-hc", "-d", "-crop", "-flip"):
        assert suffix in ExtractConfig.cache_name.__doc__, suffix
