#!/usr/bin/env bash
# The prepared GPU benchmark run for ONE H100 / H200, within a time budget (default 420 s, about 7 minutes, which
# leaves a minute of an 8-minute slot for start-up): python -m benchmarks.gpu_suite runs each section in its own
# process, most wanted first, and skips (saying so) what would not fit the budget:
#   1. fused cuDNN attention with packed segments vs the XLA path (benchmarks.attention_check): max abs differences
#      of logits and gradients, or the error the cuDNN path raised (recorded, never fatal);
#   2. the Qwen3-4B-shaped training step (the >= 45% MFU goal), then teacher scoring JAX vs transformers (vs vLLM
#      when it imports), then the 0.6B / 1.7B / 8B shapes: train_step.GPU_POLICY on every card (bf16 params, fp32
#      AdamW moments), T = 4096, cuDNN attention when step 1 agreed, the largest batch that fits.
# Each section writes $OUT/gpu.json and gpu.md the moment it ends; attention_check.json beside them.
#
#   benchmarks/gpu.sh [--tiny] [--out DIR] [--budget-s SECONDS] [--models qwen3-4b,...] [--note TEXT]
#
# Needs only what the GPU image has (jax with its CUDA plugin, flax, optax, orbax, tensorstore, transformers,
# torch, jinja2): no grain, math-verify, tensorboardX, vllm or matplotlib, and nothing is downloaded. torch and vLLM
# are optional (their comparisons are skipped with the reason when absent); matplotlib only adds the ratio PNG.
# Without a GPU it stops at once with one line, unless --tiny: test-sized shapes end to end on any machine.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=()
ARGS=()
while (($#)); do
  case "$1" in
    --tiny) TINY=(--tiny); shift ;;
    --out | --budget-s | --models | --note)
      if (($# < 2)); then echo "gpu.sh: $1 needs a value" >&2; exit 2; fi
      ARGS+=("$1" "$2"); shift 2 ;;
    *) echo "gpu.sh: unknown option $1 (see the header of benchmarks/gpu.sh)" >&2; exit 2 ;;
  esac
done

# --- XLA GPU flags (unknown ones are dropped, never fatal) ------------------------------------------------------
FLAGS=(
  # Overlap asynchronous work (copies, collectives) with compute by scheduling for latency; the standard flag
  # of the JAX GPU performance guide. One GPU has no collectives, so it mostly costs nothing.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Matmuls through cuBLAS/cuBLASLt rather than Triton GEMM fusions: on Hopper the cuBLAS bf16 kernels are the
  # faster ones for the large, regular projections of a transformer (MaxText's GPU configs do the same).
  --xla_gpu_enable_triton_gemm=false
)
# Command buffers (CUDA graphs) are left at XLA's default; anything in LOPD_XLA_EXTRA is appended (e.g.
# --xla_gpu_autotune_level=0 for a faster, less tuned compile).
read -r -a EXTRA_FLAGS <<<"${LOPD_XLA_EXTRA:-}"
FLAGS+=("${EXTRA_FLAGS[@]}")

backend() { XLA_FLAGS="$1" timeout 120 python -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -n 1; }
BACKEND=$(backend "${FLAGS[*]}")
if [[ -z "$BACKEND" ]]; then
  KEPT=()
  for f in "${FLAGS[@]}"; do
    if [[ -n "$(backend "$f")" ]]; then KEPT+=("$f"); else echo "[gpu.sh] dropping XLA flag unknown to this jaxlib: $f"; fi
  done
  FLAGS=("${KEPT[@]}")
  BACKEND=$(backend "${FLAGS[*]}")
fi
if [[ "$BACKEND" != "gpu" && ${#TINY[@]} -eq 0 ]]; then
  echo "gpu.sh: JAX sees no GPU here (backend: ${BACKEND:-jax failed to start}); run with --tiny for the test-sized run" >&2
  exit 2
fi
export XLA_FLAGS="${XLA_FLAGS:-} ${FLAGS[*]}"
# No up-front grab of 75% of the GPU: the vLLM child process and torch share the card with JAX; the train-step
# memory budget is read from the allocator's limit, raised to 95% of the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
echo "[gpu.sh] backend $BACKEND; XLA_FLAGS=$XLA_FLAGS"

# Optional: matplotlib (the ratio PNG) from the wheels benchmarks/gpu_wheels.sh fetched beforehand into .whl/;
# installed into .whl/site with --no-index (nothing is downloaded, the image's packages are untouched). Not fatal.
if compgen -G ".whl/*.whl" >/dev/null && ! python -c "import matplotlib" 2>/dev/null; then
  if python -m pip install --quiet --no-index --no-deps --target .whl/site .whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/.whl/site"
  else
    echo "[gpu.sh] the wheels in .whl/ do not install here: no ratio PNG (the JSON and Markdown are complete)"
  fi
fi

python -m benchmarks.gpu_suite "${TINY[@]}" "${ARGS[@]}"
