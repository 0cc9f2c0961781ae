"""Where a training run gets its frozen tokens: the cache, or the backbone on the fly.

Both sources hand out the same FrozenTokens for the same rows, so ``feature_mode: online`` trains
the same model as ``cache`` for the same seed (up to the cache's storage precision).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from model.backbone import FrozenBackbone, FrozenTokens
from model.cache import FeatureCache
from model.images import ImageDataset
from model.runtime import autocast

# Below this size the cache is copied into memory (or onto the GPU) once per run instead of
# being read from the memory map every batch; above it, the page cache does the work.
PRELOAD_MAX_BYTES = 8 << 30


class TokenSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> FrozenTokens: ...


class CachedTokens:
    """Rows of a feature cache, optionally preloaded (kept in the storage dtype, cast per batch)."""

    def __init__(self, cache: FeatureCache, rows: np.ndarray, device: torch.device, *, preload: bool | None = None) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.device = device
        size = (cache.cls[0].nbytes + cache.patches[0].nbytes) * len(self.rows)
        self.preloaded = size <= PRELOAD_MAX_BYTES if preload is None else preload
        if self.preloaded:
            # Sorted, contiguous reads are far faster from a memory map than random ones.
            self.cls = torch.from_numpy(np.ascontiguousarray(cache.cls[self.rows])).to(device)
            self.patches = torch.from_numpy(np.ascontiguousarray(cache.patches[self.rows])).to(device)
        else:
            self.cache = cache

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
