"""Architecture presets for the published Qwen3 sizes (numbers from each model's released config.json).

A preset plans shapes, memory and throughput without weights; load real weights with ``qwen3.load_hf``.
Shared by every size: vocab 151936, head_dim 128, rms_norm_eps 1e-6, rope_theta 1e6, max_position_embeddings
40960, bos 151643, eos 151645 (the post-trained releases; the -Base releases end with 151643).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from lopd_jax.models.qwen3_specs import Qwen3Config, param_specs
from lopd_jax.parallel.sharding import is_param_spec

_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    bos_token_id=151643,
    eos_token_id=151645,
)


def _dense(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
        **_COMMON,
    )


PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, 8, tie=True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, 8, tie=True),
    "qwen3-4b": _dense(2560, 9728, 36, 32, 8, tie=True),
    "qwen3-8b": _dense(4096, 12288, 36, 32, 8, tie=False),
    "qwen3-14b": _dense(5120, 17408, 40, 40, 8, tie=False),
    "qwen3-32b": _dense(5120, 25600, 64, 64, 8, tie=False),
    "qwen3-30b-a3b": dataclasses.replace(
        _dense(2048, 6144, 48, 32, 4, tie=False),
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=(),
    ),
}


def _normalise(name: str) -> str:
    key = name.strip().lower()
    key = key.split("/")[-1]  # accept hub ids like "Qwen/Qwen3-8B"
    return key.replace("_", "-")


def get_preset(name: str, **overrides) -> Qwen3Config:
    """The preset for ``name`` ("Qwen3-8B", "qwen3_30b_a3b", "Qwen/Qwen3-0.6B", ...), fields overridable.

    Runtime knobs are the usual overrides, e.g. ``get_preset("qwen3-8b", dtype="bfloat16", remat="full")``.
    """
    key = _normalise(name)
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[key], **overrides)


def _sizes(cfg: Qwen3Config) -> dict[str, int]:
    leaves = jax.tree_util.tree_leaves_with_path(param_specs(cfg), is_leaf=is_param_spec)
    return {jax.tree_util.keystr(path): math.prod(spec.shape) for path, spec in leaves}


def param_count(cfg: Qwen3Config, *, embeddings: bool = True) -> int:
    """Number of parameters (a tied lm_head counted once); ``embeddings=False`` drops embed and lm_head."""
    sizes = _sizes(cfg)
    if not embeddings:
        sizes = {k: v for k, v in sizes.items() if k not in ("['embed']", "['lm_head']")}
    return sum(sizes.values())


def active_param_count(cfg: Qwen3Config) -> int:
    """Parameters used per token: only ``num_experts_per_tok`` of the ``num_experts`` experts count."""
    total = param_count(cfg)
    if not cfg.num_experts:
        return total
    sizes = _sizes(cfg)
    expert = sum(sizes[f"['moe']['{w}']"] for w in ("gate", "up", "down"))
    return total - expert + expert * cfg.num_experts_per_tok // cfg.num_experts


def matmul_params(cfg: Qwen3Config) -> int:
    """Weights that multiply every token: the per-token active parameters minus the embedding table (a lookup,
    no FLOPs) and norms, plus the lm_head ([D, V], counted even when tied: its matmul runs either way)."""
    active = active_param_count(cfg)
    norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
    embed = cfg.vocab_size * cfg.hidden_size
    tied_head = embed if cfg.tie_word_embeddings else 0  # an untied lm_head is already in ``active``
    return active - norms - embed + tied_head


def train_flops_per_token(cfg: Qwen3Config, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), the MFU numerator (PaLM appendix B, causal):

        6 * P_matmul  +  6 * L * N * H * T

    P_matmul = matmul_params(cfg): 2 FLOPs per weight per token forward, 4 backward. Attention: per layer and
    token, QK^T and PV cost 2 * N * H * (context) each forward; a causal row of T tokens has T/2 context on
    average, so forward 2 * N * H * T per layer and token, x3 with the backward. Rematerialisation is not counted
    (that would be hardware FLOPs, not model FLOPs); rows here hold one sequence of T tokens, so the causal T is
    the true context (packing would make it an upper bound).
    """
    L, N, H = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    return 6.0 * matmul_params(cfg) + 6.0 * L * N * H * seq_len


def forward_flops_per_token(cfg: Qwen3Config, seq_len: int) -> float:
    """Inference (scoring) FLOPs of one token: a third of the training figure, 2 * P_matmul + 2 * L * N * H * T."""
    return train_flops_per_token(cfg, seq_len) / 3.0
