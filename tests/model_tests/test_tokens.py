"""CachedTokens: preloaded (in slices) and memory-mapped reads give the same batches; where the
tokens are held is decided by the device's free memory; read_batches reads a memory map ahead in
a background thread and gives the same batches as reading each in turn."""

import threading

import numpy as np
import pytest
import torch

import model.tokens as tokens
from model.cache import FeatureCache


@pytest.fixture()
def cache(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "cls.npy", rng.normal(size=(50, 8)).astype(np.float16))
    np.save(tmp_path / "patches.npy", rng.normal(size=(50, 5, 8)).astype(np.float16))
    return FeatureCache(tmp_path, "key", np.load(tmp_path / "cls.npy", mmap_mode="r"), np.load(tmp_path / "patches.npy", mmap_mode="r"))


def test_preloaded_slices_and_memory_map_give_the_same_batches(cache, monkeypatch):
    rows = np.flatnonzero(np.arange(50) % 3 != 0)  # a split: every row but each third
    monkeypatch.setattr(tokens, "_PRELOAD_CHUNK_BYTES", 3 * (cache.cls[0].nbytes + cache.patches[0].nbytes))  # 3 rows a slice
    held = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=True)
    mapped = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=False)
    assert held.preloaded and not mapped.preloaded
    assert held.patches.dtype == torch.float16  # held in the storage dtype
    batch = np.array([7, 0, 32, 5, 5, 19])
    a, b = held.batch(batch), mapped.batch(batch)
    assert a.patches.dtype == torch.float32
    torch.testing.assert_close(a.patches, b.patches, rtol=0, atol=0)
    torch.testing.assert_close(a.cls, b.cls, rtol=0, atol=0)
    expected = torch.from_numpy(np.asarray(cache.patches[rows[batch]])).float()
    torch.testing.assert_close(a.patches, expected, rtol=0, atol=0)


def test_cpu_preloads_up_to_the_fixed_limit(cache, monkeypatch):
    rows = np.arange(50)
    size = (cache.cls[0].nbytes + cache.patches[0].nbytes) * 50
    monkeypatch.setattr(tokens, "PRELOAD_MAX_BYTES", size)
    assert tokens.CachedTokens(cache, rows, torch.device("cpu")).preloaded
    monkeypatch.setattr(tokens, "PRELOAD_MAX_BYTES", size - 1)
    assert not tokens.CachedTokens(cache, rows, torch.device("cpu")).preloaded


@pytest.mark.parametrize(("free_gib", "total_gib", "idle_gib", "budget_gib"),
                         [(70, 80, 0, 62), (130, 141, 0, 115.9), (5, 80, 0, 0), (20, 80, 53, 65)])
def test_gpu_budget_is_free_memory_less_headroom(monkeypatch, free_gib, total_gib, idle_gib, budget_gib):
    # An H100 holds FF++'s ~52 GB float16 ViT-L-14 train tokens; a busy or small card does not.
    # The last case is the same H100 at a process's second trial: the first trial's tokens are
    # no longer used, but the caching allocator still holds their 53 GB (reserved, not allocated).
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), int(total_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int((idle_gib + 3) * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * 2**30)  # the model, say
    assert tokens.preload_budget(torch.device("cuda:0")) / 2**30 == pytest.approx(budget_gib, abs=0.01)


def test_running_out_of_memory_while_preloading_falls_back_to_the_memory_map(cache, monkeypatch):
    # Two worker processes on one card read the same free memory; the second one's copy fails.
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 52.00 GiB")

    monkeypatch.setattr(tokens, "_copy_rows", out_of_memory)
    rows = np.arange(0, 50, 2)
    fallback = tokens.CachedTokens(cache, rows, torch.device("cpu"))  # the budget said it fits
    assert not fallback.preloaded
    batch = np.array([4, 0, 7])
    expected = torch.from_numpy(np.asarray(cache.patches[rows[batch]])).float()
    torch.testing.assert_close(fallback.batch(batch).patches, expected, rtol=0, atol=0)
    with pytest.raises(torch.OutOfMemoryError):  # asked for explicitly: not second-guessed
        tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_preload_matches_the_memory_map(cache):
    rows = np.arange(0, 50, 2)
    held = tokens.CachedTokens(cache, rows, torch.device("cuda"))
    assert held.preloaded and held.patches.device.type == "cuda"  # a few KB: always fits
    batch = np.array([3, 1, 4, 1, 5])
    on_gpu = held.batch(batch)
    mapped = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=False).batch(batch)
    torch.testing.assert_close(on_gpu.patches.cpu(), mapped.patches, rtol=0, atol=0)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fairfront-prefetch")]


def _uneven_batches():
    # uneven sizes, repeated rows, rows out of file order
    return [np.array(b) for b in ([3, 1, 2], [0], [9, 8, 7, 6, 5], [4, 4], [10, 15, 11], [12, 13, 14, 16])]


def test_read_ahead_gives_each_batch_as_reading_it_in_turn(cache, monkeypatch):
    rows = np.flatnonzero(np.arange(50) % 3 != 0)
    mapped = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=False)
    held = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=True)
    readers = []
    read = mapped.read
    monkeypatch.setattr(mapped, "read", lambda indices: (readers.append(threading.current_thread().name), read(indices))[1])
    batches = _uneven_batches()
    ahead = list(tokens.read_batches(mapped, batches))
    assert len(ahead) == len(batches) and len(readers) == len(batches)
    assert all(name.startswith("fairfront-prefetch") for name in readers)  # not the calling thread
    for indices, got in zip(batches, ahead):
        expected = held.batch(indices)
        assert got.patches.dtype == torch.float32 and got.patches.shape == (len(indices), 5, 8)
        torch.testing.assert_close(got.patches, expected.patches, rtol=0, atol=0)
        torch.testing.assert_close(got.cls, expected.cls, rtol=0, atol=0)
    assert not _prefetch_threads()  # the reader is gone once the batches are


def test_preloaded_sources_are_read_in_the_calling_thread(cache, monkeypatch):
    held = tokens.CachedTokens(cache, np.arange(50), torch.device("cpu"), preload=True)
    readers = []
    batch = held.batch
    monkeypatch.setattr(held, "batch", lambda indices: (readers.append(threading.current_thread()), batch(indices))[1])
    assert len(list(tokens.read_batches(held, _uneven_batches()))) == 6
    assert readers == [threading.current_thread()] * 6


def test_a_failed_read_is_raised_at_its_batch_and_stops_the_reader(cache, monkeypatch):
    mapped = tokens.CachedTokens(cache, np.arange(50), torch.device("cpu"), preload=False)
    read = mapped.read

    def failing(indices):
        if 9 in indices:
            raise OSError("patches.npy: Input/output error")
        return read(indices)

    monkeypatch.setattr(mapped, "read", failing)
    got = []
    with pytest.raises(OSError, match="patches.npy: Input/output error"):
        for batch in tokens.read_batches(mapped, _uneven_batches()):
            got.append(batch)
    assert len(got) == 2  # the two batches before the failing one
    assert not _prefetch_threads()


def test_leaving_the_loop_early_stops_reading(cache, monkeypatch):
    mapped = tokens.CachedTokens(cache, np.arange(50), torch.device("cpu"), preload=False)
    calls = []
    read = mapped.read
    monkeypatch.setattr(mapped, "read", lambda indices: (calls.append(1), read(indices))[1])
    batches = [np.array([i]) for i in range(40)]
    stream = tokens.read_batches(mapped, batches)
    next(stream)
    stream.close()
    assert not _prefetch_threads()
    assert len(calls) <= 1 + tokens.PREFETCH_BATCHES + 1  # read ahead, not through the epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_read_ahead_pins_host_memory_and_matches_the_cpu(cache):
    rows = np.arange(0, 50, 2)
    mapped = tokens.CachedTokens(cache, rows, torch.device("cuda"), preload=False)
    host = mapped.read(np.array([2, 0, 1]))
    assert host.patches.is_pinned() and host.patches.dtype == torch.float16  # cast on the GPU, after the copy
    on_cpu = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=False)
    for indices, got in zip(_uneven_batches()[:4], tokens.read_batches(mapped, _uneven_batches()[:4])):
        assert got.patches.device.type == "cuda" and got.patches.dtype == torch.float32
        torch.testing.assert_close(got.patches.cpu(), on_cpu.batch(indices).patches, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_counts_memory_the_allocator_holds_idle():
    device = torch.device("cuda")
    before = tokens.preload_budget(device)
    held = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    assert tokens.preload_budget(device) == pytest.approx(before - (1 << 30), abs=64 << 20)
    del held  # back to torch's caching allocator, still taken as far as the driver knows
    assert tokens.preload_budget(device) == pytest.approx(before, abs=64 << 20)
