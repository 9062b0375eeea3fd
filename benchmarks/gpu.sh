#!/usr/bin/env bash
# The device check, on a GPU machine (H100/H200: jax with CUDA, Python 3.12), in under 10 minutes:
#   1. the kernel and attention tests compiled for the GPU (tests marked `gpu`; not interpreted),
#   2. the throughput benchmark at Llama-3-8B shapes with random weights, ours against
#      transformers on the same GPU (skipped if transformers is not installed there),
#   3. the decode step at 32 rows and 512 context beside its weight matmuls alone,
#   4. a measured cost profile for the simulator (benchmarks.gpu_profile: step terms fitted to
#      recorded steps, host-to-device and disk rates of real adapter loads),
#   5. the adapter load path against a raw device_put from pinned host memory (benchmarks.load_path).
# Results land in $OUT (or ./gpu-results): gpu_tests.log, gpu_throughput.json, gpu_profile.json,
# load_path.json, gpu.log.
# `bash benchmarks/gpu.sh --cpu-check` runs the same steps at tiny shapes on a CPU (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PLORA_PROGRESS=0
# transformers runs in the same process as our engine: leave it room beside JAX's pool.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
OUT="${OUT:-$PWD/gpu-results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
PRESET=llama3_8b
CONCURRENCY=(1 8 32 64)
LOAD_PRESET=smollm2_135m
LOAD_RANKS=8,16,32,64,128
if [[ "${1:-}" == "--cpu-check" ]]; then
  PRESET=tiny
  CONCURRENCY=(2)
  LOAD_PRESET=tiny
  LOAD_RANKS=8
fi
{
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    if [[ "$PRESET" == "tiny" ]]; then
      "$PYTHON" -m pytest -q tests/test_attention.py -k "hand_worked or lowering" 2>&1 | tee "$OUT/gpu_tests.log"
    else
      # The suite pins JAX to the CPU unless JAX_PLATFORMS says otherwise (tests/conftest.py).
      JAX_PLATFORMS=cuda "$PYTHON" -m pytest -q -rs -m gpu tests/test_attention.py tests/test_lora_kernels.py 2>&1 \
        | tee "$OUT/gpu_tests.log" || true
    fi
  else
    echo "pytest is not installed here: kernel tests skipped" | tee "$OUT/gpu_tests.log"
  fi
  HF=()
  "$PYTHON" -c 'import transformers, torch' 2>/dev/null || HF=(--skip-hf)
  # Each step runs even if the one before failed (a lent machine's minutes are few); the script
  # still exits non-zero if any failed.
  failed=0
  "$PYTHON" -m benchmarks.gpu_throughput --preset "$PRESET" --concurrency "${CONCURRENCY[@]}" \
    --step-rows "${CONCURRENCY[-1]}" --step-context 512 "${HF[@]}" --json "$OUT/gpu_throughput.json" \
    || { echo "FAILED: benchmarks.gpu_throughput"; failed=1; }
  "$PYTHON" -m benchmarks.gpu_profile --preset "$PRESET" --rows "${CONCURRENCY[-1]}" --json "$OUT/gpu_profile.json" \
    || { echo "FAILED: benchmarks.gpu_profile"; failed=1; }
  # The adapter load path against a raw device_put from pinned host memory (SmolLM2 shapes: the
  # adapter's bytes matter here, not the model's).
  "$PYTHON" -m benchmarks.load_path --preset "$LOAD_PRESET" --ranks "$LOAD_RANKS" --json "$OUT/load_path.json" \
    || { echo "FAILED: benchmarks.load_path"; failed=1; }
  exit "$failed"
} 2>&1 | tee "$OUT/gpu.log"
