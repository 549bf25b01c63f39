"""Float64 references for identity tests: transformers' Qwen3 with its fp32 casts lifted, our trees by HF name."""

import types

import jax
import numpy as np
import torch

from lopd_jax.data.batch import Batch
from lopd_jax.models import hf


def _rms_norm64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rope64(self, x, position_ids):
    dim, theta = self.config.head_dim, self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = position_ids[..., None].to(torch.float64) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def float64_reference(model):
    """transformers' Qwen3 with its fp32 casts lifted (RMSNorm statistics, RoPE), on these instances only: the same
    formulas in float64. Fails loudly if transformers renames the modules (no silent fp32 reference)."""
    from transformers.models.qwen3 import modeling_qwen3 as mq

    lifted = {mq.Qwen3RMSNorm: _rms_norm64, mq.Qwen3RotaryEmbedding: _rope64}
    seen = set()
    for m in model.modules():
        if type(m) in lifted:
            m.forward = types.MethodType(lifted[type(m)], m)
            seen.add(type(m))
    assert seen == set(lifted), f"transformers' Qwen3 modules changed: lifted only {seen}"
    return model


def hf_named(tree, cfg) -> dict[str, np.ndarray]:
    """Our grads (or params) pytree as transformers' tensors, by name (the checkpoint mapping of models.hf)."""
    out = {}
    for group, name, _ in hf._leaves(cfg):
        leaf = np.asarray(tree[group][name] if group else tree[name])
        depth, rule = hf._stack_depth(group, name), hf._RULES[group, name]
        for idx in np.ndindex(*leaf.shape[:depth]):
            out[hf._hf_key(cfg, group, name, idx)] = np.asarray(rule.to_hf(leaf[idx], cfg))
    return out


def as_dtype(batch: Batch, dtype) -> Batch:
    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype.kind == "f" else x, batch)
