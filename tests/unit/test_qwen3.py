"""Qwen3 / Qwen3-MoE forward against transformers (the reference), packing, KV cache, init, remat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.qwen3 import CASES, hf_model, random_tokens, torch_logits

from lopd_jax.models import qwen3

_forward = jax.jit(qwen3.forward, static_argnames=("cfg", "return_hidden"))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_root):
    model, cfg, params = hf_model(case, tmp_root)
    tokens = random_tokens((2, 13))
    ref = torch_logits(model, tokens)
    out = np.asarray(_forward(params, tokens, cfg=cfg))
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_config_fields_read(tmp_root):
    _, cfg, params = hf_model("moe_mlp_only_layers", tmp_root)
    assert cfg.moe_layers == (0, 2) and cfg.dense_layers == (1,)
    assert params["moe"]["gate"].shape == (2, 8, 32, 16) and params["mlp"]["gate"].shape == (1, 32, 48)
    assert qwen3.layer_runs(cfg) == [("moe", 0, 1, 0), ("mlp", 1, 2, 0), ("moe", 2, 3, 1)]
    _, cfg, _ = hf_model("dense_tied_mqa", tmp_root)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (16, 1, True)


def test_moe_uses_grouped_matmul(tmp_root):
    _, cfg, params = hf_model("moe_norm_topk", tmp_root)
    cfg = dataclasses.replace(cfg, scan_layers=True, moe_impl="ragged_dot")  # "auto": unrolled, padded on CPU
    jaxpr = str(jax.make_jaxpr(functools.partial(qwen3.forward, cfg=cfg))(params, random_tokens((1, 4))))
    assert jaxpr.count("= ragged_dot_general[") == 3  # gate, up, down inside the one scanned layer body


def test_return_hidden_is_pre_lm_head(tmp_root):
    model, cfg, params = hf_model("dense_untied_gqa", tmp_root)
    tokens = random_tokens((2, 7))
    hidden = _forward(params, tokens, cfg=cfg, return_hidden=True)
    with torch.no_grad():
        ref = model.model(torch.as_tensor(tokens, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), ref, atol=1e-5, rtol=0)


def _pack(seqs, T):
    """Concatenate sequences into one row of length T; segment ids 1..k, 0 = padding."""
    tokens, segs = np.zeros(T, np.int32), np.zeros(T, np.int32)
    pos = 0
    for k, s in enumerate(seqs, 1):
        tokens[pos : pos + len(s)], segs[pos : pos + len(s)] = s, k
        pos += len(s)
    return tokens, segs


@pytest.mark.parametrize("case", ["dense_untied_gqa", "moe_norm_topk"])
def test_packed_segments_equal_separate_sequences(case, tmp_root):
    model, cfg, params = hf_model(case, tmp_root)
    rows = [[random_tokens(5, 1), random_tokens(4, 2), random_tokens(6, 3)], [random_tokens(9, 4), random_tokens(3, 5)]]
    packed = [_pack(r, 16) for r in rows]
    tokens = np.stack([p[0] for p in packed])
    segs = np.stack([p[1] for p in packed])
    out = np.asarray(_forward(params, tokens, cfg=cfg, segment_ids=segs))  # positions derived from segments
    explicit = qwen3.segment_positions(jnp.asarray(segs))
    out_explicit = np.asarray(_forward(params, tokens, cfg=cfg, segment_ids=segs, positions=explicit))
    np.testing.assert_array_equal(out, out_explicit)
    for b, row in enumerate(rows):
        pos = 0
        for s in row:
            ref = torch_logits(model, s[None])[0]
            np.testing.assert_allclose(out[b, pos : pos + len(s)], ref, atol=1e-4, rtol=0)
            pos += len(s)


def test_segment_positions_restart():
    segs = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(qwen3.segment_positions(segs), [[0, 1, 2, 0, 1, 0, 0, 1]])


_cached = jax.jit(qwen3.forward_cached, static_argnames=("cfg", "return_hidden"))


# "auto" on CPU: the unrolled stack, in-place cache writes, multiply-reduce decode attention
@pytest.mark.parametrize("scan", [True, "auto"])
@pytest.mark.parametrize("case", ["dense_untied_gqa", pytest.param("moe_mlp_only_layers", marks=pytest.mark.slow)])
def test_kv_cache_prefill_and_decode_match_full_forward(case, scan, tmp_root):
    model, cfg, params = hf_model(case, tmp_root)
    cfg = dataclasses.replace(cfg, scan_layers=scan, decode_attention="dot" if scan is True else "auto")
    max_len = 10
    prompts = [random_tokens(3, 11), random_tokens(6, 12)]
    seqs = [list(p) for p in prompts]
    tokens = np.zeros((2, 6), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    cache = qwen3.init_cache(cfg, 2, max_len)
    logits, cache = _cached(params, tokens, cache, cfg=cfg, num_new=jnp.array([3, 6]))
    np.testing.assert_array_equal(cache["lengths"], [3, 6])
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b, : len(p)], torch_logits(model, p[None])[0], atol=1e-4, rtol=0)
    for step in range(4):  # row 1 reaches max_len exactly
        new = random_tokens((2, 1), 20 + step)
        logits, cache = _cached(params, new, cache, cfg=cfg)
        for b in range(2):
            seqs[b].append(int(new[b, 0]))
            ref = torch_logits(model, np.array(seqs[b])[None])[0, -1]
            np.testing.assert_allclose(logits[b, 0], ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache["lengths"], [7, 10])
    # Row 1 is full; its padded tokens must be dropped, not written over real entries.
    k_before = np.asarray(cache["k"][:, 1])
    new = random_tokens((2, 2), 30)
    logits, cache = _cached(params, new, cache, cfg=cfg, num_new=jnp.array([2, 0]))
    np.testing.assert_array_equal(np.asarray(cache["k"][:, 1]), k_before)
    np.testing.assert_array_equal(cache["lengths"], [9, 10])
    seqs[0] += [int(t) for t in new[0]]
    np.testing.assert_allclose(logits[0], torch_logits(model, np.array(seqs[0])[None])[0, -2:], atol=1e-4)


@pytest.mark.slow
def test_init_params_follow_param_specs():
    cfg = qwen3.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_only_layers=(1,), initializer_range=0.05,
    )  # fmt: skip
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(0))
    specs = qwen3.param_specs(cfg)
    is_spec = qwen3.is_param_spec
    assert jax.tree.structure(params) == jax.tree.structure(specs, is_leaf=is_spec)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=is_spec)):
        assert p.shape == s.shape and p.dtype == jnp.float32
        if s.init == "ones":
            np.testing.assert_array_equal(p, 1.0)
        else:
            p = np.asarray(p)
            assert abs(p.std() - 0.05) < 0.01 and abs(p.mean()) < 0.01
    assert "lm_head" in params and qwen3.lm_head_weight(params, cfg) is params["lm_head"]
    assert qwen3.param_count(cfg) == sum(p.size for p in jax.tree.leaves(params))
    # The draws: the i-th "normal" leaf in declaration order from fold_in(key, i) (embed is the first), so leaves of
    # one shape never share values; the logical axes the shardings derive from are the specs'.
    want = 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), specs["embed"].shape)
    np.testing.assert_array_equal(np.asarray(qwen3.init_params(cfg, jax.random.key(0))["embed"]), np.asarray(want))
    gate, up = np.asarray(params["moe"]["gate"]), np.asarray(params["moe"]["up"])
    assert gate.shape == up.shape and not np.array_equal(gate, up)
    assert specs["moe"]["gate"].axes == ("layers", "expert", "expert_embed", "mlp")
    assert specs["embed"].axes == ("vocab", "embed")


@pytest.mark.slow
def test_remat_and_unscanned_layers_give_same_values_and_grads(tmp_root):
    _, cfg, params = hf_model("moe_no_norm_sparse_step", tmp_root)
    tokens = random_tokens((2, 6))

    def loss(p, cfg):
        return jnp.mean(qwen3.forward(p, tokens, cfg=cfg) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    cfg = dataclasses.replace(cfg, scan_layers=True, matmuls="einsum")  # the accelerators' forms
    ref_loss, ref_grads = value_and_grad(params, cfg)
    variants = [dict(remat="full"), dict(remat="dots", scan_layers=False), dict(matmuls="flat")]
    for variant in variants + [dict(scan_layers="auto", matmuls="auto"), dict(scan_layers=False, matmuls="flat")]:
        value, grads = value_and_grad(params, qwen3.Qwen3Config(**{**cfg.__dict__, **variant}))
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_bfloat16_compute_tracks_fp32(tmp_root):
    _, cfg, params = hf_model("dense_untied_gqa", tmp_root)
    tokens = random_tokens((2, 9))
    ref = np.asarray(_forward(params, tokens, cfg=cfg))
    out = _forward(params, tokens, cfg=qwen3.Qwen3Config(**{**cfg.__dict__, "dtype": "bfloat16"}))
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (eps 2^-8 ~ 0.4%); a few roundings per layer stay within a few percent.
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.03 * np.abs(ref).max()


def test_cudnn_attention_refuses_cpu(tmp_root):
    _, cfg, params = hf_model("dense_untied_gqa", tmp_root)
    cfg = qwen3.Qwen3Config(**{**cfg.__dict__, "attention": "cudnn"})
    with pytest.raises(ValueError, match="cudnn"):
        qwen3.forward(params, random_tokens((1, 4)), cfg=cfg, segment_ids=jnp.ones((1, 4), jnp.int32))


def test_bad_runtime_fields_are_named():
    base = dict(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="attention"):
        qwen3.Qwen3Config(**base, attention="flash")
    with pytest.raises(ValueError, match="remat"):
        qwen3.Qwen3Config(**base, remat="some")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        qwen3.Qwen3Config(**{**base, "num_key_value_heads": 3})


@pytest.mark.slow
def test_auto_forms_resolve_per_platform(tmp_root):
    """The defaults are "auto": on CPU the layers unroll and the 2-D weights' matmuls (MLP, lm_head) run as 2-D
    dots, whose backward needs no transposes of the activations, and the one-token decode attention runs as
    multiply-reduce fusions; the 3-D attention projections stay einsums unless asked for (no gain, other bits)."""
    _, cfg, params = hf_model("dense_untied_gqa", tmp_root)
    assert (cfg.scan_layers, cfg.matmuls, cfg.decode_attention) == ("auto", "auto", "auto")
    assert not qwen3.scan_layers(cfg) and qwen3.reduce_decode_attention(cfg)
    assert qwen3.flat_matmuls(cfg, weight_ndim=2) and not qwen3.flat_matmuls(cfg, weight_ndim=3)
    forced = dataclasses.replace(cfg, matmuls="flat", decode_attention="dot")
    assert qwen3.flat_matmuls(forced, weight_ndim=3) and not qwen3.reduce_decode_attention(forced)
    accel = dataclasses.replace(cfg, scan_layers=True, matmuls="einsum")  # what "auto" resolves to on GPU / TPU
    assert qwen3.scan_layers(accel) and not qwen3.flat_matmuls(accel)
    tokens = random_tokens((2, 6))

    def grad_hlo(cfg):
        loss = lambda p: jnp.mean(qwen3.forward(p, tokens, cfg=cfg) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

    auto_hlo, accel_hlo = grad_hlo(cfg), grad_hlo(accel)
    assert " while(" not in auto_hlo and " while(" in accel_hlo
    einsum_hlo = grad_hlo(dataclasses.replace(cfg, matmuls="einsum"))
    assert auto_hlo.count(" transpose(") < einsum_hlo.count(" transpose(")  # 76 vs 83 when written
    with pytest.raises(ValueError, match="scan_layers"):
        dataclasses.replace(cfg, scan_layers="sometimes")
    with pytest.raises(ValueError, match="matmuls"):
        dataclasses.replace(cfg, matmuls="2d")
    with pytest.raises(ValueError, match="decode_attention"):
        dataclasses.replace(cfg, decode_attention="fast")
