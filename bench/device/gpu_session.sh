#!/usr/bin/env bash
# Run ON THE GPU MACHINE, in one device call (a task's lease is ~15 minutes, start-up included):
#
#   bash bench/device/fetch_wheels.sh                      # here first: the wheels the image lacks
#   run(command="FAIRFRONT_CODE_VERSION=<git rev-parse --short HEAD, here> bash bench/device/gpu_session.sh",
#       carry=[".whl"], timeout_s=600)
#
# (The copy on the device machine carried the session's first commit in its git metadata, not the
# files' commit: the tables' 'code' line would name the wrong one without FAIRFRONT_CODE_VERSION.)
#
# Installs the carried wheels, runs the CUDA-only tests, then issue 5's GPU rows at sizes that
# fit the lease (each step has its own time limit, so one slow step cannot eat the others), and
# leaves those benchmarks' results tables (trial_scale.md, cache_build.md, cache_vs_online.md,
# token_sources.md) and the whole log under $OUT: copy the tables into bench/results/ here.
# SMOKE=1 runs every step at tiny sizes: a check of this script on a machine without a GPU, with
# each step's time limit 10x (its limits are the GPU lease's; the check is that every step finishes).
# STEPS="cache_build trial_scale" runs only those (of: tests trial_scale cache_build cache_vs_online
# token_sources), for a second call that re-measures what a change touched.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fairfront-gpu-session}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-tests trial_scale cache_build cache_vs_online token_sources}
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
limit_scale=1
[ "$SMOKE" = 1 ] && limit_scale=10

log() { echo "== $(date +%T) $*" | tee -a "$OUT/log"; }
step() {  # step SECONDS command...: run it under a time limit, log its output and exit status
  local seconds=$1; shift
  log "$*"
  timeout "$((seconds * limit_scale))" "$@" 2>&1 | grep --line-buffered -v -e '^USDT' -e 'gpuGetDeviceCount' | tee -a "$OUT/log"
  log "exit ${PIPESTATUS[0]}"
}

if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then  # (a smoke run uses what is installed)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export FAIRFRONT_BENCH_RESULTS=$OUT  # the tables land beside the log, not in bench/results/
step 10 nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,driver_version --format=csv
step 5 df -h /dev/shm "$PWD"
step 30 python3 -c "import torch, optuna, open_clip, geomloss; print(torch.__version__, torch.cuda.is_available(), optuna.__version__, open_clip.__version__); print('NVML utilisation', torch.cuda.utilization() if torch.cuda.is_available() else 'n/a')"

if [ "$SMOKE" = 1 ]; then  # ViT-L-14 on 2 CPU cores: ~1 s an image, so a few images and no online ViT-L epoch
  n_train=64 n_val=32 fused=2 vitl_images=4 vitl_batch=2,4 workers=0 online=(--skip-vitl) mapped=(--n-train 64 --n-val 32 --epochs 1 --repeats 2)
else
  n_train=8192 n_val=1024 fused=8 vitl_images=6400,25600 vitl_batch=128,256 workers=16  # batch 128: studies/ffpp_clip_vitl14.yaml's backbone.batch_size
  online=(--vitl-train 512 --vitl-val 64 --vitl-batch 32 --vitl-epochs 3) mapped=(--n-train 2048 --n-val 256 --epochs 2)
  # 16 loader workers keep up to 32 batches of 256 images (~4.9 GB) in /dev/shm; a container's 64 MB default gives a Bus error
  shm_kb=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)
  if [ "${shm_kb:-0}" -lt 8000000 ]; then
    workers=0
    log "/dev/shm has ${shm_kb:-no} kB free: the ViT-L-14 cache build decodes in the main process"
  fi
fi
# The tests that skip without CUDA: the losses under CUDA autocast (bf16, fp16) vs the CPU, the compiled Sinkhorn
# loop on CUDA (Triton), tokens held on the GPU, fused vs serial trials in bf16.
wanted tests && step 120 python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/objectives_tests/test_fairness_loss.py \
  tests/objectives_tests/test_compiled_sinkhorn.py tests/objectives_tests/test_sinkhorn.py tests/model_tests/test_tokens.py \
  tests/model_tests/test_fused.py tests/model_tests/test_cache.py
# Targets 2 and 3: serial and 8-fused trials on ViT-L-14 token shapes, each also with compile_sinkhorn,
# plus launches per step (and the CUDA kernels the profiler saw).
wanted trial_scale && step 200 python3 -m bench.trial_scale --n-train "$n_train" --n-val "$n_val" --epochs 2 --fused "$fused"
# Target 4: cache build with ViT-L-14 in bf16 and a multi-worker loader.
wanted cache_build && step 200 python3 -m bench.cache_build --workers 0 --vitl-images "$vitl_images" --vitl-batch "$vitl_batch" --vitl-workers "$workers"
# Target 1: cache vs online epoch with ViT-L-14.
wanted cache_vs_online && step 70 python3 -m bench.cache_vs_online --tiny-epochs 2 "${online[@]}"
# Target 2 when the tokens are not held on the GPU: pinned read-ahead vs reading in the step (last:
# the step limits and the wheel install add up to about a 600 s call, and this one matters least).
wanted token_sources && step 45 python3 -m bench.token_sources "${mapped[@]}"
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
