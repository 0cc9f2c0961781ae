"""CachedTokens: preloaded (in slices) and memory-mapped reads give the same batches; where the
tokens are held is decided by the device's free memory."""

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


@pytest.mark.parametrize(("free_gib", "total_gib", "budget_gib"), [(70, 80, 62), (130, 141, 115.9), (5, 80, 0)])
def test_gpu_budget_is_free_memory_less_headroom(monkeypatch, free_gib, total_gib, budget_gib):
    # An H100 holds FF++'s ~52 GB float16 ViT-L-14 train tokens; a busy or small card does not.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), int(total_gib * 2**30)))
    assert tokens.preload_budget(torch.device("cuda:0")) / 2**30 == pytest.approx(budget_gib, abs=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_preload_matches_the_memory_map(cache):
    rows = np.arange(0, 50, 2)
    held = tokens.CachedTokens(cache, rows, torch.device("cuda"))
    assert held.preloaded and held.patches.device.type == "cuda"  # a few KB: always fits
    batch = np.array([3, 1, 4, 1, 5])
    on_gpu = held.batch(batch)
    mapped = tokens.CachedTokens(cache, rows, torch.device("cpu"), preload=False).batch(batch)
    torch.testing.assert_close(on_gpu.patches.cpu(), mapped.patches, rtol=0, atol=0)
