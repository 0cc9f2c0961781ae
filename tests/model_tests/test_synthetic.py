import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model.manifest import load_manifest
from model.synthetic import GENDERS, RACES, TEST_SETS, SyntheticConfig, generate

ATTRS = {"gender": list(GENDERS), "race": list(RACES)}
SMALL = dict(image_size=32, n_train=64, n_val=32, n_test=16)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    config = SyntheticConfig(**SMALL)
    return config, generate(tmp_path_factory.mktemp("synth") / "data", config, progress=False)


def test_deterministic_bytes(tmp_path):
    config = SyntheticConfig(**SMALL, seed=3)
    a = generate(tmp_path / "a", config, progress=False)
    b = generate(tmp_path / "b", config, progress=False)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(fa) == 64 + 32 + 16 * len(TEST_SETS) + 2 + len(TEST_SETS)
    assert fa == fb
    assert a.manifest.relative_to(tmp_path / "a") == b.manifest.relative_to(tmp_path / "b")
    other = generate(tmp_path / "c", SyntheticConfig(**SMALL, seed=4), progress=False)
    assert files(other.manifest.parent) != fa  # the seed matters


def test_second_call_reuses_without_rewriting(tmp_path):
    config = SyntheticConfig(**SMALL)
    first = generate(tmp_path / "d", config, progress=False)
    before = mtimes(tmp_path / "d")
    second = generate(tmp_path / "d", config, progress=False)
    assert second == first
    assert mtimes(tmp_path / "d") == before


@pytest.mark.parametrize("damage", ["no-stamp", "other-config", "garbage-stamp"])
def test_incomplete_or_stale_dir_is_regenerated(tmp_path, damage):
    config = SyntheticConfig(**SMALL)
    out = tmp_path / "d"
    if damage == "other-config":
        generate(out, SyntheticConfig(**SMALL, seed=9), progress=False)
    else:  # what an interrupted run of an older version could leave behind
        (out / "images" / "ff" / "train").mkdir(parents=True)
        (out / "images" / "ff" / "train" / "00000.png").write_bytes(b"half a png")
        (out / "manifest.csv").write_text("path,label\n")
        if damage == "garbage-stamp":
            (out / "COMPLETE.json").write_text("{not json")
    ds = generate(out, config, progress=False)
    assert json.loads((out / "COMPLETE.json").read_text())["config_sha256"] == config.digest()
    assert files(out) == files(generate(tmp_path / "fresh", config, progress=False).manifest.parent)
    load_manifest(ds.manifest, attributes=ATTRS)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # temp dir cleaned up


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        generate(tmp_path, SyntheticConfig(**SMALL), progress=False)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_interrupted_generation_leaves_no_complete_dir(tmp_path, monkeypatch):
    import model.synthetic as synthetic

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_render", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "d", SyntheticConfig(**SMALL), progress=False)
    assert not (tmp_path / "d").exists()
    assert os.listdir(tmp_path) == []


def test_manifests_pass_validation(small):
    config, ds = small
    m = load_manifest(ds.manifest, attributes=ATTRS)
    assert len(m.split("train")) == config.n_train and len(m.split("val")) == config.n_val
    header = ds.manifest.read_text().splitlines()[0]
    assert header == "path,label,split,gender,race"
    assert not Path(pd.read_csv(ds.manifest)["path"][0]).is_absolute()
    assert set(ds.test_manifests) == set(TEST_SETS)
    for name, path in ds.test_manifests.items():
        t = load_manifest(path, attributes=ATTRS, required_splits=("test",))
        assert len(t.frame) == config.n_test and set(t.frame["split"]) == {"test"}


def test_all_groups_in_train_and_celebdf_lacks_asian(small):
    _, ds = small
    m = load_manifest(ds.manifest, attributes=ATTRS)
    assert set(m.split("train")["group_name"]) == set(m.group_names)
    celebdf = pd.read_csv(ds.test_manifests["synth-celebdf"])
    assert "asian" not in set(celebdf["race"])


def test_image_size_and_mode(small):
    config, ds = small
    frame = pd.read_csv(ds.manifest)
    for rel in frame["path"][:10]:
        with Image.open(ds.manifest.parent / rel) as im:
            assert im.size == (config.image_size, config.image_size) and im.mode == "RGB"


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(fake_share=0.5, male_share=0.7),
    dict(share_asian=0.25, share_white=0.25, share_black=0.25, share_others=0.25, fake_share=0.3),
])
def test_group_shares_and_fake_share_as_configured(tmp_path, overrides):
    config = SyntheticConfig(image_size=16, n_train=400, n_val=8, n_test=4, **overrides)
    frame = pd.read_csv(generate(tmp_path / "d", config, progress=False).manifest)
    train = frame[frame["split"] == "train"]
    n = len(train)
    assert train["label"].sum() == round(config.fake_share * n)
    assert abs((train["gender"] == "male").sum() - config.male_share * n) <= 2
    for race in RACES:
        assert abs((train["race"] == race).sum() - getattr(config, f"share_{race}") * n) <= 2
    for _, group in train.groupby(["gender", "race"]):  # fakes spread evenly over groups
        assert abs(group["label"].mean() - config.fake_share) <= 1.5 / len(group) + 0.01


def test_fakes_carry_the_planted_texture(tmp_path):
    """The fixed-phase checkerboard is stronger in fakes on average; off when amplitude is 0."""
    def checker_energy(config):
        ds = generate(tmp_path / str(config.texture_amp), config, progress=False)
        frame = pd.read_csv(ds.manifest)
        x = np.stack([np.asarray(Image.open(ds.manifest.parent / p), dtype=float)
                      for p in frame["path"]]) / 255
        s = config.image_size
        checker = (np.indices((s, s)).sum(0) % 2) * 2 - 1
        energy = (x * checker[None, :, :, None]).mean(axis=(1, 2, 3))
        return energy[frame["label"] == 1].mean() - energy[frame["label"] == 0].mean()

    base = dict(n_train=300, n_val=100, n_test=4, lowq_share_white=0.0, lowq_share_minority=0.0,
                blur_max=0.0)
    assert checker_energy(SyntheticConfig(**base, texture_amp=0.15)) > 0.002
    assert abs(checker_energy(SyntheticConfig(**base, texture_amp=0.0))) < 0.001


@pytest.mark.parametrize("overrides", [
    dict(share_white=0.9), dict(n_train=0), dict(image_size=8), dict(fake_share=1.5),
    dict(noise_min=0.1, noise_max=0.05),
])
def test_bad_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        SyntheticConfig(**overrides)


def test_a_generation_removes_the_folder_a_killed_one_left_and_keeps_one_still_running(tmp_path):
    """SIGKILL mid-generation leaves its staging folder; its lock died with it. A running
    generation (its marker locked) and a folder without a marker are not touched."""
    import fcntl

    from model.staging import MARKER

    out = tmp_path / "d"
    dead, running, unmarked = (tmp_path / f".d.partial-{name}" for name in ("dead", "running", "unmarked"))
    for folder in (dead, running, unmarked):
        (folder / "images").mkdir(parents=True)
    (dead / MARKER).touch()
    (running / MARKER).touch()
    with open(running / MARKER) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a second open file description conflicts, as another process's would
        generate(out, SyntheticConfig(**SMALL), progress=False)
        assert not dead.exists() and running.is_dir() and unmarked.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.partial-running", ".d.partial-unmarked", "d"]
    assert MARKER not in os.listdir(out)


def test_a_generation_another_finished_first_is_removed_after_its_marker_is_let_go(tmp_path, monkeypatch):
    """On NFS a deleted file that is still open lingers as .nfsXXXX, and the folder around it cannot
    be removed: the losing generation's folder must go after its marker is closed, the winner's stay."""
    import fcntl
    import shutil

    import model.synthetic as synthetic
    from model.staging import MARKER

    out = tmp_path / "d"
    generate(out, SyntheticConfig(**SMALL), progress=False)  # the winner's dataset
    winner = (out / "manifest.csv").read_bytes()
    real_is_complete, checks = synthetic._is_complete, []

    def finished_while_we_ran(*args):  # not yet at the start, done by the time ours is whole
        checks.append(1)
        return len(checks) > 1 and real_is_complete(*args)

    held_at_removal, real_rmtree = [], shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if (Path(path) / MARKER).exists():
            with open(Path(path) / MARKER) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held_at_removal.append(False)
                except OSError:
                    held_at_removal.append(True)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(synthetic, "_is_complete", finished_while_we_ran)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    generate(out, SyntheticConfig(**SMALL), progress=False)
    assert held_at_removal == [False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (out / "manifest.csv").read_bytes() == winner
