"""Qwen3 dense and Qwen3-MoE in JAX / Flax NNX.

Shape vocabulary (used in einsum strings and names, e.g. ``x_BTD``):
  B batch, T time (query), S time (key/value), D embed, N q-heads, K kv-heads, G q-heads per kv-head,
  H head_dim, F mlp hidden, E experts, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

Params = dict[str, Any]


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
    # Runtime knobs.
    dtype: str = "float32"  # compute dtype of matmul operands ("bfloat16" on accelerators)
    param_dtype: str = "float32"  # storage dtype of the (master) weights
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
    attention: str = "xla"  # "xla" (every backend) | "cudnn" (fused, NVIDIA GPUs)
    scan_layers: bool = True

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i uses the sparse MoE block (transformers' rule)."""
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i))


class ParamSpec(NamedTuple):
    """One parameter described once: shape, logical axes (see sharding.py) and initializer kind."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" | "ones"


def param_specs(cfg: Qwen3Config) -> Params:
    """The parameter tree as ParamSpec leaves; init and shardings are both derived from it."""
    V, D, N, K, H, F = (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size)
    L, Ld, Lm = cfg.num_hidden_layers, len(cfg.dense_layers), len(cfg.moe_layers)
    E, Fm = cfg.num_experts, cfg.moe_intermediate_size
    specs: Params = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": {
            "attn_norm": ParamSpec((L, D), ("layers", None), "ones"),
            "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
            "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
            "q_norm": ParamSpec((L, H), ("layers", None), "ones"),
            "k_norm": ParamSpec((L, H), ("layers", None), "ones"),
            "mlp_norm": ParamSpec((L, D), ("layers", None), "ones"),
        },
        "final_norm": ParamSpec((D,), (None,), "ones"),
    }
    if Ld:
        specs["mlp"] = {
            "gate": ParamSpec((Ld, D, F), ("layers", "embed", "mlp"), "normal"),
            "up": ParamSpec((Ld, D, F), ("layers", "embed", "mlp"), "normal"),
            "down": ParamSpec((Ld, F, D), ("layers", "mlp", "embed"), "normal"),
        }
    if Lm:
        specs["moe"] = {
            "router": ParamSpec((Lm, D, E), ("layers", "embed", None), "normal"),
            "gate": ParamSpec((Lm, E, D, Fm), ("layers", "expert", "embed", "mlp"), "normal"),
            "up": ParamSpec((Lm, E, D, Fm), ("layers", "expert", "embed", "mlp"), "normal"),
            "down": ParamSpec((Lm, E, Fm, D), ("layers", "expert", "mlp", "embed"), "normal"),
        }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)
