"""Shared helpers of the benchmarks: machine description, markdown tables, result files, and a
synthetic ``PreparedData`` with real token shapes (ViT-L-14: [N, 256, 1024]) for the training loop.

Uses only the public API of fairfront (``model``, ``model.fused``, ``search``); nothing in the
package imports bench/.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
# FAIRFRONT_BENCH_RESULTS: another folder for the tables (bench/device/gpu_session.sh writes them to $OUT)
RESULTS = Path(os.environ.get("FAIRFRONT_BENCH_RESULTS") or REPO / "bench" / "results")
WORK = REPO / "runs" / "bench"  # git-ignored: generated data, caches, CSVs of raw runs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git_commit() -> str:
    """HEAD (+dirty), or FAIRFRONT_CODE_VERSION where set: the device machine's copy of the
    checkout can carry git metadata older than its files."""
    if os.environ.get("FAIRFRONT_CODE_VERSION"):
        return os.environ["FAIRFRONT_CODE_VERSION"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions() -> str:
    """The versions a result depends on beside torch: Optuna's samplers change between minor
    releases (5.1 rewrote how GPSampler conditions on running trials), so a sampler table
    without them cannot be compared with another."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("optuna", "open_clip_torch", "geomloss", "scikit-learn", "numpy"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def machine() -> dict[str, str]:
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores visible, {len(os.sched_getaffinity(0))} usable",
        "torch": f"{torch.__version__} (threads {torch.get_num_threads()})",
        "cuda": f"CUDA {cuda}, {torch.cuda.get_device_name(0)}" if cuda else "no CUDA (CPU only)",
        "libraries": library_versions(),
        "load average (1, 5, 15 min) at start": load_average(),
        "code": git_commit(),
    }
    return info


def gpu_note() -> str:
    """Where the GPU rows of a table came from (or that there were none)."""
    if torch.cuda.is_available():
        return f"GPU rows: measured on this machine's {torch.cuda.get_device_name(0)}."
    return "GPU row: not measured, no GPU lent to this task."


def sinkhorn_iterations(blur: float, scaling: float) -> int:
    """Sinkhorn iterations of the fairness loss: the length of geomloss' epsilon-scaling schedule
    (scores in [0, 1], so diameter 1; p = 2), the same schedule objectives/_sinkhorn_packed.py follows."""
    from geomloss._legacy.sinkhorn_divergence import epsilon_schedule

    return len(epsilon_schedule(2, 1.0, blur, scaling))


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value)


def write_result(name: str, title: str, body: str, *, info: dict[str, str], notes: list[str] = ()) -> Path:
    """Print the report and write it to bench/results/<name>.md."""
    lines = [f"# {title}", "", *(f"- {k}: {v}" for k, v in info.items()),
             f"- load average (1, 5, 15 min) at end: {load_average()}", "", body, ""]
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    print(f"written: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


@contextmanager
def timer():
    """``with timer() as t: ...; t()`` -> seconds (synchronising CUDA first)."""
    box = {}
    start = time.perf_counter()
    yield lambda: box.get("s", time.perf_counter() - start)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    box["s"] = time.perf_counter() - start


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---- a PreparedData of random tokens with real shapes ------------------------------------------

# ViT-L-14's frozen tokens at 224 px: 256 patch tokens (and the CLS token), each 1024 wide.
VITL14_TOKENS, VITL14_WIDTH = 256, 1024


def vitl14_prepared(workdir: Path, *, n_train: int, n_val: int, batch_size: int, epochs: int):
    """``synthetic_prepared`` with ViT-L-14 token shapes and a timing run's training settings:
    ``epochs`` epochs at ``batch_size``, no warm-up, no early stop, CUDA when there is one."""
    training = dict(batch_size=batch_size, num_epochs=epochs, warmup_epochs=0, stop_if_degenerate_after=None, device="auto")
    return synthetic_prepared(workdir, n_train=n_train, n_val=n_val, width=VITL14_WIDTH, tokens=VITL14_TOKENS, training=training)


def synthetic_prepared(
    workdir: Path, *, n_train: int, n_val: int, width: int, tokens: int, training: dict, seed: int = 0,
    fake_share: float = 0.8, n_groups: int = 8,
):
    """A ``PreparedData`` whose feature cache holds random float16 tokens [N, tokens, width] in
    memory-mapped .npy files (the layout ``model/cache.py`` writes), with FF++-like labels and 8
    demographic groups. The training loop reads it exactly as it reads a real cache. For timing
    only: the patch tokens repeat every 256 rows."""
    from model import BackboneConfig, DataConfig, ModelConfig, PreparedData, TrainRunConfig, TrainingConfig
    from model.cache import FeatureCache
    from model.detector import Stage1Adapter
    from model.manifest import Manifest
    from model.synthetic import SyntheticConfig

    workdir.mkdir(parents=True, exist_ok=True)
    n = n_train + n_val
    rng = np.random.default_rng(seed)
    directory = workdir / f"tokens-{n}x{tokens}x{width}"
    directory.mkdir(exist_ok=True)
    cls_path, patches_path = directory / "cls.npy", directory / "patches.npy"
    if not (patches_path.is_file() and np.load(patches_path, mmap_mode="r").shape == (n, tokens, width)):
        cls = np.lib.format.open_memmap(cls_path, mode="w+", dtype=np.float16, shape=(n, width))
        patches = np.lib.format.open_memmap(patches_path, mode="w+", dtype=np.float16, shape=(n, tokens, width))
        cls[:] = rng.standard_normal((n, width), dtype=np.float32)
        # A pool of 256 random images written again and again: drawing 100k x 256 x 1024 normals
        # would take minutes, and a timing run does not care that rows repeat.
        pool = rng.standard_normal((min(n, 256), tokens, width), dtype=np.float32).astype(np.float16)
        for start in range(0, n, len(pool)):  # in chunks: ViT-L shapes are 0.5 MB per image
            stop = min(n, start + len(pool))
            patches[start:stop] = pool[: stop - start]
        cls.flush(), patches.flush()
        del cls, patches
    cache = FeatureCache(directory=directory, key="synthetic", cls=np.load(cls_path, mmap_mode="r"),
                         patches=np.load(patches_path, mmap_mode="r"))
    labels = (rng.random(n) < fake_share).astype(int)
    groups = rng.integers(0, n_groups, n)
    frame = pd.DataFrame({
        "path": [f"synthetic/{i}.png" for i in range(n)], "label": labels,
        "split": ["train"] * n_train + ["val"] * n_val, "group": groups, "group_name": [f"g{g}" for g in groups],
    })
    manifest = Manifest(path=directory / "manifest.csv", frame=frame, group_names=tuple(f"g{g}" for g in range(n_groups)), sha256="synthetic")
    config = TrainRunConfig(
        workdir=workdir, data=DataConfig(synthetic=SyntheticConfig()), backbone=BackboneConfig(weights="random"),
        output_dir=workdir / "train", training=TrainingConfig(**training),
    )
    torch.manual_seed(seed)
    stage1 = Stage1Adapter(width, ModelConfig()).state_dict()
    backbone = types.SimpleNamespace(shape=types.SimpleNamespace(width=width))  # cache mode reads only its width
    return PreparedData(config, manifest, {}, backbone, cache, directory / "stage1.pt", stage1)


def demo_train_config(workdir: Path, **training):
    """studies/demo_train.yaml with its generated data under ``workdir`` (not the shared runs/demo)."""
    import dataclasses

    from model import load_train_config

    config = load_train_config(REPO / "studies" / "demo_train.yaml")
    config = dataclasses.replace(config, workdir=workdir, output_dir=workdir / "train")
    return config.with_training(**training) if training else config


def subset_manifest(manifest, n_train: int, n_val: int):
    """The first ``n_train`` train and ``n_val`` val rows of a manifest, as a Manifest of its own
    (its own cache key: the sha256 names the subset). Asked for more rows than a split has, it
    cycles through them again: a timing that needs more images than the demo has reads some twice."""
    import hashlib

    from model.manifest import Manifest

    def first(rows: pd.DataFrame, n: int) -> pd.DataFrame:
        return rows.head(n) if n <= len(rows) or rows.empty else pd.concat([rows] * -(-n // len(rows))).head(n)

    frame = manifest.frame
    rows = pd.concat([first(frame[frame["split"] == "train"], n_train), first(frame[frame["split"] == "val"], n_val)])
    digest = hashlib.sha256(f"{manifest.sha256}:{n_train}:{n_val}".encode()).hexdigest()
    path = manifest.path.with_name(f"{manifest.path.stem}-subset-{n_train}-{n_val}.csv")
    return Manifest(path=path, frame=rows.reset_index(drop=True), group_names=manifest.group_names, sha256=digest)


def demo_prepared(workdir: Path | None = None, **training):
    """The demo's prepared data (synthetic images, tiny-ViT cache, Stage 1) under runs/bench/demo."""
    from model import prepare

    config = demo_train_config(workdir or WORK / "demo", **training)
    return config, prepare(config, progress=False, with_test_caches=False)
