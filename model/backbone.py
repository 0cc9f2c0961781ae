"""The frozen CLIP vision tower and the tokens it hands to the adapters.

ViT-L-14 and the tiny test ViT go through the same lines: the size comes from the open_clip
model config, never from a branch on the name. Weights come from a local file ("random" for
tests and the demo); nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.config import BackboneConfig

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@functools.cache
def open_clip_factory():
    """open_clip, with fairfront-tiny-vit registered beside the built-ins.

    Imported on first use, not with this module: open_clip (and the torchvision it imports) takes
    ~2.5 s, and only reading a backbone's shape (BackboneShape.of: `prepare` and every worker) or
    building it needs it: `show`, `export`, `report`, `dashboard` and every `--help` do not.
    """
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


class BackboneError(ValueError):
    """The backbone cannot be built as configured (unknown name, missing weights, bad layer)."""


@dataclass(frozen=True)
class FrozenTokens:
    """What the adapters read: the Stage 1 layer's CLS token and the Stage 2 layer's patch tokens."""

    cls: torch.Tensor  # [B, D]
    patches: torch.Tensor  # [B, L, D]


@dataclass(frozen=True)
class BackboneShape:
    """What a cache key and the adapters need of a backbone, read off its open_clip model config
    without building it: a trial on a finished cache never builds the ViT (building ViT-L-14 costs a
    worker ~2 s more at start and 1.6 GiB more peak host memory: bench/results/worker_startup.md)."""

    width: int
    n_layers: int
    image_size: int
    patch_size: int
    layers: tuple[int, int]  # the Stage 1 and Stage 2 layers, as block indices 0..n_layers-1
    # The whole open_clip model config (MLP ratio, head width, image mean/std, ...), hashed: the
    # tokens change with any of it, and the fields above name only a few.
    config_sha256: str

    @classmethod
    def of(cls, config: BackboneConfig) -> "BackboneShape":
        open_clip = open_clip_factory()
        model_config = open_clip.get_model_config(config.name)
        if model_config is None:
            raise BackboneError(f"backbone.name: unknown open_clip model {config.name!r}")
        from open_clip.model import CLIPVisionCfg

        vision = CLIPVisionCfg(**model_config["vision_cfg"])
        if vision.timm_model_name or not isinstance(vision.layers, int):
            raise BackboneError(f"backbone.name: {config.name} is not an open_clip VisionTransformer (the adapters read its blocks' tokens)")
        n_layers = vision.layers
        layers = []
        for layer, key in ((config.stage1_layer, "stage1_layer"), (config.stage2_layer, "stage2_layer")):
            if not -n_layers <= layer < n_layers:
                raise BackboneError(f"backbone.{key}: {layer} is out of range for {config.name} with {n_layers} blocks")
            layers.append(layer % n_layers)
        return cls(width=vision.width, n_layers=n_layers, image_size=_as_int_size(vision.image_size),
                   patch_size=_as_int_size(vision.patch_size), layers=tuple(layers),
                   config_sha256=hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest())

    def token_shapes(self) -> tuple[int, int]:
        """(number of patch tokens L, width D)."""
        grid = self.image_size // self.patch_size
        return grid * grid, self.width


class FrozenBackbone(nn.Module):
    """An open_clip vision tower in eval mode with gradients off, returning per-layer tokens."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.shape = BackboneShape.of(config)
        pretrained = None
        if config.weights != "random":
            weights = Path(config.weights)
            if not weights.is_file():
                raise BackboneError(f"backbone.weights: checkpoint file not found: {weights}")
            pretrained = str(weights)
        open_clip = open_clip_factory()
        # Random initialisation must be reproducible: the cache key and the demo rely on it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            try:
                clip = open_clip.create_model(config.name, pretrained=pretrained)
            except Exception as err:  # a file of another model, or no checkpoint: KeyError, RuntimeError, ...
                if pretrained is None:
                    raise
                reason = " ".join(str(err).split())[:300]  # one line: load_state_dict lists every key
                raise BackboneError(f"backbone.weights: {pretrained} cannot be loaded as {config.name} weights: "
                                    f"{type(err).__name__}: {reason}") from None
        self.visual = clip.visual
        self.visual.requires_grad_(False)
        self.visual.eval()
        built = (int(self.visual.transformer.width), len(self.visual.transformer.resblocks), _as_int_size(self.visual.image_size),
                 _as_int_size(self.visual.patch_size))
        if built != (self.shape.width, self.shape.n_layers, self.shape.image_size, self.shape.patch_size):
            raise BackboneError(f"backbone.name: {config.name} built as (width, blocks, image size, patch) {built}, "
                                f"its config says {self.shape}")  # the cache key was made from the config
        self.preprocess = open_clip.image_transform(
            self.visual.image_size,
            is_train=False,
            mean=getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN,
            std=getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD,
        )

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)  # frozen: dropout and friends stay off, whatever the caller says

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FrozenTokens:
        layers = self.shape.layers
        wanted = sorted(set(layers))
        out = self.visual.forward_intermediates(
            images, indices=wanted, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        by_layer = dict(zip(wanted, zip(out["image_intermediates_prefix"], out["image_intermediates"])))
        stage1_prefix, _ = by_layer[layers[0]]
        _, stage2_patches = by_layer[layers[1]]
        return FrozenTokens(cls=stage1_prefix[:, 0].float(), patches=stage2_patches.float())


class LazyBackbone:
    """A backbone's shape at once, and the FrozenBackbone itself only when something asks for
    :attr:`module` (a cache build, online tokens): what ``prepare`` hands to every run."""

    def __init__(self, config: BackboneConfig) -> None:
        self.config = config
        self.shape = BackboneShape.of(config)
        self._module: FrozenBackbone | None = None

    @property
    def built(self) -> bool:
        return self._module is not None

    @property
    def module(self) -> FrozenBackbone:
        if self._module is None:
            self._module = FrozenBackbone(self.config)
        return self._module


def weights_identity(config: BackboneConfig) -> str:
    """A string that changes whenever the weights do: the file's sha256, or the random seed."""
    if config.weights == "random":
        return f"random:seed={config.seed}"
    path = Path(config.weights)
    if not path.is_file():
        raise BackboneError(f"backbone.weights: checkpoint file not found: {path}")
    return f"sha256:{file_sha256(path)}"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hashed once per process while its size and mtime stay the
    same (ViT-L-14's 0.9-1.7 GB take seconds, and the study definition and the cache key both ask)."""
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_int_size(size) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise BackboneError(f"non-square input size {size} is not supported")
        return int(size[0])
    return int(size)
