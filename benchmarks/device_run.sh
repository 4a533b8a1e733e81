#!/usr/bin/env bash
# The GPU measurements as one prepared script for the accelerator machine (issue 29).
#
# Device time is short (minutes, start-up included), so: a smoke step first, then the steps in
# priority order, each writing its rows under $OUT as soon as it finishes and bounded by its own
# timeout, so a slow step costs the later ones, never the figures already taken.
#
# On this machine first:   make device-data      (copies the training images into .device-data/)
# Then with the device tool, from the repository root, carrying .device-data:
#   COMMIT=<sha> bash benchmarks/device_run.sh
# It needs only what the device has (torch, torchvision, numpy, pandas, scikit-learn, scipy,
# Pillow, matplotlib): cxr_platform_tests/test_device_recipe.py checks that on every CI run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-device-out}
DATA=${DATA:-.device-data/kaggle-chest-xray-224}
COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
PY=${PY:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"

# The device tool allows 600 s per command and about 900 s of device time in all, start-up
# included: the steps share DEADLINE seconds, and a step never runs past what is left.
DEADLINE=${DEADLINE:-540}

step() {  # step NAME SECONDS COMMAND...: run it, keep its output, note how it ended
  local name=$1 seconds=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "$name skipped: ${left}s left" | tee -a "$OUT/steps.txt"
    return
  fi
  [ "$seconds" -gt "$left" ] && seconds=$left
  local started=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  echo "$name exit=$? seconds=$((SECONDS - started))" | tee -a "$OUT/steps.txt"
}

{
  echo "commit $COMMIT"
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
} >"$OUT/environment.txt" 2>&1

# 0. Smoke: the whole recipe, one epoch of the baseline, on the real folder (builds the cache).
step 00-smoke 120 $PY benchmarks/device_recipe.py "$DATA" --arch baseline_cnn --epochs 1 \
  --home "$WORK" --commit "$COMMIT" --out "$OUT/00-smoke.json"
# 1. Throughput, ResNet18 at batch 256: loader-only, compute-only, end-to-end, inference (bf16).
step 01-throughput 90 $PY benchmarks/train_throughput.py --archs resnet18 --batch-size 256 \
  --images 4096 --inference-batch-size 1024
step 01-throughput-compile 150 $PY benchmarks/train_throughput.py --archs resnet18 \
  --batch-size 256 --images 4096 --inference-batch-size 1024 --compile
# 2. The full-profile ResNet18 run, 30 epochs, timed from cache to evaluation (target < 60 s).
step 02-resnet18-full 150 $PY benchmarks/device_recipe.py "$DATA" --arch resnet18 \
  --home "$WORK" --commit "$COMMIT" --out "$OUT/02-resnet18-full.json"
# 3. The same for DenseNet121, then its batched inference.
step 03-densenet121-full 180 $PY benchmarks/device_recipe.py "$DATA" --arch densenet121 \
  --home "$WORK" --commit "$COMMIT" --out "$OUT/03-densenet121-full.json"
step 03-densenet121-throughput 60 $PY benchmarks/train_throughput.py --archs densenet121 \
  --batch-size 256 --images 2048 --inference-batch-size 1024
rm -rf "$WORK"
