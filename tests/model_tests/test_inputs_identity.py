"""model.inputs_identity: what a study's trials are computed on, by content, not by location."""

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from model.backbone import BackboneError
from model.config import BackboneConfig, DataConfig, Stage1Config, TrainRunConfig
from model.manifest import ManifestError
from model.prepare import inputs_identity
from model.stage1 import Stage1Error

MANIFEST = ("path,label,split,gender,race\na.png,0,train,male,white\nb.png,1,train,female,asian\n"
            "c.png,0,val,male,white\nd.png,1,val,female,asian\n")
IMAGES = {"a.png": 10, "b.png": 20, "c.png": 30, "d.png": 40}  # name -> size in bytes


def write_manifest(directory: Path) -> None:
    (directory / "manifest.csv").write_text(MANIFEST)
    for name, size in IMAGES.items():
        (directory / name).write_bytes(b"x" * size)


def run_config(tmp_path: Path, *, weights: Path, checkpoint: Path | None = None) -> TrainRunConfig:
    return TrainRunConfig(
        workdir=tmp_path / "work", data=DataConfig(manifest=tmp_path / "manifest.csv"),
        backbone=BackboneConfig(name="fairfront-tiny-vit", weights=str(weights)), stage1=Stage1Config(checkpoint=checkpoint),
    )


def rewrite(path: Path, content: bytes) -> None:
    """New bytes of the same size, and a new mtime even on a coarse-grained clock."""
    stat = path.stat()
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_the_same_files_elsewhere_have_the_same_identity_and_other_bytes_another(tmp_path):
    write_manifest(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"w" * 1000)
    (tmp_path / "stage1.pt").write_bytes(b"s" * 100)
    config = run_config(tmp_path, weights=tmp_path / "weights.pt", checkpoint=tmp_path / "stage1.pt")
    first = inputs_identity(config)
    moved = tmp_path / "node2"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("node2"))
    assert inputs_identity(run_config(moved, weights=moved / "weights.pt", checkpoint=moved / "stage1.pt")) == first

    for name, key, content in (("manifest.csv", ("data", "manifest_sha256"), MANIFEST.replace("a.png,0,train,male", "a.png,0,train,female").encode()),
                               ("weights.pt", ("backbone", "weights"), b"v" * 1000),
                               ("stage1.pt", ("stage1", "checkpoint_sha256"), b"t" * 100)):
        rewrite(tmp_path / name, content)
        changed = inputs_identity(config)
        assert changed[key[0]][key[1]] != first[key[0]][key[1]], name
        first = changed


def test_settings_that_change_the_features_change_the_identity(tmp_path):
    write_manifest(tmp_path)
    config = run_config(tmp_path, weights=Path("random"))
    base = inputs_identity(config)
    for change in ({"stage2_layer": 1}, {"precision": "fp32"}, {"cache_dtype": "float32"}, {"seed": 3}):
        other = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, **change))
        assert inputs_identity(other)["backbone"] != base["backbone"], change
    fewer = dataclasses.replace(config, data=dataclasses.replace(config.data, attributes={"gender": ["male", "female"]}))
    assert inputs_identity(fewer)["data"]["attributes"] == {"gender": ["male", "female"]} != base["data"]["attributes"]
    # the feature-extraction batch changes nothing the trials compute on
    same = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, batch_size=7))
    assert inputs_identity(same) == base


def test_missing_files_are_named_by_their_key(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"w")
    with pytest.raises(ManifestError, match="manifest.csv"):
        inputs_identity(run_config(tmp_path, weights=tmp_path / "weights.pt"))
    write_manifest(tmp_path)
    with pytest.raises(BackboneError, match="backbone.weights: checkpoint file not found"):
        inputs_identity(run_config(tmp_path, weights=tmp_path / "missing.pt"))
    with pytest.raises(Stage1Error, match="stage1.checkpoint: cannot read"):
        inputs_identity(run_config(tmp_path, weights=tmp_path / "weights.pt", checkpoint=tmp_path / "missing.pt"))


def test_another_image_set_under_the_same_names_has_another_identity_and_a_copy_the_same(tmp_path):
    """data.image_root pointed at other images (or images replaced in place) trained other trials;
    the same images copied to another node's image_root did not."""
    write_manifest(tmp_path)
    config = run_config(tmp_path, weights=Path("random"))
    base = inputs_identity(config)["data"]
    copy, other = tmp_path / "copy", tmp_path / "other"
    for root, sizes in ((copy, IMAGES), (other, {**IMAGES, "c.png": 31})):
        root.mkdir()
        for name, size in sizes.items():
            (root / name).write_bytes(b"y" * size)  # other bytes, same sizes: a faithful copy's stand-in
    at = lambda root: inputs_identity(dataclasses.replace(config, data=dataclasses.replace(config.data, image_root=root)))["data"]
    assert at(copy) == base
    assert at(other)["image_sizes_sha256"] != base["image_sizes_sha256"]
    assert at(other)["manifest_sha256"] == base["manifest_sha256"]
    (tmp_path / "d.png").write_bytes(b"x" * 41)  # replaced in place
    assert inputs_identity(config)["data"]["image_sizes_sha256"] not in (base["image_sizes_sha256"], at(other)["image_sizes_sha256"])


def test_test_rows_in_the_train_val_manifest_are_left_out_with_a_warning(tmp_path, caplog):
    """FF++'s official test split in one CSV with train and val: trials never use those rows, so
    they are neither cached nor part of the identity; the file's sha256 is still the identity's."""
    from model.prepare import load_manifests

    write_manifest(tmp_path)
    config = run_config(tmp_path, weights=Path("random"))
    without = inputs_identity(config)["data"]
    (tmp_path / "e.png").write_bytes(b"x" * 50)
    (tmp_path / "manifest.csv").write_text(MANIFEST + "e.png,1,test,male,white\n")
    with_test = inputs_identity(config)["data"]
    assert with_test["image_sizes_sha256"] == without["image_sizes_sha256"]
    assert with_test["manifest_sha256"] != without["manifest_sha256"]
    main, _ = load_manifests(config, progress=False)
    assert list(main.frame["split"]) == ["train", "train", "val", "val"] and list(main.frame["line"]) == [2, 3, 4, 5]
    assert "1 rows of split 'test' left out" in caplog.text and "data.test_manifests" in caplog.text
