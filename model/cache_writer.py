"""A cache build's tokens from the device to the cache's memory maps, behind the next forward.

The device runs batch i+1's forward while batch i's tokens come back to the host (into pinned
buffers on CUDA, so the copy does not stop the host) and a thread writes them to the memory maps.
Done one after the other, these cost a ViT-L-14 build on an H200 about half its rate: 774 img/s
built against 1741 img/s for the forward alone (bench/results/cache_build.md).

Two host buffers take turns, and one write is in flight at a time: host memory stays at two
batches, and a write's error (a full disk) stops the build at the next batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BuildPhases:
    """Where a cache build's seconds went, as its main thread saw them. ``writing`` runs in a
    thread beside the forwards; only ``waiting_for_disk`` is the part of it they did not hide."""

    seconds: float = 0.0  # the whole build
    waiting_for_images: float = 0.0  # the loader's workers (decode + preprocess) fell behind, or were starting
    backbone: float = 0.0  # launching the forwards and waiting for the device to finish them
    waiting_for_disk: float = 0.0  # the write before was not done when the next batch was ready
    writing: float = 0.0  # the writer thread's own time
    flushing: float = 0.0  # the memory maps' last dirty pages to disk, at the end

    def summary(self) -> str:
        return (f"{self.waiting_for_images:.1f} s waiting for images, {self.backbone:.1f} s for the backbone, "
                f"{self.waiting_for_disk:.1f} s waiting for the disk ({self.writing:.1f} s of writes beside the forwards), "
                f"{self.flushing:.1f} s flushing")


class TokenWriter:
    """``push`` a batch's tokens (device tensors in the targets' dtype, and whether they are all
    finite); they reach ``targets`` (memory maps, one row per image) after the next ``push`` or
    ``close``. ``not_finite(start, stop)`` is the error for rows start..stop that are not."""

    def __init__(self, targets: tuple[np.ndarray, ...], batch_size: int, device: torch.device, phases: BuildPhases,
                 not_finite: Callable[[int, int], Exception]) -> None:
        self._targets, self._phases, self._not_finite = targets, phases, not_finite
        self._cuda = device.type == "cuda"
        self._slots = [
            [torch.empty((batch_size, *t.shape[1:]), dtype=getattr(torch, t.dtype.name), pin_memory=self._cuda) for t in targets]
            + [torch.empty((), dtype=torch.bool, pin_memory=self._cuda)]
            for _ in range(2)
        ]
        self._turn = 0
        self._copying: tuple[int, int, list[torch.Tensor], torch.cuda.Event | None] | None = None
        self._writing: Future | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")

    def push(self, start: int, tokens: tuple[torch.Tensor, ...], finite: torch.Tensor) -> None:
        self._hand_over()  # (frees the buffer this batch is copied into)
        slot = self._slots[self._turn]
        self._turn ^= 1
        n = tokens[0].shape[0]
        for buffer, batch in zip(slot, tokens):
            buffer[:n].copy_(batch, non_blocking=True)
        slot[-1].copy_(finite, non_blocking=True)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        self._copying = (start, n, slot, event)

    def close(self) -> None:
        """Write the last batch and wait for every write (raising a write's error)."""
        self._hand_over()
        self._wait_for_write()
        self._writer.shutdown()

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writer.shutdown(wait=True)  # no thread may write into a staging folder being removed

    def _hand_over(self) -> None:
        """The batch being copied: wait for its copy, check it, give it to the writer."""
        if self._copying is None:
            return
        start, n, slot, event = self._copying
        self._copying = None
        began = time.perf_counter()
        if event is not None:
            event.synchronize()  # (recorded before the next forward was queued: this does not wait for it)
        self._phases.backbone += time.perf_counter() - began
        if not bool(slot[-1]):
            raise self._not_finite(start, start + n)
        self._wait_for_write()  # the write before this one used the other buffer, which push fills next
        self._writing = self._writer.submit(self._write, start, [buffer[:n].numpy() for buffer in slot[:-1]])

    def _wait_for_write(self) -> None:
        if self._writing is not None:
            began = time.perf_counter()
            self._writing.result()  # (raises the write's error)
            self._writing = None
            self._phases.waiting_for_disk += time.perf_counter() - began

    def _write(self, start: int, batches: list[np.ndarray]) -> None:
        began = time.perf_counter()
        for target, rows in zip(self._targets, batches):
            write_rows(target, start, rows)
        self._phases.writing += time.perf_counter() - began


def write_rows(array: np.ndarray, start: int, rows: np.ndarray) -> None:
    array[start:start + len(rows)] = rows


__all__ = ["BuildPhases", "TokenWriter", "write_rows"]
