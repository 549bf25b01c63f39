"""The Qwen3 / Qwen3-MoE cases checked against transformers (tests/unit/test_qwen3.py, test_grouped_matmul.py); the
``tmp_root`` fixture their checkpoints go under lives in tests/unit/conftest.py."""

import functools

import numpy as np
import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from lopd_jax.models import qwen3

# Larger than transformers' default init (0.02) so attention is far from uniform and RoPE, masks and routing
# matter: a bug then moves the logits by much more than the 1e-4 tolerance.
_BASE = dict(
    vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    rope_theta=10_000.0, initializer_range=0.1, rms_norm_eps=1e-6,
)  # fmt: skip
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)

CASES = {
    # head_dim 16 != hidden/heads = 8; a single kv head; tied embeddings
    "dense_tied_mqa": (HFQwen3Config, dict(_BASE, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "dense_untied_gqa": (HFQwen3Config, dict(_BASE, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)),
    "moe_norm_topk": (Qwen3MoeConfig, dict(_BASE, **_MOE, num_key_value_heads=2, head_dim=8, norm_topk_prob=True)),
    # decoder_sparse_step=2: layer 0 dense, layer 1 MoE
    "moe_no_norm_sparse_step": (
        Qwen3MoeConfig,
        dict(_BASE, **_MOE, num_key_value_heads=2, head_dim=8, norm_topk_prob=False, decoder_sparse_step=2),
    ),
    # mlp_only_layers=[1]: MoE, dense, MoE -> three scanned runs
    "moe_mlp_only_layers": (
        Qwen3MoeConfig,
        dict(_BASE, **_MOE, num_key_value_heads=2, head_dim=8, num_hidden_layers=3, mlp_only_layers=[1]),
    ),
}


@functools.cache
def hf_model(case: str, tmp_root: str):
    """(torch model, our cfg, our params) for a case; the checkpoint goes through save_pretrained/load_hf."""
    config_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    model_cls = Qwen3MoeForCausalLM if config_cls is Qwen3MoeConfig else Qwen3ForCausalLM
    model = model_cls(config_cls(**kwargs)).eval()
    path = f"{tmp_root}/{case}"
    model.save_pretrained(path)
    cfg, params = qwen3.load_hf(path)
    return model, cfg, params


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def random_tokens(shape, seed=0, vocab=160):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)
