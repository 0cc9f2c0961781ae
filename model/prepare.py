"""`prepare`: everything a study's trials share, made once and checked every time.

Order matters: every manifest is validated before any backbone is built or any GPU time is
spent; then the feature caches; then the frozen Stage 1 adapter. Each step reuses what is
already on disk and valid, so calling ``prepare`` again is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.backbone import LazyBackbone, file_sha256, weights_identity
from model.cache import FeatureCache, open_or_build_cache
from model.config import TrainRunConfig
from model.detector import AdapterDetector
from model.manifest import Manifest, load_manifest
from model.runtime import resolve_device
from model.stage1 import Stage1Error, load_stage1_state, save_stage1, stage1_key, train_stage1
from model.synthetic import generate
from model.tokens import HeldTokens
from model.typed_config import to_dict

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    config: TrainRunConfig
    manifest: Manifest  # train + val
    test_manifests: dict[str, Manifest]
    backbone: LazyBackbone  # built only if a cache is missing or a run reads images online
    cache: FeatureCache  # of `manifest`
    stage1_checkpoint: Path
    stage1_state: dict[str, torch.Tensor]
    test_caches: dict[str, FeatureCache] = field(default_factory=dict)
    # the training rows' augmented views (augment.views > 0, cache mode), view-major: augment.view_rows
    views: FeatureCache | None = None
    # the token sources its runs preloaded, for the next run to reuse (a study's trials share them)
    held_tokens: HeldTokens = field(default_factory=HeldTokens, repr=False, compare=False)

    def views_cache(self, device: torch.device, *, progress: bool = False) -> FeatureCache:
        """The views cache: opened, or built, the first time a run (or ``prepare``) asks for it."""
        if self.views is None:
            self.views = open_or_build_cache(self.manifest, self.backbone, self.config.workdir / "features", device=device,
                                             num_workers=self.config.data.num_workers, progress=progress, augment=self.config.augment)
        return self.views


def data_paths(config: TrainRunConfig, *, progress: bool = True) -> tuple[Path, dict[str, Path]]:
    """The manifests of a config; for the synthetic demo, generated under the workdir if absent."""
    data = config.data
    if data.synthetic is not None:
        dataset = generate(config.workdir / "data", data.synthetic, progress=progress)
        return dataset.manifest, dict(dataset.test_manifests)
    return data.manifest, dict(data.test_manifests)


def load_manifests(config: TrainRunConfig, *, progress: bool = True) -> tuple[Manifest, dict[str, Manifest]]:
    """Validate every manifest (train/val and test sets) up front; raises ManifestError."""
    main_path, test_paths = data_paths(config, progress=progress)
    attributes = config.data.attributes
    main = train_val_manifest(load_manifest(main_path, attributes=attributes, image_root=config.data.image_root))
    tests = {
        name: load_manifest(path, attributes=attributes, required_splits=("test",), default_split="test", image_root=config.data.image_root)
        for name, path in test_paths.items()
    }
    return main, tests


def train_val_manifest(manifest: Manifest) -> Manifest:
    """The train and val rows of ``data.manifest``. Its test rows (FF++'s official split, say) are
    left out with a warning: trials never use them, caching them would cost backbone time, and
    test sets are scored from data.test_manifests. (The sha256 stays the file's.)"""
    test = (manifest.frame["split"] == "test").to_numpy()
    if not test.any():
        return manifest
    log.warning("%s: %d rows of split 'test' left out: trials train on 'train' and validate on 'val'; "
                "give test sets as data.test_manifests to score them with `evaluate`", manifest.path, int(test.sum()))
    return dataclasses.replace(manifest, frame=manifest.frame[~test].reset_index(drop=True))


def image_sizes_sha256(paths) -> str:
    """The images' byte sizes in manifest order: another image set under the same names (data.image_root
    pointed elsewhere, images replaced in place) almost always differs, while a copy on another
    node does not (no paths or mtimes, which the cache key uses). One stat per image."""
    return hashlib.sha256(",".join(str(os.stat(path).st_size) for path in paths).encode()).hexdigest()


def inputs_settings(config: TrainRunConfig) -> dict:
    """The part of :func:`inputs_identity` that the YAML alone gives (no file is read): the
    synthetic settings, the attributes, the backbone's name, layers, dtypes and random seed, the
    Stage 1 training settings, the augmentation. The read commands compare it to a study's."""
    data, backbone = config.data, config.backbone
    features = {"name": backbone.name, "stage1_layer": backbone.stage1_layer, "stage2_layer": backbone.stage2_layer,
                "precision": backbone.precision, "cache_dtype": backbone.cache_dtype}
    if backbone.weights == "random":
        features["weights"] = weights_identity(backbone)
    return {
        # synthetic data is generated deterministically from these settings
        "data": ({"synthetic": to_dict(data.synthetic)} if data.synthetic is not None else {}) | {"attributes": to_dict(data.attributes)},
        "backbone": features,
        "stage1": {k: v for k, v in to_dict(config.stage1).items() if k != "checkpoint"} if config.stage1.checkpoint is None else {},
        "augment": config.augment.identity(),
    }


def inputs_identity(config: TrainRunConfig) -> dict:
    """What a run's numbers depend on besides its training and model settings, by content rather
    than location (paths differ between the nodes of one study): the train/val data and its
    attributes, the backbone that makes the features, the frozen Stage 1 adapter, the augmentation.
    :func:`inputs_settings` plus the hashes of the manifest, the images' sizes, the weight file and
    a given Stage 1 checkpoint; builds, generates and trains nothing. Test manifests are left out:
    they are scored after a search, and never change a trial."""
    data, backbone = config.data, config.backbone
    identity = inputs_settings(config)
    if data.synthetic is None:
        manifest = train_val_manifest(load_manifest(data.manifest, attributes=data.attributes, image_root=data.image_root))
        identity["data"] |= {"manifest_sha256": manifest.sha256, "image_sizes_sha256": image_sizes_sha256(manifest.frame["path"])}
    if backbone.weights != "random":
        identity["backbone"]["weights"] = weights_identity(backbone)
    if config.stage1.checkpoint is not None:
        try:
            identity["stage1"] = {"checkpoint_sha256": file_sha256(config.stage1.checkpoint)}
        except OSError as err:
            raise Stage1Error(f"stage1.checkpoint: cannot read {config.stage1.checkpoint}: {err.strerror or err}") from None
    return identity


def prepare(config: TrainRunConfig, *, progress: bool = True, with_test_caches: bool = True, with_views: bool = True) -> PreparedData:
    """``with_views=False``: no augmented views cache (scoring test sets needs none); a run that
    needs it builds it then (PreparedData.views_cache)."""
    manifest, test_manifests = load_manifests(config, progress=progress)
    device = resolve_device(config.training.device)
    backbone = LazyBackbone(config.backbone)
    check_model_fits(config, backbone.shape.width)
    given = config.stage1.checkpoint  # checked before any feature is extracted
    given_state = None if given is None else load_stage1_state(given, backbone.shape.width, config.model)
    cache_root = config.workdir / "features"
    workers = config.data.num_workers
    cache = open_or_build_cache(manifest, backbone, cache_root, device=device, num_workers=workers, progress=progress)
    test_caches = {}
    if with_test_caches:
        test_caches = {
            name: open_or_build_cache(m, backbone, cache_root, device=device, num_workers=workers, progress=progress)
            for name, m in test_manifests.items()
        }
    if given is None:
        checkpoint, state = _train_or_reuse_stage1(config, manifest, cache, backbone.shape.width, device)
    else:
        checkpoint, state = given, given_state
    prepared = PreparedData(config, manifest, test_manifests, backbone, cache, checkpoint, state, test_caches)
    if with_views and config.augment.views and config.training.feature_mode == "cache":  # (online runs make them on the fly)
        prepared.views_cache(device, progress=progress)
    return prepared


def check_model_fits(config: TrainRunConfig, width: int) -> None:
    """Build the detector on the meta device (no memory, no arithmetic): a model setting that does
    not fit the backbone (``model.attn_heads`` not dividing the attention width) then fails before
    the cache is built, not in every trial after it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        AdapterDetector(width, config.model, dropout=config.training.dropout, gate_init_bias=config.training.gate_init_bias)


def _train_or_reuse_stage1(config: TrainRunConfig, manifest: Manifest, cache: FeatureCache, width: int, device: torch.device):
    key = stage1_key(cache.key, config.model, config.stage1)
    path = config.workdir / "stage1" / f"stage1-{key[:16]}.pt"
    if path.is_file():
        try:
            state = load_stage1_state(path, width, config.model, key=key)
            log.info("stage 1 adapter reused: %s", path)
            return path, state
        except ValueError as err:
            log.warning("stage 1 checkpoint rebuilt: %s", err)
    frame = manifest.frame
    train, val = (frame.index[frame["split"] == s].to_numpy() for s in ("train", "val"))
    labels = frame["label"].to_numpy()
    adapter, auc = train_stage1(
        cache.cls[train], labels[train], cache.cls[val], labels[val], model=config.model, config=config.stage1, device=device
    )
    save_stage1(path, adapter, key=key, width=width, val_auc=auc)
    log.info("stage 1 adapter trained: val AUC %.4f -> %s", auc, path)
    return path, load_stage1_state(path, width, config.model, key=key)
