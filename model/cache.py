"""The frozen-feature cache: backbone tokens computed once per dataset, memory-mapped when read.

The backbone is a pure function of the image, so every trial and every epoch of a study can read
the same tokens from disk instead of running ViT-L/14 again (the main performance lever).

Layout of one cache (one folder per manifest x backbone x weights x layers x dtype):

    cls.npy      [N, D]     CLS token of the Stage 1 layer
    patches.npy  [N, L, D]  patch tokens of the Stage 2 layer
    meta.json    key, shapes, sampled-block checksums; written LAST, so a folder without it is partial

A cache whose key differs (the manifest, an image, the weights, the layer choice, the open_clip
model config or release changed), whose files are truncated, or whose checksums do not match is
rebuilt, never used. A cache this user may not read stops the command with a PermissionError
naming it: it is not damaged, and deleting it would lose somebody's cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from model.augment import ViewPlan
from model.backbone import LazyBackbone, open_clip_factory, weights_identity
from model.config import AugmentConfig
from model.images import ImageDataset
from model.manifest import Manifest
from model.runtime import autocast
from model.cache_writer import BuildPhases, TokenWriter
from model.staging import ready, staging_folder

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_BAD_IMAGES_SHOWN = 20  # named in the error; the count says how many more
_ARRAYS = ("cls", "patches")
_CHECK_BLOCKS = 64
_BLOCK = 1 << 20


class CacheError(ValueError):
    """An existing cache cannot be used (it is rebuilt), or the manifest's images cannot be
    cached (the command stops with this one line); the message says why."""


@dataclass(frozen=True)
class FeatureCache:
    directory: Path
    key: str
    cls: np.ndarray  # memory-mapped, read-only
    patches: np.ndarray

    def __len__(self) -> int:
        return int(self.cls.shape[0])


def _images_fingerprint(paths) -> str:
    """Paths with their sizes and modification times: an image replaced under the same name
    changes the key. (One stat per image: ~0.3 s for 100k images, far cheaper than hashing.)"""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(manifest: Manifest, backbone: LazyBackbone, weights_id: str, augment: AugmentConfig | None = None) -> str:
    """Everything the cached numbers depend on; change any of it and the cache is rebuilt."""
    description = {
        "format": CACHE_FORMAT,
        "manifest_sha256": manifest.sha256,
        "images": _images_fingerprint(manifest.frame["path"]),
        "backbone": backbone.config.name,
        "model_config": backbone.shape.config_sha256,
        # the code that builds (and for random weights, initialises) the model and preprocesses
        # the images; a rebuild costs about a minute for FF++ on a GPU (target 4)
        "open_clip": open_clip_factory().__version__,
        "weights": weights_id,
        "layers": list(backbone.shape.layers),
        "image_size": backbone.shape.image_size,
        "precision": backbone.config.precision,
        "dtype": backbone.config.cache_dtype,
    }
    if augment is not None:  # (absent for the plain cache: its key, and its folder, stay as they were)
        description["augment"] = augment.identity()
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def open_cache(directory: Path, key: str) -> FeatureCache:
    """Open a finished cache or raise CacheError saying what is wrong with it. A cache this user
    may not read is not damaged: that is a PermissionError naming the file, and the cache stays."""
    try:
        return _open_cache(directory, key)
    except PermissionError as err:
        # Rebuilding would delete a teammate's (or root's) cache, ~50 GB for ViT-L on FF++, and the
        # new one would meet the same permissions; say what to fix instead.
        raise PermissionError(
            err.errno, f"the feature cache {directory} may not be read by this user ({err.strerror}); fix its "
            "permissions or give this study another workdir", err.filename or str(directory)) from None


def _open_cache(directory: Path, key: str) -> FeatureCache:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise CacheError(f"{directory}: no meta.json (never finished)")
    try:
        meta = json.loads(meta_path.read_text())
    except PermissionError:
        raise
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"{meta_path}: unreadable ({err})") from None
    if not all(isinstance(meta.get(part), dict) and set(_ARRAYS) <= set(meta[part]) for part in ("shapes", "checksums")):
        raise CacheError(f"{meta_path}: no shapes or checksums of {', '.join(_ARRAYS)} (not written by fairfront's cache build)")
    if meta.get("key") != key:
        raise CacheError(f"{directory}: built for other inputs (key {str(meta.get('key'))[:12]} != {key[:12]})")
    arrays = {}
    for name in _ARRAYS:
        path = directory / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except PermissionError:
            raise
        except (OSError, ValueError) as err:
            raise CacheError(f"{path}: unreadable or truncated ({err})") from None
        if list(array.shape) != meta["shapes"][name]:
            raise CacheError(f"{path}: shape {list(array.shape)} != recorded {meta['shapes'][name]}")
        if _file_checksum(path) != meta["checksums"][name]:
            raise CacheError(f"{path}: contents changed since it was written (checksum mismatch)")
        arrays[name] = array
    return FeatureCache(directory=directory, key=key, **arrays)


def open_or_build_cache(
    manifest: Manifest,
    backbone: LazyBackbone,
    root: Path,
    *,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    augment: AugmentConfig | None = None,
) -> FeatureCache:
    """The cache for ``manifest``: reused when valid, (re)built otherwise. With ``augment`` (views
    > 0): the cache of the training rows' augmented views instead, view-major (augment.view_rows)."""
    key = cache_key(manifest, backbone, weights_identity(backbone.config), augment)
    directory = root / (f"{manifest.path.stem}-{key[:16]}" if augment is None else f"{manifest.path.stem}-views{augment.views}-{key[:16]}")
    try:
        cache = open_cache(directory, key)
        log.info("feature cache reused: %s (%d images)", directory, len(cache))
        return cache
    except CacheError as err:
        if directory.exists():
            log.warning("feature cache rebuilt: %s", err)
    if augment is None:
        rows, views = np.arange(len(manifest.frame)), None
    else:
        views = ViewPlan.of(augment, np.flatnonzero(manifest.frame["split"].to_numpy() == "train"))
        rows = views.rows
    _build(manifest, rows, views, backbone, directory, key, device=device, num_workers=num_workers, progress=progress)
    return open_cache(directory, key)


def _build(manifest: Manifest, rows: np.ndarray, views: ViewPlan | None, backbone: LazyBackbone, directory: Path, key: str, *,
           device, num_workers, progress) -> None:
    with staging_folder(directory, what="a feature cache build") as staging:
        phases = _extract(manifest, rows, views, backbone, staging, device=device, num_workers=num_workers, progress=progress)
        ready(staging)
        _publish(manifest, len(rows), backbone, staging, directory, key, phases)


def _extract(manifest: Manifest, rows: np.ndarray, views: ViewPlan | None, backbone: LazyBackbone, staging: Path, *,
             device, num_workers, progress) -> BuildPhases:
    """The backbone's tokens of manifest rows ``rows``, each in its view (None: as it is), written
    to ``staging`` (without meta.json); returns where the time went."""
    paths = list(manifest.frame["path"].iloc[rows])
    lines = manifest.frame["line"].to_numpy()[rows]
    length, width = backbone.shape.token_shapes()
    dtype = np.dtype(backbone.config.cache_dtype)
    cls = np.lib.format.open_memmap(staging / "cls.npy", mode="w+", dtype=dtype, shape=(len(paths), width))
    patches = np.lib.format.open_memmap(staging / "patches.npy", mode="w+", dtype=dtype, shape=(len(paths), length, width))

    module = backbone.module.to(device)  # (built here, the first time a cache is missing)
    loader = DataLoader(
        ImageDataset(paths, module.preprocess, views),
        batch_size=backbone.config.batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        shuffle=False,
    )
    phases, offset = BuildPhases(), 0
    what = manifest.path.name if views is None else f"{manifest.path.name} (augmented views)"
    bar = tqdm(total=len(paths), desc=f"caching {what}", unit="img", disable=not progress)
    bad: list[str] = []

    def not_finite(start: int, stop: int) -> CacheError:
        return CacheError(f"{manifest.path}: the images at lines {lines[start]}-{lines[stop - 1]} give tokens that are "
                          f"not finite in {dtype.name} (nan, or beyond its range); try backbone.cache_dtype: float32")

    start = clock = time.perf_counter()
    with TokenWriter((cls, patches), backbone.config.batch_size, device, phases, not_finite) as tokens_out:
        for images, failures in loader:
            clock = _lap(phases, "waiting_for_images", clock)
            end = offset + images.shape[0]
            bad += [f"line {line} {path} ({reason})" for line, path, reason in zip(lines[offset:end], paths[offset:end], failures) if reason]
            if bad:  # the rest is only decoded (no forward), so that one error names every bad image
                offset = end
                bar.update(images.shape[0])
                bar.set_postfix(undecodable=len(bad))
                continue
            with autocast(device, backbone.config.precision == "bf16"):
                tokens = module(images.to(device, non_blocking=True))
            # in the storage dtype on the device: half the copy for float16, and an overflow (a token
            # beyond float16's 65504 becomes inf) is caught here, not as a NaN loss in every trial
            batch_cls, batch_patches = (t.to(getattr(torch, dtype.name)) for t in (tokens.cls, tokens.patches))
            finite = torch.isfinite(batch_cls).all() & torch.isfinite(batch_patches).all()
            clock = _lap(phases, "backbone", clock)
            tokens_out.push(offset, (batch_cls, batch_patches), finite)  # (its waits are phases of their own)
            offset = end
            bar.update(images.shape[0])
            bar.set_postfix(img_per_s=f"{offset / (time.perf_counter() - start):.0f}")
            clock = time.perf_counter()
        if not bad:
            tokens_out.close()
    bar.close()
    if bad:
        shown = "; ".join(bad[:_BAD_IMAGES_SHOWN]) + (f"; and {len(bad) - _BAD_IMAGES_SHOWN} more" if len(bad) > _BAD_IMAGES_SHOWN else "")
        raise CacheError(f"{manifest.path}: {len(bad)} image(s) that cannot be decoded: {shown}; fix or remove those rows")
    clock = time.perf_counter()
    cls.flush()
    patches.flush()
    del cls, patches
    _lap(phases, "flushing", clock)
    phases.seconds = time.perf_counter() - start
    return phases


def _lap(phases: BuildPhases, phase: str, since: float) -> float:
    now = time.perf_counter()
    setattr(phases, phase, getattr(phases, phase) + now - since)
    return now


def _publish(manifest: Manifest, n: int, backbone: LazyBackbone, staging: Path, directory: Path, key: str, phases: BuildPhases) -> None:
    """meta.json last, then the finished folder renamed into place (unless another worker's is there)."""
    length, width = backbone.shape.token_shapes()
    meta = {
        "key": key,
        "manifest": str(manifest.path),
        "backbone": backbone.config.name,
        "shapes": {"cls": [n, width], "patches": [n, length, width]},
        "dtype": backbone.config.cache_dtype,
        "checksums": {name: _file_checksum(staging / f"{name}.npy") for name in _ARRAYS},
        "seconds": round(phases.seconds, 2),
        "phases": {name: round(value, 2) for name, value in asdict(phases).items() if name != "seconds"},
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        staging.rename(directory)  # fails while `directory` exists (and is not empty)
    except OSError:
        # (an unpublished ``staging`` is removed by model.staging.staging_folder as the build ends)
        try:
            open_cache(directory, key)  # another worker (a node on the shared workdir) finished first:
            # keep theirs, which its readers may hold open; and a PermissionError (someone else's
            # cache, which we may not read) goes up with theirs left as it is
        except CacheError:  # a stale or broken cache in the way: replace it
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):  # (an OSError: lost the race to replace it)
                staging.rename(directory)
    log.info("feature cache built: %s (%d images, %.1f s: %s)", directory, n, phases.seconds, phases.summary())


def _file_checksum(path: Path) -> str:
    """sha256 of the size and up to 64 evenly spaced 1 MiB blocks: catches truncation and most
    corruption in milliseconds, where hashing a 50 GB ViT-L cache in full would take minutes."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    starts = sorted({int(i * max(size - _BLOCK, 0) / max(_CHECK_BLOCKS - 1, 1)) for i in range(_CHECK_BLOCKS)})
    with open(path, "rb") as handle:
        for start in starts:
            handle.seek(start)
            digest.update(handle.read(_BLOCK))
    return digest.hexdigest()
