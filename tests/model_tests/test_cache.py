"""The feature cache: reused when valid, rebuilt when its inputs change, never used when damaged."""

import builtins
import errno
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.backbone import LazyBackbone
from model.cache import CacheError, open_cache, open_or_build_cache
from model.config import BackboneConfig
from model.manifest import load_manifest
from model.synthetic import SyntheticConfig, generate

ATTRIBUTES = {"gender": ["male", "female"], "race": ["asian", "white", "black", "others"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), SyntheticConfig(seed=1, n_train=24, n_val=12, n_test=4), progress=False)


@pytest.fixture
def manifest(dataset):
    return load_manifest(dataset.manifest, attributes=ATTRIBUTES)


@pytest.fixture
def backbone():
    return LazyBackbone(BackboneConfig(name="fairfront-tiny-vit", weights="random", batch_size=8, cache_dtype="float32"))


def build(manifest, backbone, root):
    return open_or_build_cache(manifest, backbone, root, device=torch.device("cpu"), progress=False)


def test_cache_holds_the_backbone_tokens_in_manifest_order(manifest, backbone, tmp_path):
    cache = build(manifest, backbone, tmp_path)
    assert cache.cls.shape == (36, 128) and cache.patches.shape == (36, 64, 128)
    assert isinstance(cache.patches, np.memmap)  # memory-mapped, not loaded
    from model.images import ImageDataset

    # every row: batches of 8 come back through two host buffers in turn, the last one short
    images, failures = ImageDataset(list(manifest.frame["path"]), backbone.module.preprocess).batch(list(range(36)))
    assert failures == [""] * 36
    expected = backbone.module(images)
    np.testing.assert_allclose(cache.patches, expected.patches.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.cls, expected.cls.numpy(), rtol=1e-5, atol=1e-5)


def test_valid_cache_is_reused_not_rebuilt(manifest, backbone, tmp_path, caplog):
    first = build(manifest, backbone, tmp_path)
    stamp = (first.directory / "patches.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="model.cache"):
        second = build(manifest, backbone, tmp_path)
    assert second.directory == first.directory
    assert (second.directory / "patches.npy").stat().st_mtime_ns == stamp
    assert "reused" in caplog.text


def test_changed_manifest_gets_its_own_cache(manifest, backbone, tmp_path, dataset):
    first = build(manifest, backbone, tmp_path)
    edited = tmp_path / "edited.csv"
    frame = manifest.frame
    lines = dataset.manifest.read_text().splitlines()
    edited.write_text("\n".join(lines[:-1]) + "\n")  # drop the last row
    smaller = load_manifest(edited, attributes=ATTRIBUTES, image_root=dataset.manifest.parent)
    second = build(smaller, backbone, tmp_path)
    assert second.key != first.key
    assert len(second) == len(frame) - 1


def test_replaced_image_changes_the_key(manifest, backbone, tmp_path):
    first = build(manifest, backbone, tmp_path)
    path = manifest.frame["path"].iloc[0]
    os.utime(path, ns=(1, 1))  # same name, "new" file
    second = build(manifest, backbone, tmp_path)
    assert second.key != first.key


def test_other_layer_or_weights_change_the_key(manifest, backbone, tmp_path):
    first = build(manifest, backbone, tmp_path)
    other = LazyBackbone(BackboneConfig(name="fairfront-tiny-vit", weights="random", seed=1, cache_dtype="float32"))
    assert build(manifest, other, tmp_path).key != first.key
    other = LazyBackbone(BackboneConfig(name="fairfront-tiny-vit", weights="random", stage2_layer=1, cache_dtype="float32"))
    assert build(manifest, other, tmp_path).key != first.key


def test_a_model_config_changed_under_the_same_name_changes_the_key(manifest, backbone, tmp_path, monkeypatch):
    """Width, blocks and image size stay; the MLP and the attention heads do not: the tokens differ."""
    import open_clip

    first = build(manifest, backbone, tmp_path)
    changed = open_clip.get_model_config("fairfront-tiny-vit")  # (a copy)
    changed["vision_cfg"].update(mlp_ratio=2.0, head_width=64)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "fairfront-tiny-vit", changed)
    edited = LazyBackbone(backbone.config)
    assert edited.shape.width == backbone.shape.width and edited.shape.n_layers == backbone.shape.n_layers
    second = build(manifest, edited, tmp_path)
    assert second.key != first.key and second.directory != first.directory
    assert not np.allclose(second.patches[:2], first.patches[:2])


def test_two_builders_in_processes_with_the_same_pid_do_not_share_a_staging_folder(manifest, backbone, tmp_path, monkeypatch):
    """Nodes sharing a workdir may run containers where every worker is pid 1: here a second build
    (same process, same pid) starts and finishes while the first one is extracting."""
    import model.cache as cache_module

    extract = cache_module._extract
    others = []

    def extract_after_another_build(*args, **kwargs):
        if not others:
            others.append(None)  # the other build's own extraction runs as it is
            others[0] = build(manifest, LazyBackbone(backbone.config), tmp_path)
        return extract(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_extract", extract_after_another_build)
    ours = build(manifest, backbone, tmp_path)
    assert ours.directory == others[0].directory
    np.testing.assert_array_equal(ours.patches, others[0].patches)
    assert [p.name for p in tmp_path.iterdir()] == [ours.directory.name]  # both staging folders gone


def test_a_build_removes_staging_folders_whose_process_died_and_keeps_running_ones(manifest, backbone, tmp_path):
    import fcntl
    import subprocess
    import sys

    directory = build(manifest, backbone, tmp_path).directory
    shutil.rmtree(directory)  # to be built again
    dead, running, unmarked = (directory.with_name(f"{directory.name}.partial-{n}") for n in ("dead", "running", "unmarked"))
    for staging in (dead, running, unmarked):
        staging.mkdir()
        (staging / "patches.npy").write_bytes(b"tokens")
    for staging in (dead, running):
        (staging / ".building").touch()
    # dead: its builder held the lock, then was killed; running: another process holds it now
    for staging, signal_ in ((dead, "kill"), (running, None)):
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1]); fcntl.flock(h, fcntl.LOCK_EX); "
                                   "print('held', flush=True); time.sleep(600)", str(staging / ".building")], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        if signal_:
            holder.kill()
            holder.wait()
        else:
            alive = holder
    try:
        build(manifest, backbone, tmp_path)
        assert not dead.exists() and running.is_dir() and unmarked.is_dir()
        with open(running / ".building") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still its holder's
    finally:
        alive.kill()
        alive.wait()


def test_truncated_cache_is_rejected_and_rebuilt(manifest, backbone, tmp_path, caplog):
    cache = build(manifest, backbone, tmp_path)
    original = np.array(cache.patches)
    path = cache.directory / "patches.npy"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CacheError, match="truncated|shape|checksum"):
        open_cache(cache.directory, cache.key)
    with caplog.at_level(logging.WARNING, logger="model.cache"):
        rebuilt = build(manifest, backbone, tmp_path)
    assert "rebuilt" in caplog.text
    assert path.stat().st_size == size
    np.testing.assert_array_equal(rebuilt.patches, original)


@pytest.mark.parametrize("unreadable", ["meta.json", "patches.npy"])
def test_a_cache_this_user_may_not_read_is_named_and_kept_not_deleted_and_rebuilt(manifest, backbone, tmp_path, monkeypatch, unreadable):
    """Permissions are not damage: a teammate's cache (root runs the tests, so a refused open is
    simulated) stops the command naming the file, and every byte of it stays."""
    cache = build(manifest, backbone, tmp_path)
    before = {p.name: p.read_bytes() for p in cache.directory.iterdir()}
    denied, real_open = cache.directory / unreadable, io.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(denied))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", refusing_open)
    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(PermissionError, match=f"feature cache {cache.directory} may not be read by this user") as raised:
        build(manifest, backbone, tmp_path)
    monkeypatch.undo()
    assert raised.value.filename == str(denied)
    assert {p.name: p.read_bytes() for p in cache.directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [cache.directory.name]  # nothing staged for a rebuild


def test_corrupted_bytes_are_detected(manifest, backbone, tmp_path):
    cache = build(manifest, backbone, tmp_path)
    path = cache.directory / "cls.npy"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        open_cache(cache.directory, cache.key)


def test_a_meta_file_without_shapes_is_a_cache_error_and_the_cache_is_rebuilt(manifest, backbone, tmp_path):
    import json

    cache = build(manifest, backbone, tmp_path)
    meta = json.loads((cache.directory / "meta.json").read_text())
    del meta["shapes"]
    (cache.directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="no shapes or checksums"):
        open_cache(cache.directory, cache.key)
    assert len(build(manifest, backbone, tmp_path)) == len(manifest.frame)


def test_partial_build_without_meta_is_not_used(manifest, backbone, tmp_path):
    cache = build(manifest, backbone, tmp_path)
    (cache.directory / "meta.json").unlink()
    with pytest.raises(CacheError, match="never finished"):
        open_cache(cache.directory, cache.key)
    assert len(build(manifest, backbone, tmp_path)) == len(manifest.frame)


def test_tokens_beyond_float16_are_refused_naming_the_manifest_rows_and_the_fix(manifest, tmp_path):
    from model.backbone import FrozenTokens

    backbone = LazyBackbone(BackboneConfig(name="fairfront-tiny-vit", weights="random", batch_size=8, cache_dtype="float16"))
    forward = backbone.module.forward
    calls = []

    def overflowing(images):  # the second batch has a token of 1e5 (float16 stops at 65504)
        tokens = forward(images)
        calls.append(1)
        if len(calls) == 2:
            tokens = FrozenTokens(cls=tokens.cls, patches=tokens.patches.index_fill(1, torch.tensor([3]), 1e5))
        return tokens

    backbone.module.forward = overflowing
    with pytest.raises(CacheError, match=r"manifest.csv: the images at lines 10-17 give tokens that are not finite in float16 .*backbone.cache_dtype: float32"):
        build(manifest, backbone, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial cache left behind
    backbone.module.forward = forward
    assert np.isfinite(build(manifest, backbone, tmp_path).patches).all()


def test_a_failed_write_stops_the_build_with_its_error_and_leaves_nothing(manifest, backbone, tmp_path, monkeypatch):
    """The writes run in a thread beside the next forward: its error must still stop the build."""
    import model.cache_writer

    written = []

    def disk_full_at_the_third_batch(array, start, rows):
        written.append(start)
        if len(written) == 5:  # (two arrays a batch)
            raise OSError(errno.ENOSPC, "No space left on device")
        array[start:start + len(rows)] = rows

    monkeypatch.setattr(model.cache_writer, "write_rows", disk_full_at_the_third_batch)
    with pytest.raises(OSError, match="No space left on device"):
        build(manifest, backbone, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_build_logs_and_records_where_its_time_went(manifest, backbone, tmp_path, caplog):
    import json

    with caplog.at_level(logging.INFO, logger="model.cache"):
        cache = build(manifest, backbone, tmp_path)
    meta = json.loads((cache.directory / "meta.json").read_text())
    phases = meta["phases"]
    assert set(phases) == {"waiting_for_images", "backbone", "waiting_for_disk", "writing", "flushing"} and min(phases.values()) >= 0
    assert phases["backbone"] > 0 and sum(v for k, v in phases.items() if k != "writing") <= meta["seconds"] + 0.03
    built = [r.getMessage() for r in caplog.records if r.getMessage().startswith("feature cache built")]
    assert len(built) == 1 and "for the backbone" in built[0] and "waiting for images" in built[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_images_that_cannot_be_decoded_are_named_by_manifest_line_and_leave_nothing(dataset, backbone, tmp_path, workers):
    data = tmp_path / "data"
    shutil.copytree(dataset.manifest.parent, data)
    manifest = load_manifest(data / dataset.manifest.name, attributes=ATTRIBUTES)
    not_an_image, truncated, last = (Path(p) for p in manifest.frame["path"].iloc[[2, 5, -1]])
    not_an_image.write_text("not a png\n")
    truncated.write_bytes(truncated.read_bytes()[:60])
    last.write_bytes(b"")
    assert len(manifest.frame) > 2 * backbone.config.batch_size  # the last one is batches later
    features = tmp_path / "features"
    forward, forwards = backbone.module.forward, []
    backbone.module.forward = lambda images: forwards.append(len(images)) or forward(images)
    try:
        with pytest.raises(CacheError) as err:
            open_or_build_cache(manifest, backbone, features, device=torch.device("cpu"), num_workers=workers, progress=False)
    finally:
        backbone.module.forward = forward
    message = str(err.value)
    # every bad image in one error, and no backbone forward after the first bad batch (the first here)
    assert message.startswith(f"{manifest.path}: 3 image(s) that cannot be decoded: line 4 {not_an_image} (")
    assert f"; line 7 {truncated} (" in message and f"; line {len(manifest.frame) + 1} {last} (" in message
    assert "fix or remove those rows" in message and forwards == []
    assert list(features.iterdir()) == []  # no partial cache left behind


def test_a_cache_another_worker_finished_first_is_kept_not_replaced(manifest, backbone, tmp_path, monkeypatch):
    import model.cache as cache_module

    theirs = build(manifest, backbone, tmp_path)
    stamp = (theirs.directory / "patches.npy").stat().st_mtime_ns
    # this worker looked before theirs was there, so it builds too and finds the directory taken
    open_cache = cache_module.open_cache
    looks = []
    monkeypatch.setattr(cache_module, "open_cache", lambda d, k: open_cache(d, k) if looks.append(1) or len(looks) > 1
                        else (_ for _ in ()).throw(CacheError("not there yet")))
    ours = build(manifest, backbone, tmp_path)
    assert ours.directory == theirs.directory
    assert (theirs.directory / "patches.npy").stat().st_mtime_ns == stamp  # their files, untouched
    assert [p.name for p in tmp_path.iterdir()] == [theirs.directory.name]  # our staging copy removed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_build_holds_the_tokens_a_cpu_build_holds(manifest, backbone, tmp_path):
    """On CUDA the tokens come back through pinned buffers, behind the next batch's forward."""
    on_cpu = build(manifest, backbone, tmp_path / "cpu")
    on_cuda = open_or_build_cache(manifest, backbone, tmp_path / "cuda", device=torch.device("cuda"), progress=False)
    for name in ("cls", "patches"):
        expected, got = np.asarray(getattr(on_cpu, name)), np.asarray(getattr(on_cuda, name))
        assert got.shape == expected.shape
        # (cuDNN may run the patch-embedding convolution in TF32: ~1e-3 relative)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2, name
