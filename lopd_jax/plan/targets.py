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

from lopd_jax.models import presets

TB = 1e12


class TargetError(ValueError):
    """An unknown target name, or a target whose compiler backend is not installed (exit 2, one line)."""


# ----------------------------------------------------------------------------------------------------------------
# Peak dense bf16 FLOP/s and memory bandwidth per device kind, from the vendors' figures (no 2:4 sparsity: NVIDIA's
# data sheets print the sparse figure, twice the dense one). Matched as a case-insensitive substring of
# ``jax.Device.device_kind``, first match wins, so the specific names ("H100 PCIe", "H100 NVL") precede "H100".
# Where each figure was checked (via the search tool, 2026-12):
#   H100 SXM 989 / 3.35 TB/s, H100 PCIe 756 / 2.0 TB/s: NVIDIA H100 data sheet, SXM and PCIe columns (1,979 and
#     1,513 TFLOPS "shown with sparsity", 3,350 and 2,000 GB/s), as reproduced at archive-lib.hpctech.co.jp/
#     gpuproduct/nvidia-h100.html; 989.4 dense also at glennklockwood.com/garden/processors/h100.
#   H100 NVL 835 / 3.9 TB/s: NVIDIA H100 data sheet, NVL column (1,671 TFLOPS with sparsity, 3.9 TB/s); the corpus
#     held only secondary copies (3.93 TB/s: grokipedia.com/page/210100120).
#   H200 989 / 4.8 TB/s: same GH100 tensor cores as the H100 SXM, HBM3e (itkb.uw.cz/2026/06/nvidia-h200-vs-b300-
#     precisions-cores.html: "FP16 / BF16 (dense) ~989 TFLOPS", 4.8 TB/s). H200 NVL: 1,671 sparse -> 835 dense, 4.8
#     TB/s (NVIDIA H200 page; not found in the corpus, kept so that an NVL card is not credited 989).
#   A100 312 (all variants); 2.039 TB/s 80GB SXM, 1.935 80GB PCIe, 1.555 40GB: NVIDIA A100 data sheet as cited at
#     glennklockwood.com/garden/processors/A100 and thundercompute.com/blog/nvidia-a100-specs-full-guide.
#   TPU v4 275 / 1.2 TB/s: docs.cloud.google.com/tpu/docs/v4 ("275 teraflops (bf16 or int8)", "1200 GBps").
#   TPU v5e 197 / 0.819 TB/s: docs.cloud.google.com/tpu/docs/v5e ("197 TFLOPs", "819 GBps").
#   TPU v5p 459 / 2.765 TB/s: cloud.google.com/tpu/docs/v5p-training ("459 TFLOPs", "2765 GBps").
#   TPU v6e 918 / 1.638 TB/s: docs.cloud.google.com/tpu/docs/v6e ("918 TFLOPs", "1638 GBps").
# jax names v5e "TPU v5 lite", v5p "TPU v5" (or "TPU v5p"), v6e "TPU v6 lite".
# ----------------------------------------------------------------------------------------------------------------
PEAKS: tuple[tuple[str, float, float], ...] = (  # (device_kind substring, dense bf16 FLOP/s, HBM bytes/s)
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12, 4.8e12),
    ("H200", 989e12, 4.8e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),  # the 40 GB parts
    ("TPU v5 lite", 197e12, 0.819e12),
    ("TPU v5e", 197e12, 0.819e12),
    ("TPU v5p", 459e12, 2.765e12),
    ("TPU v5", 459e12, 2.765e12),
    ("TPU v6 lite", 918e12, 1.638e12),
    ("TPU v6e", 918e12, 1.638e12),
    ("TPU v4", 275e12, 1.2e12),
)


def peak_of(device_kind: str) -> tuple[float, float] | None:
    """(dense bf16 FLOP/s, HBM bytes/s) of a ``jax.Device.device_kind`` from PEAKS (first substring match)."""
    kind = device_kind.lower()
    return next(((f, bw) for key, f, bw in PEAKS if key.lower() in kind), None)


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (vendor data sheets): dense bf16 FLOP/s, HBM bytes/s, HBM bytes."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float


def _chip(kind: str, hbm_bytes: float) -> Chip:
    return Chip(kind, *peak_of(kind), hbm_bytes)


CHIPS = {
    "v4": _chip("TPU v4", 32e9),
    "v5e": _chip("TPU v5e", 16e9),
    "v5p": _chip("TPU v5p", 95e9),
    "v6e": _chip("TPU v6e", 32e9),
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

    @property
    def grid(self) -> str:
        return self.topology.split(":")[1]


def _tpu_targets() -> dict[str, Target]:
    out = {}
    for gen, chip in CHIPS.items():
        grids = _GRIDS_3D if gen in ("v4", "v5p") else _GRIDS_2D
        for count, grid in grids.items():
            out[f"tpu-{gen}-{count}"] = Target(f"tpu-{gen}-{count}", "tpu", f"{gen}:{grid}", chip)
    return out


# NVIDIA GPUs: dense bf16 peak and HBM from the data sheets (SXM parts); the per-GPU memory is what CUDA reports
# (XLA's gpu_specs/h100_sxm.txtpb for the H100; the H200's 141 GB likewise less the driver's reserve).
GPU_CHIPS = {
    "h100": _chip("NVIDIA H100 80GB HBM3", 84_978_434_048),
    "h200": _chip("NVIDIA H200", 150_754_820_096),
}


def _gpu_targets() -> dict[str, Target]:
    """``h100`` / ``h200``: one node of 8; ``h100-16`` etc.: whole nodes (topology slices x hosts x GPUs)."""
    out = {}
    for gen, chip in GPU_CHIPS.items():
        for gpus in (8, 16, 32, 64):
            name = gen if gpus == 8 else f"{gen}-{gpus}"
            out[name] = Target(name, "gpu", f"{gen}:1x{gpus // 8}x8", chip)
    return out


TARGETS: dict[str, Target] = {**_tpu_targets(), **_gpu_targets()}


def gpu_target_config(chip: Chip) -> str:
    """XLA's GpuTargetConfigProto (text) for an SXM Hopper: the device description a deviceless compile needs.

    Fields as XLA's own gpu_specs/h100_sxm.txtpb; the H200 differs in memory size and bandwidth only.
    """
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {int(chip.hbm_bytes)} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{chip.name}"
"""


def get_target(name: str) -> Target:
    """The Target called ``name``; TargetError (naming the accepted names) when there is none."""
    if name in TARGETS:
        return TARGETS[name]
    families = sorted({n.rsplit("-", 1)[0] for n in TARGETS})
    sizes = {f: sorted(int(n.rsplit("-", 1)[1]) for n in TARGETS if n.startswith(f + "-")) for f in families}
    accepted = "; ".join(f"{f}-{{{','.join(map(str, s))}}}" for f, s in sizes.items())
    raise TargetError(f"--target {name!r}: unknown target; accepted: {accepted}")


def topology_devices(target: Target) -> list[Any]:
    """The target's devices (no hardware): libtpu's or the CUDA plugin's compiler behind ``get_topology_desc``."""
    if target.platform == "tpu":
        return _tpu_devices(target)
    return _gpu_devices(target)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def installed(module: str) -> bool:
    """Whether ``module`` (dotted) can be imported, without importing it (a missing parent is False too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


CUDA_PLUGIN = "jax_plugins.xla_cuda12"


def _tpu_devices(target: Target) -> list[Any]:
    if not installed("libtpu"):
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
        raise TargetError(
            f"--target {target.name}: libtpu rejects topology {target.topology!r}: {_first_line(e)}"
        ) from None


def _gpu_devices(target: Target) -> list[Any]:
    if not installed(CUDA_PLUGIN):
        raise TargetError(
            f"--target {target.name} compiles with XLA:GPU, which needs the CUDA plugin (no GPU needed): "
            "pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 (the version of jax; "
            "attention=cudnn also needs nvidia-cudnn-cu12>=9.8,<10)"
        )
    from jax.experimental import topologies

    config = gpu_target_config(target.chip)
    try:
        desc = topologies.get_topology_desc(target.grid, "cuda", target_config=config, topology=target.grid)
    except Exception as e:
        raise TargetError(
            f"--target {target.name}: the CUDA plugin rejects {target.grid!r}: {_first_line(e)}"
        ) from None
    return list(desc.devices)


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
        lm_head = cfg.vocab_size * cfg.hidden_size
        return 2.0 * (presets.matmul_params(cfg) - lm_head) + attention
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

    FLOPs come from the model formula (``presets.train_flops_per_token``: 6 * P_matmul + causal
    attention, plus ``recompute_flops_per_token``), because XLA's cost analysis counts a scanned layer's body once;
    bytes from ``hbm_bytes_per_chip``. Perfect overlap of compute and memory is assumed: an estimate, not a bound
    a real step reaches.
    """
    tokens_per_chip = rows * seq_len / num_chips
    model = presets.train_flops_per_token(cfg, seq_len) * tokens_per_chip
    hardware = model + recompute_flops_per_token(cfg, seq_len) * tokens_per_chip
    hbm = hbm_bytes_per_chip(cfg, rows, seq_len, grad_accum, num_chips, state_bytes)
    return Roofline(model, hardware, hbm, hardware / chip.peak_flops, hbm / chip.hbm_bandwidth)
