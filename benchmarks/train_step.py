"""Training-step throughput: tokens/s, model FLOPs per token, MFU, peak memory and compile time of the jitted OPD
update step (``update.make_update_step`` over ``losses.opd_loss``), on random weights and a synthetic batch."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lopd_jax import losses, update
from lopd_jax.models import presets, qwen3
from lopd_jax.models.qwen3 import Qwen3Config
from lopd_jax.plan import memory_figures

#: The GPU train table's one dtype policy, the same on every card (an 80 GB H100 and a 141 GB H200 alike): bf16
#: parameters and gradients, fp32 AdamW moments (12 bytes per parameter: the Qwen3-4B state is 48 GB, which leaves
#: an 80 GB card room for activations at T = 4096), bf16 matmul operands with fp32 accumulation, fp32 softmax
#: statistics and loss, full remat. A model whose state does not fit the card is skipped, not run in another dtype.
GPU_POLICY = (
    "bf16 params and grads, fp32 AdamW moments (12 bytes/param), bf16 matmuls with fp32 accumulation, "
    "fp32 softmax and loss, full remat"
)


def make_optimizer(cfg: Qwen3Config, lr: float = 1e-5):
    """The project's AdamW; with bf16 params its moments are stored in fp32 (optax would otherwise keep them in
    the params' dtype), which is GPU_POLICY."""
    optimizer = update.make_optimizer(update.OptimizerConfig(lr=lr))
    if np.dtype(cfg.param_dtype) == np.float32:
        return optimizer
    return update.store_state_in(optimizer, jnp.float32)


def make_state(cfg: Qwen3Config, seed: int = 0, lr: float = 1e-5) -> tuple[update.TrainState, Any]:
    """A fresh TrainState of random weights created on the default device, and its optimizer."""
    optimizer = make_optimizer(cfg, lr)
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    return update.init_train_state(params, optimizer, jax.random.key(seed + 1)), optimizer


def make_opd_step(cfg: Qwen3Config, optimizer, loss_cfg: losses.LossConfig | None = None):
    """The project's jitted update step on the OPD loss (the step every training mode runs)."""
    loss_fn = functools.partial(losses.opd_loss, cfg=cfg, loss_cfg=loss_cfg or losses.LossConfig())
    return update.make_update_step(loss_fn, optimizer)


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
    state, optimizer = make_state(cfg)
    batch = jax.device_put(common.synthetic_batch(cfg, batch_size, seq_len))
    compiled, compile_s, mem = precompiled or compile_step(make_opd_step(cfg, optimizer), state, batch)
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


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def largest_fitting_batch(
    cfg: Qwen3Config, seq_len: int, budget_bytes: int, start: int, max_attempts: int = 8
) -> tuple[int | None, tuple[Any, float, dict[str, int]] | None, list[dict[str, Any]]]:
    """Shrink the batch from ``start`` until XLA's compiled peak estimate fits ``budget_bytes``; no weights built.

    After a compile that does not fit, the next size is the smaller of half and the power of two that the measured
    per-row cost says fits (next_batch), so a bad first guess costs one compile, not log2(start). Compiles on
    abstract shapes (``jax.eval_shape``), so a size that does not fit never allocates. Returns
    (batch or None when even 1 does not fit, its (compiled, compile seconds, memory figures) to run on real
    arrays of the same shapes, the attempts with their estimates). At most ``max_attempts`` compiles."""
    optimizer = make_optimizer(cfg)
    abstract = jax.eval_shape(
        lambda k: update.init_train_state(qwen3.init_params(cfg, k), optimizer, k), jax.random.key(0)
    )
    step = make_opd_step(cfg, optimizer)
    tried, b = [], start
    while b >= 1 and len(tried) < max_attempts:  # each attempt is a full compile: on a GPU, tens of seconds
        batch = _abstract(common.synthetic_batch(cfg, b, seq_len))
        try:
            compiled, compile_s, mem = compile_step(step, abstract, batch)
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
