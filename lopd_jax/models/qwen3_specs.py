"""Qwen3's declaration: the config, and the params and KV cache described once as ``sharding.ParamSpec`` trees.

Initialisation (``qwen3.init_params`` / ``qwen3.init_cache``), checkpoint loading (``hf``), shardings
(``sharding.shardings``) and abstract shapes (``sharding.abstract_arrays``) are all derived from these trees, so a
shape or a logical axis is written in exactly one place. This module imports neither ``qwen3`` nor ``hf``: both
import it (``qwen3.load_hf`` delegates to ``hf``, which needs the config), so the dependencies point one way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax

from lopd_jax.config.schema import check_choices
from lopd_jax.parallel.sharding import ParamSpec as _ParamSpec

Params = dict[str, Any]
Dtype = Literal["float32", "bfloat16", "float16", "float64"]  # float64: exact-arithmetic tests
Remat = Literal["none", "full", "dots"]
# The trainer's choices (model.attention). "blockwise": attention_xla one block of queries at a time, rematerialised:
# exact, with a fused kernel's memory profile on any backend (what --plan compiles for cudnn / splash off their
# hardware).
Attention = Literal["auto", "xla", "cudnn", "splash", "blockwise"]
# The model's: also "ablated" (v passed through, no scores: NOT attention), which benchmarks.profile_step uses to
# measure attention's share of a step. Never a trainer choice.
AttentionImpl = Literal[Attention, "ablated"]
Matmuls = Literal["auto", "einsum", "flat"]
DecodeAttention = Literal["auto", "dot", "reduce"]
ATTENTION_IMPLS = ("xla", "cudnn", "splash")  # what "auto" resolves to, per backend: default_attention
# How the MoE block runs its grouped matmuls (models/grouped_matmul.py): "ragged_dot" (lax.ragged_dot, XLA:TPU's
# grouped GEMM), "triton" (Pallas-Triton kernels, NVIDIA GPUs), "padded" (tile-padded batched einsum, any backend),
# "scan" (a scan over experts: E times the FLOPs, a grouped GEMM's buffers; --plan's stand-in on XLA:CPU) or
# "auto" (the compile platform's choice, grouped_matmul.resolve_moe_impl; resolved at trace time).
MoeImpl = Literal["auto", "ragged_dot", "triton", "padded", "scan"]


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture (field names follow transformers' Qwen3Config / Qwen3MoeConfig) plus runtime knobs.

    Frozen and hashable so it passes through ``jit`` as a static argument.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # MoE (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Token ids (used by sampling / export, not by the math).
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Runtime knobs: their defaults live here only (the trainer's model section reads them from this class).
    dtype: Dtype = "float32"  # compute dtype of matmul operands ("bfloat16" on accelerators)
    param_dtype: Dtype = "float32"  # storage dtype of the (master) weights
    remat: Remat = "none"  # "full": save nothing; "dots": save the weight matmuls' outputs
    # "xla" (every backend) | "cudnn" (fused, NVIDIA GPUs) | "splash" (Pallas kernel, TPUs) | "auto" (the
    # backend's default, see default_attention; resolved when the config is made). The library default is "xla",
    # which needs no backend at construction; the trainer's model.attention defaults to "auto".
    attention: AttentionImpl = "xla"
    moe_impl: MoeImpl = "auto"
    # How the layers and matmuls are written. "auto" (the default) resolves at trace time from the
    # compile platform, so ``--plan --target`` sees the accelerator's forms. The layers' and matmuls' "auto" forms
    # keep the einsum + scan arithmetic on CPU (bit-identical training steps); "flat" attention projections and
    # the CPU's decode attention change the last bits.
    # True: lax.scan over the stacked layers (one compiled body: fast compiles, the accelerators' choice); False:
    # unrolled. "auto" = unrolled when compiling for CPU, where the scan's stacking of per-layer residuals and the
    # fixed layouts at the loop boundary cost ~25% of the update step (benchmarks/results/cpu_profile.txt).
    # Unrolling costs compile time in proportion to depth (28 layers: 11.1 s vs 2.6 s for the update step).
    scan_layers: bool | Literal["auto"] = "auto"
    # "einsum": one einsum over the named axes (e.g. BTD,DNH->BTNH); "flat": activations reshaped to 2-D
    # [B*T, in] @ weight [in, out] (the weights keep their layout). On XLA:CPU the backward of the einsum form
    # transposes every [B, T, F] cotangent before its weight-gradient dot; the 2-D form needs none. "auto" = flat
    # for the 2-D weights (MLP, lm_head) when compiling for CPU, where it is the einsum's own GEMM without the
    # transposes (bit-identical, most of the speed-up); "flat" also flattens the 3-D attention projections (their
    # weight gradients' last bits change, no measurable gain); einsum elsewhere.
    matmuls: Matmuls = "auto"
    # A one-token cached decode step's attention: "dot" (attention_xla's einsums) or "reduce" (broadcast multiply-
    # reduce fusions; XLA:CPU runs the dots' B*K matrix-vector products one small GEMM at a time). "auto" (the
    # default) = "reduce" when compiling for CPU (faster sampling; the sampled log-probs' last bits differ from
    # "dot"), else "dot".
    decode_attention: DecodeAttention = "auto"
    # Run Pallas kernels (splash, moe_impl="triton") in interpret mode: CPU tests of the TPU / GPU kernels.
    pallas_interpret: bool = False

    def __post_init__(self) -> None:
        # Lists from JSON/YAML become tuples so the config stays hashable (a static jit argument).
        for name in ("mlp_only_layers", "eos_token_id"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_choices(self)
        if self.attention == "auto":
            object.__setattr__(self, "attention", default_attention(jax.default_backend()))
        if self.scan_layers not in (True, False, "auto"):
            raise ValueError(f"Qwen3Config.scan_layers must be true, false or 'auto', got {self.scan_layers!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim={self.head_dim}: RoPE needs an even head_dim")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"Qwen3Config.num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}]"
            )

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i uses the sparse MoE block (transformers' rule)."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i))


def default_attention(platform: str) -> str:
    """The attention "auto" resolves to on ``platform`` (a jax backend name): splash on TPU, else xla.

    Not cudnn on GPU: it needs bf16/fp16 operands, and an fp32 run must not fail for a default it never chose.
    """
    return "splash" if platform == "tpu" else "xla"


def param_specs(cfg: Qwen3Config) -> Params:
    """The parameter tree as ParamSpec leaves (dtype ``cfg.param_dtype``); init, loading and shardings are all
    derived from it."""
    V, D, N, K, H, F = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    L, Ld, Lm = cfg.num_hidden_layers, len(cfg.dense_layers), len(cfg.moe_layers)
    E, Fm = cfg.num_experts, cfg.moe_intermediate_size
    spec = functools.partial(_ParamSpec, dtype=cfg.param_dtype)
    specs: Params = {
        "embed": spec((V, D), ("vocab", "embed"), "normal"),
        "layers": {
            "attn_norm": spec((L, D), ("layers", None), "ones"),
            "q": spec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
            "k": spec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "v": spec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "o": spec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
            "q_norm": spec((L, H), ("layers", None), "ones"),
            "k_norm": spec((L, H), ("layers", None), "ones"),
            "mlp_norm": spec((L, D), ("layers", None), "ones"),
        },
        "final_norm": spec((D,), (None,), "ones"),
    }
    if Ld:
        specs["mlp"] = {
            "gate": spec((Ld, D, F), ("layers", "embed", "mlp"), "normal"),
            "up": spec((Ld, D, F), ("layers", "embed", "mlp"), "normal"),
            "down": spec((Ld, F, D), ("layers", "mlp", "embed"), "normal"),
        }
    if Lm:
        specs["moe"] = {
            "router": spec((Lm, D, E), ("layers", "embed", None), "normal"),
            "gate": spec((Lm, E, D, Fm), ("layers", "expert", "expert_embed", "mlp"), "normal"),
            "up": spec((Lm, E, D, Fm), ("layers", "expert", "expert_embed", "mlp"), "normal"),
            "down": spec((Lm, E, Fm, D), ("layers", "expert", "mlp", "expert_embed"), "normal"),
        }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = spec((D, V), ("embed", "vocab"), "normal")
    return specs


def cache_specs(cfg: Qwen3Config, batch: int, length: int, dtype: str | None = None) -> Params:
    """The KV cache as ParamSpec leaves: ``k`` / ``v`` [L, B, K, S, H] (dtype ``dtype`` or ``cfg.dtype``, zeros)
    and ``lengths`` [B] int32 (tokens already cached per row).

    K before S so each decode step reads the cache in the layout attention consumes it (no transposes). The
    sampler shards it with these axes; ``qwen3.init_cache`` allocates it.
    """
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
    axes = ("layers", "batch", "kv_heads", "seq", "head_dim")
    kv = _ParamSpec(shape, axes, "zeros", dtype or cfg.dtype)
    return {"k": kv, "v": kv, "lengths": _ParamSpec((batch,), ("batch",), "zeros", "int32")}
