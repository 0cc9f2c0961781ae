"""Target 2: where a trial's tokens come from, and what that costs.

A run holds its split's tokens on the GPU (or, on the CPU, in RAM up to 8 GiB) when they fit,
and the next run on the same PreparedData (a study's next trial) takes them as they are
(``model.tokens.HeldTokens``). When they do not fit (the 2nd..Kth worker process on one card, a
dataset larger than the card), every batch is read from the memory-mapped cache:
``model.tokens.read_batches`` reads those batches ahead in a background thread, into pinned memory
on CUDA, so the step does not wait for them.

Three tables:

1. Holding the tokens: the copy of the training split to the device at a process's first trial,
   against a later trial taking the held copy.
2. One batch read from the memory map, page cache warm and cold (the cache's pages dropped with
   posix_fadvise DONTNEED before every read, so it comes from the disk): the read before (a
   fancy-indexed read plus a reorder to batch order) against ``CachedTokens.read`` (row copies in
   file order, straight into place), and, on CUDA, the copy to the GPU from pinned vs pageable
   memory.
3. ``model.train`` epochs with the tokens held in memory, read from the map one batch at a time
   in the step (``PREFETCH_BATCHES = 0``), and read ahead (the default): seconds per epoch and
   how long the step waited for its batch.

    python -m bench.token_sources      # 192 training images on the CPU, 8192 on CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import mmap
import os
import statistics
import time

import numpy as np
import torch

from bench._common import (VITL14_TOKENS, VITL14_WIDTH, WORK, gpu_note, machine, markdown_table, set_threads, timer, vitl14_prepared,
                           write_result)


def evict(cache) -> None:
    """Drop the cache files' pages from the page cache (clean pages: no privileges needed). Pages
    still mapped are kept by the kernel, so this process's mappings let go of theirs first."""
    for array in (cache.cls, cache.patches):
        array._mmap.madvise(mmap.MADV_DONTNEED)  # np.memmap's mapping (read-only: nothing to write back)
        fd = os.open(array.filename, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fancy_read(source, indices: np.ndarray):
    """How CachedTokens read a batch before read(): a fancy-indexed read in file order, a second copy
    to restore batch order, and (for a CPU run) the cast to float32 that batch() made."""
    rows = source.rows[indices]
    order = np.argsort(rows)
    inverse = np.argsort(order)
    tokens = [torch.from_numpy(array[rows[order]][inverse]) for array in (source.cache.cls, source.cache.patches)]
    return tokens if source.device.type == "cuda" else [t.float() for t in tokens]


def held_rows(prepared, repeats: int, cuda: bool, target_gb: float) -> list[dict]:
    from model.tokens import HeldTokens

    cache = prepared.cache
    train_rows = np.flatnonzero(prepared.manifest.frame["split"].to_numpy() == "train")
    device = torch.device("cuda" if cuda else "cpu")
    gib = len(train_rows) * (cache.cls[0].nbytes + cache.patches[0].nbytes) / 2**30
    first, later = [], []
    for _ in range(repeats):
        holder = HeldTokens()  # a new process's
        for times in (first, later):
            with timer() as seconds:
                source = holder.get(cache, train_rows, device)
            times.append(seconds())
            assert source.preloaded, "the training split did not fit: nothing to hold"
        del source, holder
    copy = statistics.median(first)
    extrapolated = f"s for {target_gb:g} GB at this rate (extrapolated)"
    return [
        {"trial": "first trial of a process: copy to the device", "GiB": gib, "s (median)": copy, "GiB/s": gib / copy,
         extrapolated: target_gb * 1e9 / 2**30 / (gib / copy)},
        {"trial": "a later trial: the held copy", "GiB": gib, "s (median)": statistics.median(later), "GiB/s": "-", extrapolated: "-"},
    ]


def read_rows(prepared, batch_sizes, repeats: int, cuda: bool) -> list[dict]:
    from model.tokens import CachedTokens

    cache = prepared.cache
    train_rows = np.flatnonzero(prepared.manifest.frame["split"].to_numpy() == "train")
    device = torch.device("cuda" if cuda else "cpu")
    source = CachedTokens(cache, train_rows, device, preload=False)  # on CUDA, read() fills pinned memory
    rng = np.random.default_rng(0)
    batch_sizes = sorted({min(b, len(source)) for b in batch_sizes})  # (a smoke run has fewer rows than a validation batch)
    rows = []
    for batch in batch_sizes:
        for page_cache in ("warm", "cold"):
            times = {"fancy index + reorder (before)": [], "CachedTokens.read": []}
            for _ in range(repeats):
                indices = rng.choice(len(source), batch, replace=False)
                for name, read in (("fancy index + reorder (before)", fancy_read), ("CachedTokens.read", CachedTokens.read)):
                    if page_cache == "cold":
                        evict(cache)
                    else:
                        read(source, indices)  # fault the rows in first
                    start = time.perf_counter()
                    read(source, indices)
                    times[name].append(time.perf_counter() - start)
            mb = batch * (cache.cls[0].nbytes + cache.patches[0].nbytes) / 2**20
            for name, seconds in times.items():
                ms = statistics.median(seconds) * 1e3
                rows.append({"batch": batch, "MB": mb, "page cache": page_cache, "read": name, "ms (median)": ms, "GB/s": mb / 1024 / (ms / 1e3)})
    if cuda:
        for batch in batch_sizes:
            indices = rng.choice(len(source), batch, replace=False)
            pageable = fancy_read(source, indices)[1]
            pinned = pageable.pin_memory()
            for name, host in (("pageable -> GPU (before)", pageable), ("pinned -> GPU (read_batches)", pinned)):
                for _ in range(3):
                    host.to(device, non_blocking=True)
                torch.cuda.synchronize()
                times = []
                for _ in range(repeats):  # each copy timed to its end, so the column is a median like the others
                    start = time.perf_counter()
                    host.to(device, non_blocking=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                mb = host.nbytes / 2**20
                rows.append({"batch": batch, "MB": mb, "page cache": "-", "read": name, "ms (median)": ms, "GB/s": mb / 1024 / (ms / 1e3)})
    return rows


@contextlib.contextmanager
def waits_recorded(into: list[float]):
    """Time every batch the training loop takes from read_batches (how long the host waited)."""
    loop = importlib.import_module("model.train")  # (the package's ``model.train`` is the function)
    original = loop.read_batches

    def timed(source, batches):
        stream = original(source, batches)
        try:
            while True:
                start = time.perf_counter()
                try:
                    tokens = next(stream)
                except StopIteration:
                    return
                into.append(time.perf_counter() - start)
                yield tokens
        finally:
            stream.close()

    loop.read_batches = timed
    try:
        yield
    finally:
        loop.read_batches = original


def training_rows(prepared, epochs: int) -> list[dict]:
    import model.tokens as tokens
    from model import train

    config = prepared.config
    cuda = torch.cuda.is_available()
    modes = [
        ("held in memory (preloaded)", {}),
        ("memory map, read in the step (PREFETCH_BATCHES=0)", {"PRELOAD_MAX_BYTES": 0, "GPU_HEADROOM_BYTES": 1 << 60, "PREFETCH_BATCHES": 0}),
        ("memory map, read ahead (default)", {"PRELOAD_MAX_BYTES": 0, "GPU_HEADROOM_BYTES": 1 << 60}),
    ]
    rows = []
    train(config.with_training(num_epochs=1), prepared=prepared, progress=False, write_outputs=False)  # warm-up
    for name, patches in modes:
        saved = {key: getattr(tokens, key) for key in patches}
        for key, value in patches.items():
            setattr(tokens, key, value)
        waits: list[float] = []
        try:
            with waits_recorded(waits):
                fresh = dataclasses.replace(prepared, held_tokens=tokens.HeldTokens())  # no sources kept by earlier modes
                result = train(config, prepared=fresh, progress=False, write_outputs=False)
        finally:
            for key, value in saved.items():
                setattr(tokens, key, value)
        epoch = statistics.median(r.seconds for r in result.epochs)
        steps = len(waits) / epochs
        rows.append({
            "tokens": name, "epoch s (median)": epoch, "batches/epoch (train + val)": steps,
            "wait per batch ms (median)": statistics.median(waits) * 1e3, "wait per epoch s": sum(waits) / epochs,
            "share of epoch waiting": f"{100 * sum(waits) / epochs / epoch:.1f}%",
            "val auc (last epoch)": result.epochs[-1].val["auc"], "device": "cuda" if cuda else "cpu",
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=None, help="default: 8192 on CUDA, 192 on the CPU")
    parser.add_argument("--n-val", type=int, default=None, help="default: 1024 on CUDA, 32 on the CPU")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10, help="batch reads timed per row")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cuda = torch.cuda.is_available()
    n_train = args.n_train or (8192 if cuda else 192)
    n_val = args.n_val or (1024 if cuda else 32)
    info = machine()
    prepared = vitl14_prepared(WORK / "token-sources", n_train=n_train, n_val=n_val, batch_size=args.batch_size, epochs=args.epochs)
    held = held_rows(prepared, 3, cuda, target_gb=52.6)
    reads = read_rows(prepared, (args.batch_size, 4 * args.batch_size), args.repeats, cuda)
    epochs = training_rows(prepared, args.epochs)
    notes = [
        f"Random float16 tokens with ViT-L-14 shapes ([{VITL14_TOKENS}, {VITL14_WIDTH}] patches + [{VITL14_WIDTH}] CLS: "
        f"{(prepared.cache.cls[0].nbytes + prepared.cache.patches[0].nbytes) / 2**10:.0f} KiB an image), "
        f"{n_train} training / {n_val} validation images, batch {args.batch_size} (validation reads 4x that).",
        "Holding: FF++'s ~100k training images are 52.6 GB of float16 ViT-L-14 tokens; the last column of the first "
        "table is that size at the measured rate, an EXTRAPOLATION, not a measurement. Each trial of a study paid the "
        "first row before model.tokens.HeldTokens; now only a process's first does (tests/model_tests/test_train_e2e.py).",
        "A read on the CPU includes the cast to float32 (the step's input); on CUDA the cast runs on the GPU after the "
        "copy (half the bytes over PCIe), so a CUDA read is the host copy alone.",
        "Cold reads: the cache files' pages dropped from the page cache before every read, so they come from this "
        "machine's disk; a cache larger than RAM reads like that all the time, one that fits reads warm after the first epoch.",
        "The wait per batch is the host time the training loop spent in next() on read_batches (the step's own "
        "compute is not in it). On CUDA nothing is synchronised to measure it: a copy from pageable memory blocks "
        "the host until the stream's earlier kernels are done (CUDA stages pageable copies), so that wait shows "
        "here; a copy from pinned memory returns at once.",
        "All three runs train the same model on the same batches (tests/model_tests/test_train_e2e.py checks that the "
        "memory-mapped run's metrics equal the preloaded run's); the val auc column shows it here.",
        gpu_note() + ("" if cuda else " (run the command in the docstring on one)"),
    ]
    body = ("Holding the training split's tokens on the device between trials:\n\n" + markdown_table(held)
            + "\n\nOne batch read (training rows from the memory map):\n\n" + markdown_table(reads)
            + "\n\nTraining epochs (model.train) by where the tokens come from:\n\n" + markdown_table(epochs))
    write_result("token_sources", "Target 2: where a trial's tokens come from (ViT-L-14 token shapes)", body, info=info, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
