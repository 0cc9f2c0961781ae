"""Augmented views: fixed seeded draws, cached once, one view per image and epoch; the same views
online; fused trials read the same views as their serial runs."""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

import model.tokens as tokens
from model import load_train_config, prepare, train
from model.augment import View, ViewPlan, apply_view, draw_view, epoch_views, view_rows
from model.config import AugmentConfig
from model.fused import train_fused
from model.images import ImageDataset
from model.typed_config import ConfigError

from _tiny_run import tiny_train_data, write_train_yaml

VIEWS = {"views": 3, "hflip": 0.5, "crop_scale": 0.8, "color_jitter": 0.2, "blur": 0.3, "jpeg": 0.5, "jpeg_quality": 50}


def config_with(tmp_path: Path, augment: dict | None, **training):
    data = tiny_train_data(tmp_path, n_train=64, n_val=32, n_test=8, stage1_epochs=1,
                           training={"num_epochs": 3, "warmup_epochs": 1, "batch_size": 16, "T_0": 2} | training)
    data["backbone"]["cache_dtype"] = "float32"
    if augment is not None:
        data["augment"] = augment
    return load_train_config(write_train_yaml(tmp_path, data))


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    config = config_with(tmp_path_factory.mktemp("augment"), VIEWS)
    return config, prepare(config, progress=False, with_test_caches=False)


def test_a_view_is_a_fixed_draw_of_seed_row_and_view():
    config = AugmentConfig(**VIEWS)
    assert draw_view(config, 7, 1) == draw_view(config, 7, 1)
    assert len({draw_view(config, row, view) for row in range(5) for view in range(3)}) == 15
    assert draw_view(AugmentConfig(**VIEWS | {"seed": 1}), 7, 1) != draw_view(config, 7, 1)
    # switching one augmentation off leaves the others' draws as they were
    no_blur = draw_view(AugmentConfig(**VIEWS | {"blur": 0.0}), 7, 1)
    assert dataclasses.replace(draw_view(config, 7, 1), blur_radius=None) == no_blur


def test_a_flip_only_view_is_the_mirrored_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    config = AugmentConfig(views=2, hflip=1.0)
    view = draw_view(config, 0, 0)
    assert view.flip and view.crop is None and view.blur_radius is None and view.jpeg_quality is None
    assert np.array_equal(np.asarray(apply_view(image, view)), np.asarray(ImageOps.mirror(image)))
    cropped = apply_view(image, draw_view(AugmentConfig(views=1, hflip=0.0, crop_scale=0.5), 0, 0))
    assert cropped.width == cropped.height and 0.5 * 40 * 40 <= cropped.width * cropped.height <= 40 * 40 + 1


def image_of(seed: int = 0, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def only(**settings) -> View:
    """View 0 of row 3 with only these augmentations switched on."""
    return draw_view(AugmentConfig(**({"views": 1, "hflip": 0.0} | settings)), 3, 0)


@pytest.mark.parametrize("settings", [{"blur": 1.0}, {"jpeg": 1.0, "jpeg_quality": 20}, {"color_jitter": 0.5}, {"crop_scale": 0.3}])
def test_each_augmentation_is_what_its_view_says(settings):
    image = image_of()
    view = only(**settings)
    got = np.asarray(apply_view(image, view))
    if "blur" in settings:  # PIL's own blur at the drawn radius
        assert view.blur_radius is not None and view.jpeg_quality is None and view.crop is None
        expected = image.filter(ImageFilter.GaussianBlur(view.blur_radius))
    elif "jpeg" in settings:  # a JPEG round trip at the drawn quality
        assert 20 <= view.jpeg_quality <= 100 and view.blur_radius is None
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=view.jpeg_quality)
        expected = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    elif "color_jitter" in settings:  # brightness, then contrast, then saturation, at the drawn factors
        assert {view.brightness, view.contrast, view.saturation} != {1.0} and all(0.5 <= f <= 1.5 for f in (view.brightness, view.contrast, view.saturation))
        expected = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(view.brightness)).enhance(view.contrast)).enhance(view.saturation)
    else:  # the box the view's share and offsets name, in pixels of the original
        side_share, left, top = view.crop
        side = round(40 * side_share)  # the short edge is the height, 40
        assert 0.3 * 40 * 40 <= side * side <= 40 * 40 and (left, top) != (0.0, 0.0)
        x, y = round(left * (48 - side)), round(top * (40 - side))
        expected = image.crop((x, y, x + side, y + side))
    np.testing.assert_array_equal(got, np.asarray(expected))
    assert got.shape != np.asarray(image).shape or not np.array_equal(got, np.asarray(image))  # it did something


def test_seeds_must_be_valid_for_every_draw_and_a_negative_training_seed_still_runs(augmented):
    with pytest.raises(ValueError, match="seed must be >= 0"):
        AugmentConfig(views=2, seed=-1)
    config, prepared = augmented
    result = train(config.with_training(seed=-1, num_epochs=1, warmup_epochs=0), prepared=prepared, progress=False, write_outputs=False)
    assert result.status == "completed"


def test_the_plain_cache_and_stage1_do_not_depend_on_the_augment_settings(augmented, tmp_path):
    config, prepared = augmented
    plain = prepare(dataclasses.replace(config, augment=AugmentConfig()), progress=False, with_test_caches=False)
    assert plain.cache.directory == prepared.cache.directory and plain.stage1_checkpoint == prepared.stage1_checkpoint
    assert plain.views is None
    # with views off, the other augment settings change nothing a trial sees
    assert AugmentConfig(hflip=0.3).identity() == AugmentConfig().identity() != AugmentConfig(views=2).identity()


def test_the_views_cache_holds_each_training_image_in_each_view(augmented):
    config, prepared = augmented
    frame = prepared.manifest.frame
    train_rows = np.flatnonzero(frame["split"].to_numpy() == "train")
    views = prepared.views
    assert len(views) == 3 * len(train_rows) and views.patches.shape[1:] == prepared.cache.patches.shape[1:]
    rows, numbers = view_rows(3, train_rows)
    for item in (0, len(train_rows) + 5, 2 * len(train_rows) + 9):  # view 0 of row 0, view 1 of row 5, view 2 of row 9
        assert rows[item] == train_rows[item % len(train_rows)] and numbers[item] == item // len(train_rows)
        plan = ViewPlan(config.augment, rows[item : item + 1], numbers[item : item + 1])
        images, failures = ImageDataset([frame["path"].iloc[rows[item]]], prepared.backbone.module.preprocess, plan).batch([0])
        expected = prepared.backbone.module(images)
        np.testing.assert_allclose(views.patches[item], expected.patches[0].numpy(), rtol=1e-5, atol=1e-5)
    plain = prepared.cache.patches[train_rows[5]]
    assert not np.allclose(views.patches[len(train_rows) + 5], plain, atol=1e-3)  # augmented, not the plain image


def test_each_epoch_reads_every_image_once_in_one_of_its_views(augmented, tmp_path, monkeypatch):
    config, prepared = augmented
    n = int((prepared.manifest.frame["split"] == "train").sum())
    items = []
    batch = tokens.CachedTokens.batch

    def spy(self, indices):
        if len(self) == 3 * n:
            items.append(np.asarray(indices).copy())
        return batch(self, indices)

    monkeypatch.setattr(tokens.CachedTokens, "batch", spy)
    train(config, prepared=prepared, progress=False, write_outputs=False)
    epochs = np.split(np.concatenate(items), 3)
    for epoch, read in enumerate(epochs, start=1):
        assert sorted(read % n) == list(range(n))  # every image once
        np.testing.assert_array_equal(np.sort(read), np.sort(np.arange(n) + n * epoch_views(config.augment, config.training.seed, epoch, n)))
    assert len({tuple(np.sort(e)) for e in epochs}) == 3  # other views every epoch


def test_views_change_the_run_and_online_views_equal_the_cached_ones(augmented, tmp_path):
    config, prepared = augmented
    cached = train(config, prepared=prepared, progress=False, write_outputs=False)
    plain = train(dataclasses.replace(config, augment=AugmentConfig()), prepared=prepared, progress=False, write_outputs=False)
    assert cached.epochs[0].train_loss != plain.epochs[0].train_loss
    online = train(config.with_training(feature_mode="online"), prepared=prepared, progress=False, write_outputs=False)
    for a, b in zip(cached.epochs, online.epochs):
        for metric in ("auc", "f_meo", "f_fpr"):
            assert a.val[metric] == pytest.approx(b.val[metric], abs=1e-4)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)


def test_fused_trials_with_views_equal_their_serial_runs(augmented, tmp_path):
    config, prepared = augmented
    trials = [dict(lr=3e-4, lambda_fair=0.15, sinkhorn_blur=1e-3), dict(lr=1e-3, lambda_fair=0.5, sinkhorn_blur=3e-3, dropout=0.0)]
    configs = [dataclasses.replace(config.with_training(**t), output_dir=tmp_path / f"fused-{i}") for i, t in enumerate(trials)]
    fused = train_fused(configs, prepared, progress=False, write_outputs=False)
    serial = [train(c, prepared=prepared, progress=False, write_outputs=False) for c in configs]
    for s, f in zip(serial, fused):
        assert [r.epoch for r in s.epochs] == [r.epoch for r in f.epochs]
        for rs, rf in zip(s.epochs, f.epochs):
            assert rf.train_loss == pytest.approx(rs.train_loss, abs=1e-5)
            assert rf.val["auc"] == pytest.approx(rs.val["auc"], abs=1e-5)


def test_a_run_with_other_views_than_its_prepared_data_is_refused(augmented):
    config, prepared = augmented
    other = dataclasses.replace(config, augment=dataclasses.replace(config.augment, seed=5))
    with pytest.raises(ValueError, match="augment: this run's settings differ"):
        train(other, prepared=prepared, progress=False, write_outputs=False)


@pytest.mark.parametrize("augment, message", [
    ({"views": 2, "hflip": 0.0}, "views > 0 but no augmentation is switched on"),
    ({"views": -1}, "views must be >= 0"),
    ({"views": 2, "hflip": 1.5}, "hflip is a probability"),
    ({"views": 2, "crop_scale": 0.0}, r"crop_scale must be in \(0, 1\]"),
    ({"views": 2, "jpeg": 0.5, "jpeg_quality": 0}, "jpeg_quality must be in 1..100"),
    ({"views": 2, "rotate": 10}, r"unknown key\(s\) 'rotate'"),
])
def test_bad_augment_settings_name_the_key(tmp_path, augment, message):
    with pytest.raises(ConfigError, match=rf"train.yaml: augment.*{message}"):
        config_with(tmp_path, augment)


def test_online_mode_prepares_no_views_and_a_cached_run_builds_them_when_it_needs_them(tmp_path):
    config = config_with(tmp_path, VIEWS, feature_mode="online", num_epochs=1, warmup_epochs=0)
    prepared = prepare(config, progress=False, with_test_caches=False)
    assert prepared.views is None
    assert not any("views" in p.name for p in (config.workdir / "features").iterdir())
    train(config.with_training(feature_mode="cache"), prepared=prepared, progress=False, write_outputs=False)
    n = int((prepared.manifest.frame["split"] == "train").sum())
    assert prepared.views is not None and len(prepared.views) == 3 * n
