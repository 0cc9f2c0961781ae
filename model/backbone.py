"""The frozen CLIP vision tower and the tokens it hands to the adapters.

ViT-L-14 and the tiny test ViT go through the same lines: the size comes from the open_clip
model config, never from a branch on the name. Weights come from a local file ("random" for
tests and the demo); nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
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
    ~2.5 s, and only building a backbone needs it: `show`, `export`, `report`, `dashboard` and
    every `--help` do not.
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


class FrozenBackbone(nn.Module):
    """An open_clip vision tower in eval mode with gradients off, returning per-layer tokens."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        open_clip = open_clip_factory()
        if config.name not in open_clip.list_models():
            raise BackboneError(f"backbone.name: unknown open_clip model {config.name!r}")
        pretrained = None
        if config.weights != "random":
            weights = Path(config.weights)
            if not weights.is_file():
                raise BackboneError(f"backbone.weights: checkpoint file not found: {weights}")
            pretrained = str(weights)
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
        self.width = int(self.visual.transformer.width)
        self.n_layers = len(self.visual.transformer.resblocks)
        self.image_size = _as_int_size(self.visual.image_size)
        self.layers = tuple(self._layer_index(v, key) for v, key in ((config.stage1_layer, "stage1_layer"), (config.stage2_layer, "stage2_layer")))
        self.preprocess = open_clip.image_transform(
            self.visual.image_size,
            is_train=False,
            mean=getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN,
            std=getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD,
        )

    def _layer_index(self, layer: int, key: str) -> int:
        if not -self.n_layers <= layer < self.n_layers:
            raise BackboneError(f"backbone.{key}: {layer} is out of range for {self.config.name} with {self.n_layers} blocks")
        return layer % self.n_layers

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)  # frozen: dropout and friends stay off, whatever the caller says

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FrozenTokens:
        wanted = sorted(set(self.layers))
        out = self.visual.forward_intermediates(
            images, indices=wanted, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        by_layer = dict(zip(wanted, zip(out["image_intermediates_prefix"], out["image_intermediates"])))
        stage1_prefix, _ = by_layer[self.layers[0]]
        _, stage2_patches = by_layer[self.layers[1]]
        return FrozenTokens(cls=stage1_prefix[:, 0].float(), patches=stage2_patches.float())

    def token_shapes(self) -> tuple[int, int]:
        """(number of patch tokens L, width D)."""
        grid = self.image_size // _as_int_size(self.visual.patch_size)
        return grid * grid, self.width


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
    same (ViT-L-14's 1.7 GB take seconds, and the study definition and the cache key both ask)."""
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
