"""Where a training run gets its frozen tokens: the cache, or the backbone on the fly.

Both sources hand out the same FrozenTokens for the same rows, so ``feature_mode: online`` trains
the same model as ``cache`` for the same seed (up to the cache's storage precision).
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from model.backbone import FrozenBackbone, FrozenTokens
from model.cache import FeatureCache
from model.images import ImageDataset
from model.runtime import autocast

log = logging.getLogger(__name__)

# On the CPU, a cache up to this size is copied into memory once per run instead of being read
# from the memory map every batch; above it, the page cache does the work.
PRELOAD_MAX_BYTES = 8 << 30
# On a GPU the tokens are held in device memory whenever they fit, leaving this much free for
# the model, activations and fused trials (at least 8 GiB, or a tenth of the card): reading
# 16 MB of ViT-L tokens per batch from the memory map and copying them over PCIe costs
# milliseconds per step, as much as the whole step's compute at batch 32.
GPU_HEADROOM_BYTES = 8 << 30
_PRELOAD_CHUNK_BYTES = 256 << 20  # copied in slices, so no host copy of the whole cache is made


def preload_budget(device: torch.device) -> int:
    """Bytes of tokens a source may hold on ``device`` (CUDA: what is free now, less headroom)."""
    if device.type != "cuda":
        return PRELOAD_MAX_BYTES
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(GPU_HEADROOM_BYTES, total // 10))


class TokenSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> FrozenTokens: ...


class CachedTokens:
    """Rows of a feature cache, optionally preloaded (kept in the storage dtype, cast per batch)."""

    def __init__(self, cache: FeatureCache, rows: np.ndarray, device: torch.device, *, preload: bool | None = None) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.device = device
        row_bytes = cache.cls[0].nbytes + cache.patches[0].nbytes
        size = row_bytes * len(self.rows)
        budget = None
        if preload is None:
            budget = preload_budget(device)
            preload = size <= budget
        self.preloaded = preload
        if self.preloaded:
            chunk = max(1, _PRELOAD_CHUNK_BYTES // row_bytes)
            self.cls = _copy_rows(cache.cls, self.rows, device, chunk)
            self.patches = _copy_rows(cache.patches, self.rows, device, chunk)
        else:
            self.cache = cache
        where = f"held on {device}" if self.preloaded else "read from the memory map every batch"
        reason = "" if budget is None else f" (budget {budget / 2**30:.1f} GiB)"
        log.info("%d cached rows, %.2f GiB: %s%s", len(self.rows), size / 2**30, where, reason)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray) -> FrozenTokens:
        if self.preloaded:
            index = torch.as_tensor(indices).to(self.device, non_blocking=True)  # no stream sync on CUDA
            cls, patches = self.cls[index], self.patches[index]
        else:
            rows = self.rows[indices]
            order = np.argsort(rows)  # read the memory map in file order, then restore batch order
            inverse = np.argsort(order)
            cls = torch.from_numpy(self.cache.cls[rows[order]][inverse]).to(self.device, non_blocking=True)
            patches = torch.from_numpy(self.cache.patches[rows[order]][inverse]).to(self.device, non_blocking=True)
        return FrozenTokens(cls=cls.float(), patches=patches.float())


def _copy_rows(array: np.ndarray, rows: np.ndarray, device: torch.device, chunk: int) -> torch.Tensor:
    """array[rows] as a tensor on ``device``, copied ``chunk`` rows at a time (storage dtype kept)."""
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    out = torch.empty((len(rows), *array.shape[1:]), dtype=dtype, device=device)
    for start in range(0, len(rows), chunk):
        # split rows come in file order (np.flatnonzero), so each slice is a near-contiguous read
        out[start : start + chunk] = torch.from_numpy(np.ascontiguousarray(array[rows[start : start + chunk]]))
    return out


class OnlineTokens:
    """Decode, preprocess and run the backbone for every batch (no cache; the slow reference path)."""

    def __init__(self, backbone: FrozenBackbone, paths: list[str], device: torch.device) -> None:
        self.backbone = backbone.to(device)
        self.images = ImageDataset(paths, backbone.preprocess)
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: np.ndarray) -> FrozenTokens:
        images = self.images.batch(indices).to(self.device)
        with autocast(self.device, self.backbone.config.precision == "bf16"):
            return self.backbone(images)
