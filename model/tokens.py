"""Where a training run gets its frozen tokens: the cache, or the backbone on the fly.

Both sources hand out the same FrozenTokens for the same rows, so ``feature_mode: online`` trains
the same model as ``cache`` for the same seed (up to the cache's storage precision). The loops
take an epoch's batches through :func:`read_batches`, which reads a memory-mapped cache ahead in a
background thread; :class:`HeldTokens` keeps preloaded tokens from one trial to the next.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from model.augment import ViewPlan
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
# Batches a memory-mapped source reads ahead of the one training. Two keep the reader busy through
# one slow read (a page-cache miss) without holding more than a few batches of host memory.
PREFETCH_BATCHES = 2


def preload_budget(device: torch.device) -> int:
    """Bytes of tokens a source may hold on ``device`` (CUDA: what is free now, less headroom)."""
    if device.type != "cuda":
        return PRELOAD_MAX_BYTES
    free, total = torch.cuda.mem_get_info(device)
    # Blocks this process's caching allocator holds without a tensor in them (the previous trial's
    # tokens, above all) are not free to the driver, but torch reuses or releases them for the next
    # allocation: without them every trial after a process's first would fall back to the memory map.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
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
        self.cache = cache
        self.preloaded = False
        if preload:
            chunk = max(1, _PRELOAD_CHUNK_BYTES // row_bytes)
            try:
                self.cls = _copy_rows(cache.cls, self.rows, device, chunk)
                self.patches = _copy_rows(cache.patches, self.rows, device, chunk)
                self.preloaded = True
            except torch.OutOfMemoryError:
                if budget is None:  # preloading was asked for, not decided here
                    raise
                # The memory was there when the budget was read: another process on the card (a
                # worker starting at the same moment) took it since. Train from the memory map.
                self.cls = self.patches = None
                log.warning("%d cached rows, %.2f GiB: out of memory on %s while preloading; reading the memory map instead",
                            len(self.rows), size / 2**30, device)
        where = f"held on {device}" if self.preloaded else f"read from the memory map, {PREFETCH_BATCHES} batches ahead"
        reason = "" if budget is None else f" (budget {budget / 2**30:.1f} GiB)"
        log.info("%d cached rows, %.2f GiB: %s%s", len(self.rows), size / 2**30, where, reason)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray) -> FrozenTokens:
        if self.preloaded:
            index = torch.as_tensor(indices).to(self.device, non_blocking=True)  # no stream sync on CUDA
            return FrozenTokens(cls=self.cls[index].float(), patches=self.patches[index].float())
        return self.upload(self.read(indices))

    def read(self, indices: np.ndarray) -> FrozenTokens:
        """A batch's rows from the memory map into host tensors, in batch order: pinned when they go
        to a GPU (so the copy is asynchronous), float32 already when they stay on the CPU. Needs only
        numpy and torch.empty, so it runs in :func:`read_batches`' thread."""
        rows = self.rows[indices]
        pin = self.device.type == "cuda"
        host = FrozenTokens(*(torch.empty((len(rows), *array.shape[1:]), dtype=_torch_dtype(array), pin_memory=pin)
                              for array in (self.cache.cls, self.cache.patches)))
        _gather(self.cache.cls, rows, host.cls.numpy())
        _gather(self.cache.patches, rows, host.patches.numpy())
        return host if pin else FrozenTokens(cls=host.cls.float(), patches=host.patches.float())

    def upload(self, host: FrozenTokens) -> FrozenTokens:
        """What :meth:`read` returned, on the device in float32 (cast there: half the bytes over PCIe).
        The pinned buffers go back to torch's host allocator, which reuses them only after the copy ran."""
        return FrozenTokens(*(t.to(self.device, non_blocking=True).float() for t in (host.cls, host.patches)))


class HeldTokens:
    """The preloaded sources of one PreparedData, kept from one run to the next.

    A study trains every trial on the same PreparedData, so the next trial (same split, same
    device) takes the tokens already on the device instead of copying its split there again:
    for FF++ on a GPU that copy is ~52 GB, tens of seconds a trial. Only preloaded sources are
    kept; a memory-mapped one costs nothing to make. Runs only read a source (a batch is a
    gathered copy), so a kept one is as new.
    """

    def __init__(self) -> None:
        self._sources: dict[tuple[str, str, str], CachedTokens] = {}

    def get(self, cache: FeatureCache, rows: np.ndarray, device: torch.device) -> CachedTokens:
        key = (cache.key, str(device), hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest())
        source = self._sources.get(key)
        if source is None:
            source = CachedTokens(cache, rows, device)
            if source.preloaded:
                self._sources[key] = source
        else:
            log.info("%d cached rows: still held on %s from an earlier run", len(source), device)
        return source

    def __len__(self) -> int:
        return len(self._sources)


def read_batches(source: TokenSource, batches: Iterable[np.ndarray]) -> Iterator[FrozenTokens]:
    """``source.batch(b)`` for each of ``batches``, in order.

    A memory-mapped cache (one that did not fit where the run trains, e.g. the 2nd..Kth worker
    process on a GPU, or a dataset larger than the card) is read PREFETCH_BATCHES batches ahead in
    a background thread, so a step waits neither for the page cache nor for the disk, and on CUDA
    the copy from pinned memory overlaps the previous step's kernels. Preloaded and online
    sources are read in the calling thread. A read's error is raised here, at its batch; leaving
    the loop early stops the reader.
    """
    if not isinstance(source, CachedTokens) or source.preloaded or PREFETCH_BATCHES == 0:
        yield from (source.batch(indices) for indices in batches)
        return
    remaining = iter(batches)
    device = source.device
    # A new thread's current CUDA device is 0: pinning memory there would open a context on GPU 0
    # in a worker process that trains on another one.
    set_device = None
    if device.type == "cuda":
        set_device = functools.partial(torch.cuda.set_device, torch.cuda.current_device() if device.index is None else device.index)
    reader = ThreadPoolExecutor(1, thread_name_prefix="fairfront-prefetch", initializer=set_device)
    try:
        pending = collections.deque(reader.submit(source.read, b) for b in itertools.islice(remaining, PREFETCH_BATCHES))
        while pending:
            host = pending.popleft().result()
            pending.extend(reader.submit(source.read, b) for b in itertools.islice(remaining, 1))
            yield source.upload(host)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype


def _gather(array: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[i] = array[rows[i]], row by row in file order, straight into place: numpy copies a row
    without holding the GIL, and a fancy-indexed read would make a second copy (to a temporary)."""
    for position in np.argsort(rows, kind="stable"):
        out[position] = array[rows[position]]


def _copy_rows(array: np.ndarray, rows: np.ndarray, device: torch.device, chunk: int) -> torch.Tensor:
    """array[rows] as a tensor on ``device`` (storage dtype kept). To a GPU through pinned buffers of
    ``chunk`` rows, so no host copy of the whole split is made and each buffer's copy to the
    device runs while the next one is gathered."""
    out = torch.empty((len(rows), *array.shape[1:]), dtype=_torch_dtype(array), device=device)
    if device.type != "cuda":
        _gather(array, rows, out.numpy())
        return out
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        staging = torch.empty((len(part), *array.shape[1:]), dtype=out.dtype, pin_memory=True)
        _gather(array, part, staging.numpy())
        # torch's host allocator hands this buffer out again only after the copy has run
        out[start : start + len(part)].copy_(staging, non_blocking=True)
    return out


class OnlineTokens:
    """Decode, preprocess and run the backbone for every batch (no cache; the slow reference path)."""

    def __init__(self, backbone: FrozenBackbone, paths: list[str], device: torch.device, views: ViewPlan | None = None) -> None:
        self.backbone = backbone.to(device)
        self.images = ImageDataset(paths, backbone.preprocess, views)
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: np.ndarray) -> FrozenTokens:
        images, failures = self.images.batch(indices)
        if bad := [f"{self.images.paths[int(i)]} ({reason})" for i, reason in zip(indices, failures) if reason]:
            raise ValueError(f"cannot decode image(s): {'; '.join(bad)}")
        images = images.to(self.device)
        with autocast(self.device, self.backbone.config.precision == "bf16"):
            return self.backbone(images)
