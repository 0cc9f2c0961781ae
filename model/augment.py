"""The augmented views of training images: fixed, seeded draws applied to the PIL image before the
backbone's own preprocessing (AugmentConfig says which and why views, not fresh draws).

A view is a pure function of (AugmentConfig, manifest row, view number), so the views cache, an
online run and a re-run all see the same pixels, with any number of loader workers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from model.config import AugmentConfig


@dataclass(frozen=True)
class View:
    """The drawn parameters of one augmented view (None / 1.0: that augmentation is not applied)."""

    flip: bool
    crop: tuple[float, float, float] | None  # side (share of the short edge), left and top offsets (share of the slack)
    brightness: float
    contrast: float
    saturation: float
    blur_radius: float | None
    jpeg_quality: int | None


def draw_view(config: AugmentConfig, row: int, view: int) -> View:
    """View ``view`` of manifest row ``row``; every draw is made whether or not it is used, so
    switching one augmentation on or off leaves the others' draws as they were."""
    rng = np.random.default_rng([config.seed, row, view])
    flip, crop_u, jpeg_u, blur_u = rng.random(4)
    area, left, top = rng.uniform(config.crop_scale, 1.0), rng.random(), rng.random()
    brightness, contrast, saturation = rng.uniform(1 - config.color_jitter, 1 + config.color_jitter, size=3)
    radius, quality = rng.uniform(0.1, 2.0), int(rng.integers(config.jpeg_quality, 101))
    return View(
        flip=bool(flip < config.hflip),
        crop=(float(np.sqrt(area)), float(left), float(top)) if config.crop_scale < 1 else None,
        brightness=float(brightness), contrast=float(contrast), saturation=float(saturation),
        blur_radius=float(radius) if blur_u < config.blur else None,
        jpeg_quality=quality if jpeg_u < config.jpeg else None,
    )


def apply_view(image: Image.Image, view: View) -> Image.Image:
    """``image`` (RGB) as the view sees it: crop, flip, colour, blur, then JPEG (the order of the
    field's usual pipelines: compression last, as in the distribution the detector meets)."""
    if view.crop is not None:
        side_share, left, top = view.crop
        side = max(1, round(min(image.size) * side_share))
        x, y = round(left * (image.width - side)), round(top * (image.height - side))
        image = image.crop((x, y, x + side, y + side))
    if view.flip:
        image = ImageOps.mirror(image)
    for enhance, factor in ((ImageEnhance.Brightness, view.brightness), (ImageEnhance.Contrast, view.contrast),
                            (ImageEnhance.Color, view.saturation)):
        if factor != 1.0:
            image = enhance(image).enhance(factor)
    if view.blur_radius is not None:
        image = image.filter(ImageFilter.GaussianBlur(view.blur_radius))
    if view.jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=view.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def view_rows(n_views: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items of a views cache of ``rows``: (manifest row, view) of item j, view-major (item
    v * len(rows) + i is view v of rows[i])."""
    return np.tile(rows, n_views), np.repeat(np.arange(n_views), len(rows))


@dataclass(frozen=True)
class ViewPlan:
    """The views of ``rows`` as items (view_rows' order), each View drawn when its image is read:
    drawing all of them up front would take minutes and hundreds of MB at 100k images x 8 views."""

    config: AugmentConfig
    rows: np.ndarray  # the manifest row of each item
    numbers: np.ndarray  # the view number of each item

    @classmethod
    def of(cls, config: AugmentConfig, rows: np.ndarray) -> "ViewPlan":
        return cls(config, *view_rows(config.views, np.asarray(rows)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> View:
        return draw_view(self.config, int(self.rows[item]), int(self.numbers[item]))


def epoch_views(config: AugmentConfig, shuffle_seed: int, epoch: int, n: int) -> np.ndarray:
    """Which view each of the ``n`` training images is read in during ``epoch``: drawn from the run's
    shuffle seed, so fused trials (which share it) read the same views as their serial runs."""
    # (numpy seeds must be >= 0; a negative training.seed is valid for torch)
    return np.random.default_rng([shuffle_seed % 2**63, epoch, 0x5EED]).integers(config.views, size=n)


def source_batches(order: Iterable[torch.Tensor], config: AugmentConfig, shuffle_seed: int, epoch: int, n: int) -> Iterator[np.ndarray]:
    """An epoch's batches of training positions (0..n-1) as the rows of the training source to read:
    the positions themselves, or with views the item of each image's view this epoch (view_rows)."""
    views = epoch_views(config, shuffle_seed, epoch, n) if config.views else None
    for batch in order:
        positions = batch.numpy()
        yield positions if views is None else positions + n * views[positions]
