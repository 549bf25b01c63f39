"""Compile targets of ``--plan --target NAME``: real accelerators' compilers on a machine without them.

A TPU target names a slice (``tpu-v5p-8``: v5p counts TensorCores, two per chip, so 4 chips; v5e/v6e count
chips). ``jax.experimental.topologies.get_topology_desc`` turns its topology into device objects backed by
libtpu's compiler (``pip install -e ".[tpu]"``), so ``jit(...).lower(...).compile()`` over a mesh of them runs
XLA:TPU itself and its ``memory_analysis()`` is the TPU's. No TPU is needed, and nothing runs.

The step-time figures are a ROOFLINE, not a measurement: XLA:TPU's whole-program ``optimal_seconds`` is not a
usable estimate (negative for a training step), so the time is max(FLOPs / peak, bytes / HBM bandwidth) per chip
against the chip's published dense bf16 peak and HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

TB = 1e12


class TargetError(ValueError):
    """An unknown target name, or a target whose compiler backend is not installed (exit 2, one line)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (vendor data sheets): dense bf16 FLOP/s, HBM bytes/s, HBM bytes."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1.2 * TB, 32e9),
    "v5e": Chip("TPU v5e", 197e12, 0.819 * TB, 16e9),
    "v5p": Chip("TPU v5p", 459e12, 2.765 * TB, 95e9),
    "v6e": Chip("TPU v6e", 918e12, 1.64 * TB, 32e9),
}

# Slice sizes by the name's count -> the topology libtpu accepts (chips as a 2D/3D grid). v4/v5p names count
# TensorCores (2 per chip) and have 3D tori; v5e/v6e names count chips on a 2D grid.
_GRIDS_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # the jax platform the step is compiled for
    topology: str  # libtpu's topology name, e.g. "v5p:2x2x1"
    chip: Chip

    @property
    def num_chips(self) -> int:
        return math.prod(int(n) for n in self.topology.split(":")[1].split("x"))


def _tpu_targets() -> dict[str, Target]:
    out = {}
    for gen, chip in CHIPS.items():
        grids = _GRIDS_3D if gen in ("v4", "v5p") else _GRIDS_2D
        for count, grid in grids.items():
            out[f"tpu-{gen}-{count}"] = Target(f"tpu-{gen}-{count}", "tpu", f"{gen}:{grid}", chip)
    return out


TARGETS: dict[str, Target] = _tpu_targets()


def get_target(name: str) -> Target:
    """The Target called ``name``; TargetError (naming the accepted names) when there is none."""
    if name in TARGETS:
        return TARGETS[name]
    families = sorted({n.rsplit("-", 1)[0] for n in TARGETS})
    sizes = {f: sorted(int(n.rsplit("-", 1)[1]) for n in TARGETS if n.startswith(f + "-")) for f in families}
    accepted = "; ".join(f"{f}-{{{','.join(map(str, s))}}}" for f, s in sizes.items())
    raise TargetError(f"--target {name!r}: unknown target; accepted: {accepted}")


def topology_devices(target: Target) -> list[Any]:
    """The target's devices (no hardware): libtpu's compiler behind ``get_topology_desc``."""
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(
            f"--target {target.name} compiles with XLA:TPU, which needs libtpu: pip install -e '.[tpu]' "
            "(libtpu 0.0.42.* pairs with jax 0.10.2)"
        )
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file meant for processes that own the chips; a compile-only topology owns
    # none, and without this a second plan (or a test beside one) aborts on the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu").devices)
    except Exception as e:  # libtpu rejects a topology (e.g. a slice size this version does not know)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"--target {target.name}: libtpu rejects topology {target.topology!r}: {first}") from None


# ----------------------------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------------------------


def recompute_flops_per_token(cfg: Any, seq_len: int) -> float:
    """FLOPs the remat policy adds per token: "full" reruns each decoder layer's forward in the backward
    (2 * P_layers + 2 * L * N * H * T), "dots" keeps the weight matmuls and reruns attention's (2 * L * N * H * T).
    """
    L, N, H = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    attention = 2.0 * L * N * H * seq_len
    if cfg.remat == "full":
        from benchmarks import common

        lm_head = cfg.vocab_size * cfg.hidden_size
        return 2.0 * (common.matmul_params(cfg) - lm_head) + attention
    return attention if cfg.remat == "dots" else 0.0


def hbm_bytes_per_chip(cfg: Any, rows: int, seq_len: int, grad_accum: int, num_chips: int, state_bytes: int) -> float:
    """A lower-bound HBM traffic model of one step on one chip (bytes), the roofline's memory side.

    Not XLA's "bytes accessed": its cost analysis counts each scanned body (layers, micro-batches) once, and
    the two loops nest, so no single factor rescales it. Per micro-batch, FSDP gathers every weight in the compute
    dtype and reads it three times (forward, remat forward, backward) and accumulates the fp32 gradient shard;
    per token and layer, the activations of each matmul are written and read back (x4: forward, recompute and a
    backward twice as wide); the fp32 logits of the chunked log-prob are written and read forward and backward;
    once per step the optimizer reads and writes the sharded state and reads the gradients.
    """
    from lopd_jax.models import presets

    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    act = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    mlp = cfg.num_experts_per_tok * cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
    heads = (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    tokens = rows * seq_len / num_chips
    weights = grad_accum * (3 * presets.param_count(cfg) * act + 2 * 4 * presets.param_count(cfg) / num_chips)
    activations = tokens * (L * 4 * (4 * D + heads + 3 * mlp) * act + 4 * 4 * V)
    optimizer = 2 * state_bytes + 4 * presets.param_count(cfg) / num_chips
    return weights + activations + optimizer


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A per-chip step-time ESTIMATE from FLOPs and bytes against published peaks (never a measurement)."""

    model_flops: float  # per chip: 6 * P_matmul * tokens + attention (the MFU numerator)
    hardware_flops: float  # per chip: model_flops + the remat recompute
    bytes_accessed: float  # per chip: hbm_bytes_per_chip (a traffic model)
    compute_seconds: float
    memory_seconds: float

    @property
    def step_seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    def mfu(self, chip: Chip) -> float:
        return self.model_flops / (self.step_seconds * chip.peak_flops)


def estimate(
    cfg: Any, rows: int, seq_len: int, grad_accum: int, num_chips: int, chip: Chip, state_bytes: int
) -> Roofline:
    """The roofline of one optimizer step of ``rows`` x ``seq_len`` tokens on ``num_chips`` chips.

    FLOPs come from the model formula (``benchmarks.common.train_flops_per_token``: 6 * P_matmul + causal
    attention, plus ``recompute_flops_per_token``), because XLA's cost analysis counts a scanned layer's body once;
    bytes from ``hbm_bytes_per_chip``. Perfect overlap of compute and memory is assumed: an estimate, not a bound
    a real step reaches.
    """
    from benchmarks import common

    tokens_per_chip = rows * seq_len / num_chips
    model = common.train_flops_per_token(cfg, seq_len) * tokens_per_chip
    hardware = model + recompute_flops_per_token(cfg, seq_len) * tokens_per_chip
    hbm = hbm_bytes_per_chip(cfg, rows, seq_len, grad_accum, num_chips, state_bytes)
    return Roofline(model, hardware, hbm, hardware / chip.peak_flops, hbm / chip.hbm_bandwidth)
