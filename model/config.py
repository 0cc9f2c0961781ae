"""The training-run configuration: one frozen dataclass per concept; the YAML schema is these classes.

A training-config YAML (``studies/demo_train.yaml``, or what ``run_study.py export`` writes) has
the sections ``workdir, output_dir, data, backbone, model, stage1, training, augment``. A study YAML holds
the same sections plus the search-specific ones (see ``search/config.py``).

``training`` defaults are the reference report's Exp3 ("balanced recovery") values; the key names
are the ones the reference project's training YAML uses.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from model.synthetic import GENDERS, RACES, SyntheticConfig
from model.typed_config import ConfigError, from_dict, load_yaml, to_dict

DEFAULT_ATTRIBUTES = {"gender": list(GENDERS), "race": list(RACES)}  # the synthetic generator's and FF++'s 8 groups


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the images and their labels are. Label 1 = fake."""

    manifest: Path | None = None  # CSV with train and val splits (FF++ in the real study)
    test_manifests: dict[str, Path] = field(default_factory=dict)  # name -> CSV (Celeb-DF, DFD, DFDC)
    image_root: Path | None = None  # relative image paths resolve here (default: the CSV's folder)
    attributes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ATTRIBUTES.items()})
    # When set, `prepare` generates the synthetic demo dataset into <workdir>/data and uses it.
    synthetic: SyntheticConfig | None = None
    num_workers: int = 0  # image-decoding worker processes for the cache build and online mode

    def __post_init__(self) -> None:
        _check((self.manifest is None) != (self.synthetic is None), "give exactly one of 'manifest' or 'synthetic'")
        _check(not (self.synthetic is not None and self.test_manifests), "'test_manifests' come from the generator when 'synthetic' is set")
        _check(len(self.attributes) > 0, "'attributes' must name at least one demographic column")
        for name, codes in self.attributes.items():
            _check(len(codes) > 0 and len(set(codes)) == len(codes), f"attributes.{name}: codes must be a non-empty list without duplicates")
            _check(all(code and "/" not in code for code in codes), f"attributes.{name}: a code must be non-empty and without '/' "
                   f"(it joins group names such as male/white), got {codes}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen open_clip vision tower and which of its tokens feed the adapters."""

    name: str = "ViT-L-14-quickgelu"  # OpenAI weights need the QuickGELU variant
    # A local checkpoint file (relative to the YAML's folder, like every path), or "random" for
    # random weights (tests and the demo only). There is no default on purpose: weights never come
    # from a hub, and random weights must be asked for.
    weights: Literal["random"] | Path | None = None
    stage1_layer: int = -1  # block whose CLS token feeds the Stage 1 adapter (negative: from the end)
    stage2_layer: int = -1  # block whose patch tokens feed the Stage 2 adapter
    seed: int = 0  # initialisation seed for random weights
    batch_size: int = 64  # feature-extraction batch
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast dtype of the backbone forward on CUDA
    cache_dtype: Literal["float16", "float32"] = "float16"  # storage dtype of the feature cache

    def __post_init__(self) -> None:
        _check(self.weights is not None, "weights: give a local checkpoint path, or 'random' for random weights (tests/demo)")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")


@dataclass(frozen=True)
class ModelConfig:
    """Adapter and fusion sizes, as ratios of the backbone width so one config fits every ViT."""

    stage1_hidden_ratio: float = 1.0
    stage2_hidden_ratio: float = 2.0  # ViT-L-14: 2 blocks x (1024 -> 2048 -> 1024) = 8.4M parameters
    stage2_blocks: int = 2
    attn_dim_ratio: float = 0.25  # cross-attention inner width: 256 on ViT-L-14
    attn_heads: int = 4

    def __post_init__(self) -> None:
        for name in ("stage1_hidden_ratio", "stage2_hidden_ratio", "attn_dim_ratio"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.stage2_blocks >= 1, f"stage2_blocks must be >= 1, got {self.stage2_blocks}")
        _check(self.attn_heads >= 1, f"attn_heads must be >= 1, got {self.attn_heads}")


@dataclass(frozen=True)
class Stage1Config:
    """The frozen Stage 1 adapter: loaded from ``checkpoint``, or trained once by ``prepare``."""

    checkpoint: Path | None = None
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything the search may tune, plus the run settings. Defaults: the report's Exp3."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 3
    num_epochs: int = 30
    batch_size: int = 32
    dropout: float = 0.15
    label_smoothing: float = 0.1
    lambda_fair: float = 0.15
    sinkhorn_blur: float = 1e-4
    # geomloss' default 0.5 under-estimates 1-D transport by up to 3x; 0.9 is within ~1% of exact.
    sinkhorn_scaling: float = 0.9
    fair_min_group_size: int = 2  # groups with fewer samples of a label in a batch are skipped
    gate_init_bias: float = 0.0
    optimizer: Literal["adamw", "adam", "sgd", "radam"] = "adamw"
    momentum: float = 0.9  # SGD only
    scheduler: Literal["cosine_restarts", "cosine", "constant"] = "cosine_restarts"
    T_0: int = 5  # first cosine cycle, epochs (reference: T_0=5, T_mult=2)
    T_mult: int = 2
    min_lr: float = 1e-6
    grad_clip: float | None = 1.0
    head_lr_mult: float = 1.0  # differential lr: fusion + head train at lr * head_lr_mult
    threshold: float = 0.5  # score >= threshold means "fake"
    # Stop when every validation prediction is still one class after this many epochs
    # (the reference saw 5 degenerate epochs as normal, 11 as pathological). None: never stop.
    stop_if_degenerate_after: int | None = None
    # Stop after this many epochs in a row that did not improve the best validation AUC: the
    # reference project's `early-stop` (15-20 there). Degenerate epochs do not count (that phase
    # has its own rule above), nor does the last epoch. None: run every epoch.
    early_stop_patience: int | None = None
    feature_mode: Literal["cache", "online"] = "cache"
    # torch.compile the fairness loss's Sinkhorn iterations (objectives/_sinkhorn_packed.py): a few
    # fused kernels per 8 iterations instead of ~12 ops each; each process compiles once, before
    # its first run (~20 s on 2 CPU cores). Off by default (it needs a compiler, and gains ~10% on a
    # CPU); 1.7-1.9x faster trials on an H200, so the GPU study turns it on (bench/results/trial_scale.md).
    compile_sinkhorn: bool = False
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"lr must be >= 0, got {self.lr}")  # 0 is allowed: it forces a degenerate run
        _check(self.sinkhorn_blur > 0, f"sinkhorn_blur must be > 0, got {self.sinkhorn_blur}")
        _check(0 < self.sinkhorn_scaling < 1, f"sinkhorn_scaling must be in (0, 1), got {self.sinkhorn_scaling}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.lambda_fair >= 0, f"lambda_fair must be >= 0, got {self.lambda_fair}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.num_epochs >= 1, f"num_epochs must be >= 1, got {self.num_epochs}")
        _check(0 <= self.warmup_epochs < self.num_epochs or self.warmup_epochs == 0, f"warmup_epochs must be < num_epochs, got {self.warmup_epochs}")
        _check(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        _check(self.T_0 >= 1 and self.T_mult >= 1, f"T_0 and T_mult must be >= 1, got {self.T_0}, {self.T_mult}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        _check(self.head_lr_mult > 0, f"head_lr_mult must be > 0, got {self.head_lr_mult}")
        _check(self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}")  # a negative floor climbs the loss
        _check(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        _check(0 < self.threshold < 1, f"threshold must be in (0, 1), got {self.threshold}")
        _check(self.stop_if_degenerate_after is None or self.stop_if_degenerate_after >= 1, "stop_if_degenerate_after must be >= 1 or null")
        _check(self.early_stop_patience is None or self.early_stop_patience >= 1, f"early_stop_patience must be >= 1 or null, got {self.early_stop_patience}")
        _check(self.fair_min_group_size >= 1, f"fair_min_group_size must be >= 1, got {self.fair_min_group_size}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-image augmentation as cached views (DESIGN: cache several augmented views per image
    and draw one per epoch, as Tip-Adapter does, rather than give up the cache). Each training image
    gets ``views`` fixed augmentations, drawn from (seed, manifest row, view); their tokens are
    cached once, and every epoch each image is read in one of its views, drawn at random. Online
    mode computes the same views on the fly. Validation and test images are never augmented, and
    Stage 1 trains on the plain images. ``views: 0`` turns it off."""

    views: int = 0
    seed: int = 0
    hflip: float = 0.5  # probability of a horizontal flip
    crop_scale: float = 1.0  # a square crop keeping at least this share of the area (1: no crop)
    color_jitter: float = 0.0  # brightness, contrast and saturation factors from [1 - x, 1 + x]
    blur: float = 0.0  # probability of a Gaussian blur (radius 0.1-2 px)
    jpeg: float = 0.0  # probability of JPEG re-compression ...
    jpeg_quality: int = 60  # ... at a quality from [jpeg_quality, 100]

    def __post_init__(self) -> None:
        _check(self.views >= 0, f"views must be >= 0, got {self.views}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        for name in ("hflip", "blur", "jpeg"):
            _check(0 <= getattr(self, name) <= 1, f"{name} is a probability, got {getattr(self, name)}")
        _check(0 < self.crop_scale <= 1, f"crop_scale must be in (0, 1], got {self.crop_scale}")
        _check(0 <= self.color_jitter < 1, f"color_jitter must be in [0, 1), got {self.color_jitter}")
        _check(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        _check(self.views == 0 or self.changes_images,
               "views > 0 but no augmentation is switched on (hflip, crop_scale < 1, color_jitter, blur or jpeg)")

    def identity(self) -> dict:
        """What the trials see of it: with views off the other settings change nothing (the study
        definition, the fusion key and the views cache's key use this)."""
        return dataclasses.asdict(self) if self.views else {"views": 0}

    @property
    def changes_images(self) -> bool:
        return self.hflip > 0 or self.crop_scale < 1 or self.color_jitter > 0 or self.blur > 0 or self.jpeg > 0


@dataclass(frozen=True)
class TrainRunConfig:
    """One training run of the Stage 2 model: the training-config YAML."""

    workdir: Path  # shared, generated state: synthetic data, feature caches, the Stage 1 checkpoint
    data: DataConfig
    backbone: BackboneConfig
    output_dir: Path | None = None  # this run's outputs (default <workdir>/train)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def run_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else self.workdir / "train"

    def with_training(self, **changes) -> "TrainRunConfig":
        """A copy with some training values replaced (a search trial's parameters)."""
        try:
            training = dataclasses.replace(self.training, **changes)
        except TypeError as err:
            raise ConfigError(f"training: {err}") from None
        return dataclasses.replace(self, training=training)


def load_train_config(path: str | Path) -> TrainRunConfig:
    """Load and validate a training-config YAML; errors name the file and the key."""
    path = Path(path)
    data = load_yaml(path)
    try:
        return from_dict(TrainRunConfig, data, where="", base_dir=path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def train_config_to_yaml_dict(config: TrainRunConfig, *, relative_to: Path | None = None) -> dict:
    return to_dict(config, relative_to=relative_to)
