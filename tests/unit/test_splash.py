"""Splash attention (the TPU Pallas kernel) in interpret mode on CPU against the XLA attention.

Packed rows with padding, GQA, a length that is not a multiple of the kernel's 128-token block (the padded tail),
forward and gradients, under full remat; tolerances as tests/unit/test_qwen3.py's parity tests (fp32).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopd_jax.models import qwen3

T = 160  # not a multiple of 128: exercises the padded tail
# Two rows: three packed sequences then padding (segment 0), one sequence then padding.
SEGMENTS = np.array([[1] * 70 + [2] * 45 + [3] * 15 + [0] * 30, [1] * 120 + [0] * 40], np.int32)


def _cfg(**kw) -> qwen3.Qwen3Config:
    base = dict(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=10_000.0, initializer_range=0.1,
    )  # fmt: skip
    return qwen3.Qwen3Config(**{**base, **kw})


def _mask(segment_ids):
    idx = jnp.arange(segment_ids.shape[1])
    return (idx[:, None] >= idx[None, :])[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def test_splash_kernel_matches_xla_attention_forward_and_vjp():
    rng = np.random.default_rng(0)
    B, N, K, H = 2, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(SEGMENTS)
    splash = jax.jit(lambda q, k, v: qwen3.attention_splash(q, k, v, seg, interpret=True))
    out, vjp = jax.vjp(splash, q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: qwen3.attention_xla(q, k, v, _mask(seg)), q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    cotangent = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
    for got, want in zip(vjp(cotangent), ref_vjp(cotangent)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _loss(params, tokens, cfg):
    logits = qwen3.forward(params, tokens, cfg=cfg, segment_ids=jnp.asarray(SEGMENTS))
    return jnp.mean(jnp.where(jnp.asarray(SEGMENTS)[..., None] > 0, logits, 0.0) ** 2)


@pytest.mark.slow
def test_model_with_splash_matches_xla_logits_and_grads():
    cfg = _cfg()
    params = qwen3.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, SEGMENTS.shape), jnp.int32)
    splash_cfg = dataclasses.replace(cfg, attention="splash", pallas_interpret=True, remat="full")
    forward = jax.jit(qwen3.forward, static_argnames=("cfg",))
    seg = jnp.asarray(SEGMENTS)
    np.testing.assert_allclose(
        forward(params, tokens, cfg=splash_cfg, segment_ids=seg), forward(params, tokens, cfg=cfg, segment_ids=seg),
        atol=1e-4, rtol=0,
    )  # fmt: skip
    value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
    ref_value, ref_grads = value_and_grad(params, tokens, cfg)
    value, grads = value_and_grad(params, tokens, splash_cfg)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_auto_attention_resolves_per_backend():
    assert qwen3.default_attention("tpu") == "splash"
    assert qwen3.default_attention("gpu") == "xla" and qwen3.default_attention("cpu") == "xla"
    assert _cfg(attention="auto").attention == qwen3.default_attention(jax.default_backend())
    with pytest.raises(ValueError, match="attention"):
        _cfg(attention="flash")


@pytest.mark.slow
def test_splash_under_a_mesh_runs_per_device_and_matches():
    """The update step traces under its mesh: splash then shard_maps rows over the batch axes (8 fake devices)."""
    from lopd_jax.parallel import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig())  # fsdp = 8
    rng = np.random.default_rng(2)
    B, Tm, N, K, H = 8, 128, 2, 1, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, Tm, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(np.repeat(np.array([[1] * 60 + [2] * 50 + [0] * 18]), B, axis=0))

    def sharded(q, k, v, seg):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return qwen3.attention_splash(q, k, v, seg, interpret=True)

    rows = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
    jitted = jax.jit(sharded, in_shardings=rows, out_shardings=rows)
    assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v, seg))
    np.testing.assert_allclose(jitted(q, k, v, seg), qwen3.attention_xla(q, k, v, _mask(seg)), atol=1e-5, rtol=0)
