#!/usr/bin/env bash
# The prepared GPU benchmark run for ONE H100 / H200 (about 8 minutes):
#   1. fused cuDNN attention with packed segments vs the XLA path (benchmarks.attention_check): max abs differences
#      of logits and gradients, or the error the cuDNN path raised (recorded, never fatal);
#   2. the GPU suite (python -m benchmarks.run --suite gpu): teacher scoring JAX vs transformers (vs vLLM when it
#      imports), then the training step of Qwen3-0.6B/1.7B/4B/8B-shaped random weights, bf16, T = 4096, full
#      remat, cuDNN attention when step 1 agreed, the largest batch that fits; sizes that fit no batch are skipped.
# Results: $OUT/gpu.json, gpu.md, gpu_ratios.png and attention_check.json (the card is named inside).
#
#   benchmarks/gpu.sh [--tiny] [--out DIR] [any benchmarks.run option, e.g. --models qwen3-4b]
#
# --tiny runs the same script end to end anywhere (CPU included) with test-sized shapes (tests/test_benchmarks.py).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=()
OUT=benchmarks/results
EXTRA=()
while (($#)); do
  case "$1" in
    --tiny) TINY=(--tiny); shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
SUFFIX=${TINY:+_tiny}
mkdir -p "$OUT"

# --- XLA GPU flags (all checked to exist in jax/jaxlib 0.10; unknown ones are dropped below, never fatal) -------
FLAGS=(
  # Overlap asynchronous work (copies, collectives) with compute by scheduling for latency; the standard flag
  # of the JAX GPU performance guide. One GPU has no collectives, so it mostly costs nothing.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Matmuls through cuBLAS/cuBLASLt rather than Triton GEMM fusions: on Hopper the cuBLAS bf16 kernels are the
  # faster ones for the large, regular projections of a transformer (MaxText's GPU configs do the same).
  --xla_gpu_enable_triton_gemm=false
)
# Command buffers (CUDA graphs) are left at XLA's default, which already captures fusions, cuBLAS and custom
# calls; compare without them with LOPD_XLA_EXTRA="--xla_gpu_enable_command_buffer=". Anything in
# LOPD_XLA_EXTRA is appended (e.g. --xla_gpu_autotune_level=0 for a faster, less tuned compile).
read -r -a EXTRA_FLAGS <<<"${LOPD_XLA_EXTRA:-}"
FLAGS+=("${EXTRA_FLAGS[@]}")

probe() { XLA_FLAGS="$1" timeout 120 python -c "import jax; jax.numpy.zeros(1).block_until_ready(); print(jax.devices())" 2>/dev/null; }
if ! probe "${FLAGS[*]}"; then
  KEPT=()
  for f in "${FLAGS[@]}"; do
    if probe "$f" >/dev/null; then KEPT+=("$f"); else echo "[gpu.sh] dropping XLA flag unknown to this jaxlib: $f"; fi
  done
  FLAGS=("${KEPT[@]}")
fi
export XLA_FLAGS="${XLA_FLAGS:-} ${FLAGS[*]}"
# No up-front grab of 75% of the GPU: the vLLM child process and torch share the card with JAX; the train-step
# memory budget is read from the allocator's limit, raised to 95% of the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
echo "[gpu.sh] XLA_FLAGS=$XLA_FLAGS"

# --- 1. fused attention check (own process: a crash in cuDNN must not take the suite down) ------------------------
CHECK="$OUT/attention_check$SUFFIX.json"
timeout 150 python -m benchmarks.attention_check "${TINY[@]}" --out "$CHECK"
status=$?
if ((status)) || [[ ! -s "$CHECK" ]]; then
  echo "{\"ok\": false, \"error\": \"attention_check process exited $status (crash or timeout)\"}" >"$CHECK"
fi

# --- 2. the GPU suite ----------------------------------------------------------------------------------------------
timeout 390 python -m benchmarks.run --suite gpu "${TINY[@]}" --out "$OUT" --attention-check "$CHECK" "${EXTRA[@]}"
rc=$?
echo "[gpu.sh] suite exit $rc; results: $OUT/gpu$SUFFIX.json $OUT/gpu$SUFFIX.md $CHECK"
exit $rc
