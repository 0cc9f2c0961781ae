"""The deterministic synthetic demo dataset: small face-like images with a planted forgery
signal whose strength differs by demographic group.

The demo study (DESIGN.md) must look like the real problem: a detector that is decent but not
perfect, with clearly unequal error rates across the 8 gender x race groups, so that the AUC /
fairness trade-off is there to search. Three things make it so:

* fakes carry the artefacts of four "manipulation methods" (an inner-face colour shift, a
  blending seam, and the fixed-phase checkerboard that upsampling layers leave), each fake with
  a random strength in [0, 2) (some fakes are clean), scaled down on minority groups; being
  relative to the local intensity, they are also smaller in absolute terms on dark skin;
* reals carry look-alike nuisance: a natural face tint, and low-quality capture that leaves a
  similar grid pattern over the whole image, face included, more often in minority groups; so
  an unfair detector ("grid => fake") is the easy solution and a fairness loss has something
  to fix (a model that localises the pattern to the face can do better);
* pose, scale, lighting, hair, blur and sensor noise vary per image.

Held-out sets shift the distribution the way Celeb-DF (no asian group, better colour matching)
and DFDC (more diverse, noisier, lower quality) do, with the same code (``TEST_SETS``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from model.staging import ready, staging_folder

__all__ = ["SyntheticConfig", "SyntheticDataset", "generate", "GENDERS", "RACES", "TEST_SETS"]

GENDERS = ("male", "female")
RACES = ("asian", "white", "black", "others")
_VERSION = 2  # bump whenever the images change for the same config, to invalidate old stamps
_STAMP = "COMPLETE.json"
_MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic dataset (flat: they are YAML keys of the study file).

    How the defaults were calibrated (seeds 0, 1, 2; val = 400 images, 80 of them real, so each
    AUC is +-0.03): a linear probe (standardised logistic regression on the mean patch token +
    CLS of block 3 of the frozen random-weight fairfront-tiny-vit, trained on the train split)
    gives val AUC 0.79 / 0.73 / 0.74; a small attention-pooling head on the same tokens
    0.87 / 0.84 / 0.89; the real detector (studies/demo_train.yaml, seed 0, 12 epochs) 0.87,
    with degenerate epochs 1-5, F_FPR 1.98, F_MEO 0.83 (seed report, Exp3: 0.82, 1-5, 1.55, 0.88).
    Attention head, seed 0, per-group val FPR 0.17-0.33 (white, others) up to 1.0 (black), TPR
    0.57 (male/black) to 0.95; the linear probe's FPR is 0.67-1.0 everywhere (80% fakes).
    texture_amp is the main lever: 0.15 gave the real detector 0.88, the linear probe 0.78.
    """

    seed: int = 0
    image_size: int = 64
    n_train: int = 1600
    n_val: int = 400
    n_test: int = 400  # per held-out test set
    fake_share: float = 0.8  # FF++: 4 manipulations x 1000 fakes vs 1000 reals
    # Demographics, FF++-like: mostly white, few asian/black; gender roughly balanced.
    male_share: float = 0.45
    share_asian: float = 0.12
    share_white: float = 0.62
    share_black: float = 0.10
    share_others: float = 0.16
    # Artefact strength multiplier per group (race x gender); weaker on minorities.
    strength_asian: float = 0.6
    strength_white: float = 1.0
    strength_black: float = 0.45
    strength_others: float = 0.75
    strength_female: float = 0.85  # multiplies the race strength for female faces
    # Artefact amplitudes at strength 1 (relative to the local image intensity).
    colour_amp: float = 0.12  # inner-face colour shift
    seam_amp: float = 0.15  # brightness ring at the blend boundary
    texture_amp: float = 0.12  # fixed-phase checkerboard inside the face (upsampling artefact)
    # Nuisance on every image.
    natural_tint_sd: float = 0.04  # real inner-face tint (makeup, lighting): confusable with colour_amp
    lowq_share_white: float = 0.1  # share of images captured at low quality (grid pattern)
    lowq_share_minority: float = 0.3  # same for asian/black/others: higher FPR there
    lowq_amp: float = 0.04  # amplitude of the low-quality grid pattern
    noise_min: float = 0.005  # sensor noise std range (0..1 intensity)
    noise_max: float = 0.04
    blur_max: float = 0.5  # gaussian blur sigma range [0, blur_max] in pixels

    def __post_init__(self) -> None:
        shares = (self.share_asian, self.share_white, self.share_black, self.share_others)
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"race shares must be >= 0 and sum to 1, got {shares}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        for name in ("fake_share", "male_share", "lowq_share_white", "lowq_share_minority"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            if f.type in (float, "float") and getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")
        if not 0 <= self.noise_min <= self.noise_max:
            raise ValueError(f"need 0 <= noise_min <= noise_max, got {self.noise_min}, {self.noise_max}")

    def digest(self) -> str:
        blob = json.dumps({"version": _VERSION, "methods": _METHODS.tolist(), "test_sets": TEST_SETS,
                           **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class SyntheticDataset:
    manifest: Path  # train + val splits
    test_manifests: dict[str, Path]  # held-out sets, name -> CSV


# Artefact mix of the four fake "methods" (rows) over (colour, seam, texture), like FF++'s
# Deepfakes / Face2Face / FaceSwap / NeuralTextures.
_METHODS = np.array([[1.0, 1.0, 0.6], [0.3, 0.5, 1.0], [1.3, 0.8, 0.4], [0.0, 0.3, 1.3]])
# Held-out domains: race shares (asian, white, black, others) and multipliers of the artefact
# amplitudes, low-quality share and noise. Celeb-DF has no asian group and better blending.
TEST_SETS = {
    "synth-celebdf": dict(shares=(0.0, 0.70, 0.15, 0.15), colour=0.5, seam=1.3, texture=0.5,
                          lowq=0.5, noise=1.0),
    "synth-dfdc": dict(shares=(0.15, 0.45, 0.20, 0.20), colour=0.8, seam=0.7, texture=0.9,
                       lowq=2.0, noise=1.5),
}


def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to weights (largest remainder)."""
    raw = n * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _assign(n: int, fake_share: float, male_share: float, shares, rng) -> pd.DataFrame:
    """Exact group counts and fake counts (fakes spread over groups in proportion), shuffled."""
    groups = [(g, r) for g in GENDERS for r in RACES]
    w = np.array([(male_share if g == "male" else 1 - male_share) * shares[RACES.index(r)]
                  for g, r in groups])
    n_g = _allocate(n, w)
    fakes = _allocate(round(fake_share * n), n_g.astype(float)) if n_g.sum() else n_g
    rows = [(g, r, int(k < f)) for (g, r), m, f in zip(groups, n_g, fakes) for k in range(m)]
    frame = pd.DataFrame(rows, columns=["gender", "race", "label"])
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


def _ellipse(u, v, cu, cv, ru, rv, soft):
    """Soft (anti-aliased) mask of an ellipse in face coordinates."""
    r2 = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    return 1.0 / (1.0 + np.exp(np.clip((r2 - 1.0) / soft, -50, 50)))


_SKIN = {"asian": (0.86, 0.71, 0.57), "white": (0.91, 0.75, 0.65),
         "black": (0.42, 0.28, 0.20), "others": (0.70, 0.52, 0.39)}


def _render(cfg: SyntheticConfig, gender: str, race: str, label: int, domain: dict,
            rng: np.random.Generator) -> np.ndarray:
    s = cfg.image_size
    y, x = (np.mgrid[0:s, 0:s] + 0.5) / s
    # Background: a random two-colour gradient.
    c1, c2, phi = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3), rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (x - 0.5) * np.cos(phi) + (y - 0.5) * np.sin(phi), 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    # Face frame: centre, scale, roll, yaw; u, v are face coordinates (unit ellipse = face).
    cx, cy = 0.5 + rng.normal(0, 0.035), 0.52 + rng.normal(0, 0.035)
    scale, roll, yaw = rng.uniform(0.85, 1.1), rng.normal(0, 0.12), rng.normal(0, 0.08)
    a, b = 0.20 * scale * (1.06 if gender == "male" else 0.95), 0.27 * scale
    u = ((x - cx) * np.cos(roll) + (y - cy) * np.sin(roll)) / a
    v = (-(x - cx) * np.sin(roll) + (y - cy) * np.cos(roll)) / b
    soft = 0.06
    skin = np.array(_SKIN[race]) * rng.normal(1.0, 0.05, 3) * rng.uniform(0.88, 1.1)
    light = rng.uniform(0, 1) ** 2 * (0.45 if race in ("white", "others") else 0.1)
    hair = rng.uniform(0.03, 0.2) + light * np.array([1.0, 0.75, 0.45])  # black .. brown/blond
    # Hair behind the face: a cap for male faces, long hair down the sides for female faces.
    if gender == "male":
        back = _ellipse(u, v, 0, -0.12, 1.15, 1.1, soft) * (v < 0.1)
    else:
        back = np.maximum(_ellipse(u, v, 0, -0.05, 1.3, 1.15, soft),
                          (np.abs(u) < 1.3) * (v > 0) * (v < rng.uniform(1.1, 1.6)) * 1.0)
    img = img * (1 - back[..., None]) + hair * back[..., None]
    neck = ((np.abs(u) < 0.55) & (v > 0.5)).astype(float)[..., None]
    img = img * (1 - neck) + skin * 0.85 * neck
    face = _ellipse(u, v, 0, 0, 1, 1, soft)[..., None]
    k, psi = rng.uniform(0, 0.5), rng.uniform(0, 2 * np.pi)
    shade = (1 + 0.5 * k * (u * np.cos(psi) + v * np.sin(psi)) - 0.15 * (u**2 + v**2))[..., None]
    img = img * (1 - face) + skin * shade * face
    fringe = face * (v < rng.uniform(-0.75, -0.5))[..., None]
    img = img * (1 - fringe) + hair * fringe
    if gender == "male" and rng.random() < 0.35:  # beard
        beard = face * (v > 0.35)[..., None] * 0.6
        img = img * (1 - beard) + hair * beard
    for side in (-1, 1):
        eye = _ellipse(u, v, side * 0.42 + yaw, -0.1, 0.14, 0.08, 0.2)[..., None]
        img = img * (1 - 0.85 * eye) + 0.08 * eye * 0.85
    mouth = _ellipse(u, v, yaw, 0.5, 0.3, 0.07, 0.2)[..., None]
    img = img * (1 - mouth) + skin * np.array([0.8, 0.45, 0.45]) * mouth
    # Inner face (what a face swap replaces): natural tint on every image, artefacts on fakes.
    inner = _ellipse(u, v, 0, 0.05, 0.8, 0.8, 0.15)[..., None]
    swapped = img * (1 + rng.normal(0, cfg.natural_tint_sd, 3))
    checker = ((np.indices((s, s)).sum(0) % 2) * 2.0 - 1.0)[..., None]  # fixed pixel-grid phase
    if label == 1:
        strength = rng.uniform(0, 2) * getattr(cfg, f"strength_{race}")
        strength *= cfg.strength_female if gender == "female" else 1.0
        w_col, w_seam, w_tex = _METHODS[rng.integers(len(_METHODS))] * strength
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        swapped *= 1 + cfg.colour_amp * domain["colour"] * w_col * direction
        swapped *= 1 + cfg.texture_amp * domain["texture"] * w_tex * checker
        img = img * (1 - inner) + swapped * inner
        ring = 4 * inner * (1 - inner)
        img *= 1 + cfg.seam_amp * domain["seam"] * w_seam * ring
    else:
        img = img * (1 - inner) + swapped * inner
    # Camera: colour cast and exposure, low-quality capture (a demosaicing-like grid pattern over
    # the whole image, face included), blur, sensor noise.
    img *= rng.normal(1.0, 0.04, 3) * rng.uniform(0.75, 1.15)
    lowq = cfg.lowq_share_white if race == "white" else cfg.lowq_share_minority
    if rng.random() < min(1.0, lowq * domain["lowq"]):
        img *= 1 + cfg.lowq_amp * rng.uniform(0.3, 1.0) * checker
    img = gaussian_filter(img, sigma=(rng.uniform(0, cfg.blur_max),) * 2 + (0,))
    img += rng.normal(0, rng.uniform(cfg.noise_min, cfg.noise_max) * domain["noise"], img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_set(root: Path, name: str, split_names: dict[str, int], cfg: SyntheticConfig,
               domain: dict, set_id: int, bar) -> pd.DataFrame:
    frames = []
    for split, n in split_names.items():
        sid = (set_id, list(split_names).index(split))
        rows = _assign(n, cfg.fake_share, cfg.male_share, domain["shares"],
                       np.random.default_rng([cfg.seed, *sid]))
        folder = root / "images" / name / split
        folder.mkdir(parents=True)
        paths = []
        for i, row in enumerate(rows.itertuples()):
            rng = np.random.default_rng([cfg.seed, *sid, i, 1])
            img = _render(cfg, row.gender, row.race, row.label, domain, rng)
            rel = f"images/{name}/{split}/{i:05d}.png"
            Image.fromarray(img).save(root / rel, format="PNG")
            paths.append(rel)
            bar.update()
        frames.append(pd.DataFrame({"path": paths, "label": rows["label"], "split": split,
                                    "gender": rows["gender"], "race": rows["race"]}))
    return pd.concat(frames, ignore_index=True)


def _is_complete(out_dir: Path, digest: str) -> bool:
    try:
        return json.loads((out_dir / _STAMP).read_text())["config_sha256"] == digest
    except (OSError, ValueError, KeyError):
        return False


def _result(out_dir: Path) -> SyntheticDataset:
    return SyntheticDataset(manifest=out_dir / _MANIFEST,
                            test_manifests={n: out_dir / f"{n}.csv" for n in TEST_SETS})


def generate(out_dir: Path, config: SyntheticConfig, *, progress: bool = True) -> SyntheticDataset:
    """Write the dataset under ``out_dir`` (manifest.csv with train/val, one CSV per held-out
    set, images/), or reuse it if a complete one for the same config is already there.

    The stamp file is written last, into a temporary sibling directory that is then renamed into
    place, so an interrupted run never looks complete.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).absolute()
    digest = config.digest()
    if _is_complete(out_dir, digest):
        return _result(out_dir)
    ours = {_STAMP, _MANIFEST, "images", *(f"{n}.csv" for n in TEST_SETS)}
    if out_dir.exists():  # never delete a directory we did not write
        foreign = sorted(set(os.listdir(out_dir)) - ours)
        if foreign:
            raise ValueError(f"{out_dir} exists and holds files generate() did not write: "
                             f"{foreign[:5]}; choose another out_dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # (a run killed mid-way leaves its folder; the next generate removes it)
    with staging_folder(out_dir, hidden=True, what="a synthetic-data generation") as tmp:
        total = config.n_train + config.n_val + config.n_test * len(TEST_SETS)
        with tqdm(total=total, desc="synthetic faces", disable=not progress) as bar:
            train_domain = dict(colour=1.0, seam=1.0, texture=1.0, lowq=1.0, noise=1.0,
                                shares=(config.share_asian, config.share_white,
                                        config.share_black, config.share_others))
            frame = _write_set(tmp, "ff", {"train": config.n_train, "val": config.n_val},
                               config, train_domain, 0, bar)
            frame.to_csv(tmp / _MANIFEST, index=False)
            for set_id, (name, domain) in enumerate(TEST_SETS.items(), start=1):
                frame = _write_set(tmp, name, {"test": config.n_test}, config, domain, set_id, bar)
                frame.to_csv(tmp / f"{name}.csv", index=False)
        stamp = {"config_sha256": digest, "config": dataclasses.asdict(config)}
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True))
        if _is_complete(out_dir, digest):  # another process finished first: keep theirs (ours goes with the block)
            return _result(out_dir)
        ready(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    return _result(out_dir)
