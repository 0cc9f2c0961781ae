#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a device call: downloads into .whl/ (git-ignored) the
# wheels that the GPU machine's image lacks (it has torch, torchvision, numpy, pandas, scipy,
# scikit-learn, timm, huggingface_hub, safetensors, regex, tqdm, pyyaml, pytest; no registry).
# Python 3.12, x86-64, no dependencies resolved: every missing one is named below.
set -euo pipefail
cd "$(dirname "$0")/../.."
packages=(
  optuna==5.1.0 alembic mako colorlog sqlalchemy greenlet   # search/ (the fused-trials bench reads the demo's space)
  open_clip_torch==3.3.0 ftfy wcwidth                        # model/backbone.py
  geomloss==0.3.1 pot                                        # objectives/ (geomloss' schedule), tests (POT)
  nvidia-ml-py                                               # pynvml: torch.cuda.utilization (trial_scale's GPU busy)
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "${packages[@]}"
ls -la .whl
du -sh .whl
