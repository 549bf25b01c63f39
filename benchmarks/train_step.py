"""Training-step throughput: tokens/s, model FLOPs per token, MFU, peak memory and compile time of the trainer's own
jitted update step (``lopd_jax.training.step.build``: ``update.make_update_step`` over ``losses.opd_loss``) on a
one-device
mesh, on random weights and a synthetic batch."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common
from lopd_jax import losses, update
from lopd_jax.data.batch import Batch
from lopd_jax.models import presets, qwen3
from lopd_jax.models.qwen3 import Qwen3Config
from lopd_jax.parallel import sharding
from lopd_jax.parallel.sharding import MeshConfig
from lopd_jax.plan.planner import memory_figures
from lopd_jax.training import step as step_lib

#: The GPU train table's one dtype policy, the same on every card (an 80 GB H100 and a 141 GB H200 alike): bf16
#: parameters and gradients, fp32 AdamW moments (12 bytes per parameter: the Qwen3-4B state is 48 GB, which leaves
#: an 80 GB card room for activations at T = 4096), bf16 matmul operands with fp32 accumulation, fp32 softmax
#: statistics and loss, full remat. A model whose state does not fit the card is skipped, not run in another dtype.
GPU_POLICY = (
    "bf16 params and grads, fp32 AdamW moments (12 bytes/param), bf16 matmuls with fp32 accumulation, "
    "fp32 softmax and loss, full remat"
)


def optimizer_config(lr: float = 1e-5) -> update.OptimizerConfig:
    """The benchmarked step's AdamW: the project's, with the moments stored in fp32 even for bf16 params."""
    return update.OptimizerConfig(lr=lr, moments_dtype="float32")


def make_optimizer(cfg: Qwen3Config, lr: float = 1e-5):
    """The benchmarked step's optimizer (GPU_POLICY: fp32 moments)."""
    return update.make_optimizer(optimizer_config(lr))


def build_step(cfg: Qwen3Config, loss_cfg: losses.LossConfig | None = None, lr: float = 1e-5) -> step_lib.TrainStep:
    """The trainer's own step (``lopd_jax.training.step``) for model ``cfg`` on a one-device mesh: mode lightning_opd
    (the
    OPD loss every OPD mode trains), one micro-batch per step."""
    mesh_cfg = MeshConfig()
    setup = step_lib.StepSetup(cfg, sharding.make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.logical_rules())
    loss = loss_cfg or losses.LossConfig()
    return step_lib.build(setup, mode="lightning_opd", optimizer=optimizer_config(lr), loss=loss)


def make_state(built: step_lib.TrainStep, cfg: Qwen3Config, seed: int = 0) -> update.TrainState:
    """A fresh TrainState of random weights on the step's shardings."""
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    return built.init_state(params, seed + 1)


def place_batch(built: step_lib.TrainStep, batch: Batch) -> Batch:
    """A host Batch on the step's batch sharding."""
    return jax.device_put(batch, built.batch_sharding)


def compile_step(step, state, batch) -> tuple[Any, float, dict[str, int]]:
    """(compiled executable, compile seconds (trace + lower + compile), XLA memory figures)."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start, memory_figures(compiled)


def run_steps(compiled, state, batch, n: int) -> tuple[Any, list[float]]:
    """Run ``n`` steps, each timed to completion; returns the final state and the per-step seconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["train/loss"])
        times.append(time.perf_counter() - start)
    return state, times


def bench_train_step(
    name: str,
    cfg: Qwen3Config,
    batch_size: int,
    seq_len: int,
    steps: int,
    peak_flops: float,
    precompiled: tuple[Any, float, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """One model shape: compile (or reuse ``precompiled`` from largest_fitting_batch), one warm-up step, then
    ``steps`` timed steps.

    Returns a JSON-able dict: shapes, params, FLOPs/token (common.train_flops_per_token), step time spread,
    tokens/s and MFU at the median step, compile seconds and peak memory (the allocator's peak on an accelerator,
    XLA's compiled buffer estimate everywhere)."""
    built = build_step(cfg)
    state = make_state(built, cfg)
    batch = place_batch(built, common.synthetic_batch(cfg, batch_size, seq_len))
    compiled, compile_s, mem = precompiled or compile_step(built.step, state, batch)
    state, warm = run_steps(compiled, state, batch, 1)
    state, times = run_steps(compiled, state, batch, steps)
    tokens = batch_size * seq_len
    flops_tok = common.train_flops_per_token(cfg, seq_len)
    median = float(np.median(times))
    device = jax.devices()[0]
    measured_peak = common.device_peak_memory(device)
    return {
        "name": name,
        "model": _shape(cfg),
        "params": presets.param_count(cfg),
        "matmul_params": common.matmul_params(cfg),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "step_s": common.spread(times),
        "first_step_s": warm[0],
        "tokens_per_s": tokens / median,
        "flops_per_token": flops_tok,
        "model_tflops_per_s": flops_tok * tokens / median / 1e12,
        "mfu": flops_tok * tokens / median / peak_flops,
        "compile_s": compile_s,
        "peak_bytes": measured_peak if measured_peak is not None else mem["peak"],
        "peak_bytes_source": "device memory_stats peak_bytes_in_use" if measured_peak else "XLA memory_analysis",
        "xla_memory": mem,
    }


def _shape(cfg: Qwen3Config) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "dtype",
        "param_dtype",
        "remat",
        "attention",
    )
    d = dataclasses.asdict(cfg)
    return {k: d[k] for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# Accelerators: the largest batch that fits
# ----------------------------------------------------------------------------------------------------------------


def state_bytes(cfg: Qwen3Config) -> int:
    """Params and one gradient copy in the params' dtype, the two AdamW moments in fp32 (make_optimizer)."""
    return (2 * np.dtype(cfg.param_dtype).itemsize + 2 * 4) * presets.param_count(cfg)


def row_activation_bytes(cfg: Qwen3Config, seq_len: int) -> int:
    """A rough per-row activation estimate of the remat'd step (a first guess, verified by compiling): the saved
    layer inputs, one layer's recomputed attention scores and MLP, and one logits chunk (fp32, x3 for backward)."""
    T, D, F, L = seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    item = np.dtype(cfg.dtype).itemsize
    saved = L * T * D * item
    # The XLA path materialises fp32 [N, T, T] scores (x3 with the backward); the fused cuDNN kernel never does.
    scores = 3 * cfg.num_attention_heads * T * T * 4 if cfg.attention == "xla" else 0
    layer = scores + 4 * T * F * item + 12 * T * D * item
    chunk = min(T, losses.DEFAULT_CHUNK_SIZE)
    logits = 3 * chunk * cfg.vocab_size * 4
    return saved + layer + logits


def first_guess_batch(cfg: Qwen3Config, seq_len: int, budget_bytes: int, cap: int = 64) -> int:
    """The largest power of two <= cap whose estimated memory fits the budget (at least 1)."""
    free = budget_bytes - state_bytes(cfg)
    rows = max(1, int(free / (1.25 * row_activation_bytes(cfg, seq_len))))
    return min(cap, 1 << (rows.bit_length() - 1))


def largest_fitting_batch(
    cfg: Qwen3Config, seq_len: int, budget_bytes: int, start: int, max_attempts: int = 8
) -> tuple[int | None, tuple[Any, float, dict[str, int]] | None, list[dict[str, Any]]]:
    """Shrink the batch from ``start`` until XLA's compiled peak estimate fits ``budget_bytes``; no weights built.

    After a compile that does not fit, the next size is the smaller of half and the power of two that the measured
    per-row cost says fits (next_batch), so a bad first guess costs one compile, not log2(start). Compiles on
    abstract shapes (``jax.eval_shape``), so a size that does not fit never allocates. Returns
    (batch or None when even 1 does not fit, its (compiled, compile seconds, memory figures) to run on real
    arrays of the same shapes, the attempts with their estimates). At most ``max_attempts`` compiles."""
    built = build_step(cfg)
    tried, b = [], start
    while b >= 1 and len(tried) < max_attempts:  # each attempt is a full compile: on a GPU, tens of seconds
        try:
            compiled, compile_s, mem = compile_step(built.step, built.abstract_state, built.abstract_batch(b, seq_len))
            tried.append({"batch_size": b, "xla_peak_bytes": mem["peak"], "compile_s": compile_s})
            if mem["peak"] <= budget_bytes:
                return b, (compiled, compile_s, mem), tried
            b = next_batch(b, mem["peak"], state_bytes(cfg), budget_bytes)
        except Exception as e:  # some backends refuse, at compile time, buffers larger than the device
            tried.append({"batch_size": b, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            b //= 2
    return None, None, tried


def next_batch(batch: int, peak_bytes: int, fixed_bytes: int, budget_bytes: int) -> int:
    """The next batch to try after ``batch`` rows compiled to ``peak_bytes``: at most half, and the largest power
    of two whose rows fit beside ``fixed_bytes`` (the train state) at the measured per-row cost; 0 when none can."""
    per_row = max(peak_bytes - fixed_bytes, 1) / batch
    rows = int((budget_bytes - fixed_bytes) / per_row)
    fit = 1 << (rows.bit_length() - 1) if rows >= 1 else 0
    return min(batch // 2, fit)
