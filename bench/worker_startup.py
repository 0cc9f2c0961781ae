#!/usr/bin/env python
"""What every worker process pays before its first trial: ``model.prepare`` on a study whose
feature caches and Stage 1 adapter already exist (``prepare`` ran once, as ``--workers`` and the
image's ``prepare`` command do), in a fresh interpreter, for the demo's tiny ViT and for
ViT-L-14 (random weights, the real model's size).

    python -m bench.worker_startup [--images 16] [--repeats 5]

Two rows per backbone: ``prepare`` as it is (the backbone's shape is read off its open_clip config
and the model is never built: a run on the cache does not need it), and ``prepare`` followed by
building the backbone, which is what every worker did before (``model.backbone.LazyBackbone``).
Seconds are the fresh process's whole wall time (imports included), peak memory its maximum
resident set (VmHWM); medians over --repeats processes. Prints a markdown table and writes it to
bench/results/worker_startup.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time

import yaml

from bench._common import REPO, WORK, machine, markdown_table, write_result

# Run in a fresh interpreter: peak memory and import time are per process.
# (VmHWM, not getrusage's ru_maxrss: Linux carries that one over from the forking parent.)
CHILD = """
import re, sys
from model import load_train_config, prepare
prepared = prepare(load_train_config(sys.argv[1]), progress=False)
if sys.argv[2] == "build":
    prepared.backbone.module
with open("/proc/self/status") as status:
    print(prepared.backbone.built, re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
"""


def study_config(name: str, backbone: dict, images: int):
    """studies/demo_train.yaml on ``images`` synthetic train and val images each, with ``backbone``."""
    from model import load_train_config
    from model.typed_config import to_dict

    config = load_train_config(REPO / "studies" / "demo_train.yaml")
    workdir = WORK / "worker-startup" / name
    config = dataclasses.replace(config, workdir=workdir, output_dir=workdir / "train",
                                 backbone=dataclasses.replace(config.backbone, **backbone),
                                 data=dataclasses.replace(config.data, synthetic=dataclasses.replace(
                                     config.data.synthetic, n_train=images, n_val=images, n_test=images)))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "train.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return config, path


def fresh_prepare(path, what: str, repeats: int) -> dict:
    """The median over ``repeats`` fresh processes (a process start varies by a second or more here)."""
    seconds, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), what], cwd=REPO, capture_output=True, text=True, check=True)
        seconds.append(time.perf_counter() - start)
        built, peak_kb = out.stdout.split()
        peaks.append(int(peak_kb) / 2**20)
    return {"backbone built": built == "True", "seconds (median)": statistics.median(seconds),
            "seconds (min-max)": f"{min(seconds):.1f}-{max(seconds):.1f}", "peak memory GiB": statistics.median(peaks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="synthetic train and val images each (ViT-L-14 on the CPU: ~1 s each)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per row")
    args = parser.parse_args(argv)
    info = machine()
    from model import prepare

    rows = []
    backbones = {"fairfront-tiny-vit": {}, "ViT-L-14-quickgelu": {"name": "ViT-L-14-quickgelu", "weights": "random"}}
    for label, backbone in backbones.items():
        config, path = study_config(label, backbone, args.images)
        prepare(config, progress=False)  # the caches and Stage 1, once (not timed)
        for what, run in (("lazy", "prepare (now)"), ("build", "prepare, then build the backbone (before)")):
            rows.append({"backbone": label, "worker start": run, **fresh_prepare(path, what, args.repeats)})
    notes = [
        "Each row: a fresh `python -c` process that imports fairfront and runs model.prepare on finished caches; "
        "its wall time includes the imports (torch, open_clip, scikit-learn, ...), the manifest check and the cache's checksums.",
        f"{args.images} synthetic train + {args.images} val images: the caches are small, so the rows measure the fixed costs.",
        "With real weights, building the backbone also reads the checkpoint (ViT-L-14: ~0.9 GB in float16, as OpenAI ships it) on top of the random "
        "initialisation timed here.",
        "A node pays the difference once per worker: 8 ViT-L-14 workers that built the backbone held 8 x its extra "
        "memory for a model none of them ran, memory the page cache of the memory-mapped feature cache can use instead.",
    ]
    write_result("worker_startup", "Worker start-up: prepare on finished caches", markdown_table(rows), info=info, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
