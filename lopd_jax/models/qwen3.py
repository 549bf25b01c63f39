"""Qwen3 dense and Qwen3-MoE in JAX / Flax NNX.

Shape vocabulary (used in einsum strings and names, e.g. ``x_BTD``):
  B batch, T time (query), S time (key/value), D embed, N q-heads, K kv-heads, G q-heads per kv-head,
  H head_dim, F mlp hidden, E experts, V vocab, L layers; in the MoE block X tokens (B*T flattened),
  R experts per token (top-k) and A = X*R token-expert assignments.

The public surface is pure functions over a nested dict of arrays (layout: ``param_specs`` and
docs/internals.md): ``init_params``, ``forward``, ``forward_cached`` / ``init_cache`` (sampling), ``load_hf`` /
``save_hf`` (in ``hf.py``). Attention is ``attention_xla`` or a fused kernel of ``fused_attention.py`` (cuDNN,
splash), chosen by ``Qwen3Config.attention``. Layers are stacked on a leading axis and run with ``jax.lax.scan``,
one scan per run of consecutive same-kind (dense / MoE) layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lopd_jax.models import expert_parallel, hf
from lopd_jax.models.fused_attention import attention_cudnn, attention_splash
from lopd_jax.models.grouped_matmul import grouped_matmul, resolve_moe_impl
from lopd_jax.models.qwen3_specs import (  # noqa: F401  (re-exported: qwen3.Qwen3Config, qwen3.param_specs, ...)
    ATTENTION_IMPLS,
    Attention,
    DecodeAttention,
    Dtype,
    Matmuls,
    Params,
    Qwen3Config,
    Remat,
    cache_specs,
    default_attention,
    param_specs,
)

# The model's declaration (config, params and KV cache as ParamSpecs) lives in qwen3_specs so that hf.py can read
# it without importing this module (which imports hf.py for load_hf / save_hf); re-exported here.
from lopd_jax.parallel import sharding
from lopd_jax.parallel.sharding import ParamSpec, is_param_spec  # noqa: F401  (re-exported)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


# --------------------------------------------------------------------------- init


def _filled(spec: ParamSpec) -> jax.Array:
    """The array of a "ones" / "zeros" spec."""
    return (jnp.ones if spec.init == "ones" else jnp.zeros)(spec.shape, jnp.dtype(spec.dtype))


def init_params(cfg: Qwen3Config, key: jax.Array) -> Params:
    """Random params (normal(0, initializer_range), norms at 1) as a nested dict of arrays, layout of param_specs.

    Built from the spec table alone: the i-th "normal" leaf in declaration order draws from ``fold_in(key, i)``.
    Jit it with ``out_shardings=param_shardings(cfg, mesh)`` to create the weights already sharded.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    drawn = 0

    def make(spec: ParamSpec) -> jax.Array:
        nonlocal drawn
        if spec.init != "normal":
            return _filled(spec)
        leaf_key = jax.random.fold_in(key, drawn)  # transformers' _init_weights: normal(0, initializer_range)
        drawn += 1
        return (cfg.initializer_range * jax.random.normal(leaf_key, spec.shape)).astype(spec.dtype)

    def build(tree: Any) -> Any:  # declaration order (jax.tree.map would visit dict keys sorted)
        return make(tree) if is_param_spec(tree) else {k: build(v) for k, v in tree.items()}

    return build(param_specs(cfg))


def param_count(cfg: Qwen3Config) -> int:
    """Number of parameters (from the spec table, no arrays built)."""
    leaves = jax.tree.leaves(param_specs(cfg), is_leaf=is_param_spec)
    return sum(math.prod(s.shape) for s in leaves)


def param_shardings(cfg: Qwen3Config, mesh: Any, rules: sharding.Rules = sharding.DEFAULT_RULES) -> Params:
    """``NamedSharding`` per parameter of ``cfg`` on ``mesh``: ``sharding.shardings`` of ``param_specs(cfg)``."""
    return sharding.shardings(param_specs(cfg), mesh, rules)


def lm_head_weight(params: Params, cfg: Qwen3Config) -> jax.Array:
    """The output projection [D, V]; the transposed embedding when embeddings are tied."""
    if cfg.tie_word_embeddings:
        return params["embed"].T
    return params["lm_head"]


# --------------------------------------------------------------------------- building blocks


def stat_dtype(dtype) -> jnp.dtype:
    """Dtype of statistics (norms, softmax, logits): fp32, or the input's when wider (float64 in identity tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in fp32 (as transformers), result in x's dtype."""
    x32 = x.astype(stat_dtype(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(
    positions_BT: jax.Array, head_dim: int, theta: float, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """sin, cos [B, T, H] for the rotate-half RoPE convention of transformers, in ``dtype``: fp32 (as transformers)
    for fp32 / bf16 models, float64 for a float64 model (identity tests; fp32 angles would cap them at ~1e-7)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = positions_BT.astype(dtype)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_BTNH: jax.Array, sin_BTH: jax.Array, cos_BTH: jax.Array) -> jax.Array:
    x32 = x_BTNH.astype(stat_dtype(x_BTNH.dtype))
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]
    return out.astype(x_BTNH.dtype)


def attention_xla(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array, kv_axes: str = "BSKH"
) -> jax.Array:
    """Grouped-query attention with a boolean mask (True = attend); logits and softmax in fp32.

    kv_axes names the layout of k and v: "BSKH" (a forward pass) or "BKSH" (the KV cache, read as stored).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[kv_axes.index("K")]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    acc = stat_dtype(q_BTNH.dtype)
    logits_BKGTS = jnp.einsum(f"BTKGH,{kv_axes}->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=acc)
    logits_BKGTS = logits_BKGTS * (H**-0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(acc).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum(f"BKGTS,{kv_axes}->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def _compile_platform() -> str:
    """The platform the enclosing computation is compiled for: the mesh's devices (a compile-only topology under
    ``--plan --target``), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _check_attention_backend(cfg: Qwen3Config) -> None:
    if cfg.attention != "cudnn":
        return
    platform = _compile_platform()
    if platform not in ("gpu", "cuda"):
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (backend is {platform!r}); use attention='xla'")
    if cfg.dtype not in ("bfloat16", "float16"):
        raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got dtype={cfg.dtype!r}")


def flat_matmuls(cfg: Qwen3Config, weight_ndim: int = 2) -> bool:
    """Whether a matmul with a ``weight_ndim``-D weight runs as a 2-D dot (``cfg.matmuls``).

    "auto" = the 2-D weights (MLP, lm_head) when compiling for CPU: there the flat form is the einsum's own
    arithmetic without its transposes (bit-identical, 1.4-1.7x faster steps); the 3-D attention projections'
    flat form changes the last bits of their gradients and buys nothing measurable, so "auto" leaves them."""
    if cfg.matmuls == "auto":
        return weight_ndim == 2 and _compile_platform() == "cpu"
    return cfg.matmuls == "flat"


def reduce_decode_attention(cfg: Qwen3Config) -> bool:
    """Whether a one-token decode step attends by multiply-reduce (``cfg.decode_attention``; "auto" = on CPU)."""
    if cfg.decode_attention == "auto":
        return _compile_platform() == "cpu"
    return cfg.decode_attention == "reduce"


def scan_layers(cfg: Qwen3Config) -> bool:
    """Whether the layers run as a lax.scan (``cfg.scan_layers``; "auto" = scanned except when compiling for CPU)."""
    if cfg.scan_layers == "auto":
        return _compile_platform() != "cpu"
    return cfg.scan_layers


def project(spec: str, x: jax.Array, w: jax.Array, flat: bool) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in x's dtype, where w's leading axes are the contracted ones (e.g. BTD,DNH->BTNH).

    ``flat``: as one 2-D dot [prod(...), prod(I)] @ [prod(I), prod(O)] (reshapes are free in row-major layouts),
    whose weight gradient XLA:CPU computes without transposing the activations; else the einsum itself, exactly
    the arithmetic of the einsum form (the default: bit-identical to it).
    """
    w = w.astype(x.dtype)
    if not flat:
        return jnp.einsum(spec, x, w)
    x_axes, w_axes = spec.split("->")[0].split(",")
    n_in = sum(a in x_axes for a in w_axes)
    lead, in_shape, out_shape = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    y = jnp.dot(x.reshape(-1, math.prod(in_shape)), w.reshape(math.prod(in_shape), -1))
    return y.reshape(*lead, *out_shape)


def _attend(q_BTNH, k_BSKH, v_BSKH, ctx: _Ctx, cfg: Qwen3Config) -> jax.Array:
    """The attention implementation ``cfg.attention`` names (the one registry of implementations)."""
    if cfg.attention == "splash":
        return attention_splash(q_BTNH, k_BSKH, v_BSKH, ctx.segment_ids_BT, interpret=cfg.pallas_interpret)
    return _ATTENTION[cfg.attention](q_BTNH, k_BSKH, v_BSKH, ctx.mask_BTS)


ATTN_BLOCK = 512  # queries per block of attention_blockwise


def attention_blockwise(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """``attention_xla`` one block of ``ATTN_BLOCK`` queries at a time, rematerialised: exact, with a fused
    kernel's memory profile (scores exist for one block only and are recomputed in the backward pass, as a flash
    kernel does; ``attention_xla`` keeps full [B, N, T, S] fp32 scores per layer). What ``--plan`` compiles for
    cuDNN or splash on a backend that cannot compile them."""
    B, T, N, H = q_BTNH.shape
    C = math.gcd(T, ATTN_BLOCK)
    q_JBCNH = q_BTNH.reshape(B, T // C, C, N, H).swapaxes(0, 1)
    m_JBCS = mask_BTS.reshape(B, T // C, C, -1).swapaxes(0, 1)
    block = jax.checkpoint(lambda qm: attention_xla(qm[0], k_BSKH, v_BSKH, qm[1]))
    out_JBCNH = jax.lax.map(block, (q_JBCNH, m_JBCS))
    return out_JBCNH.swapaxes(0, 1).reshape(B, T, N, H)


def attention_ablated(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """NOT attention: v repeated over each kv-head's query heads (same shapes, no scores). The rest of the layer
    is unchanged, so a step with it measures attention's share (``benchmarks.profile_step``)."""
    return jnp.repeat(v_BSKH, q_BTNH.shape[2] // v_BSKH.shape[2], axis=2)


# Mask-based implementations; splash takes segments.
_ATTENTION = {
    "xla": attention_xla,
    "cudnn": attention_cudnn,
    "blockwise": attention_blockwise,
    "ablated": attention_ablated,
}


def dense_mlp(x_BTD: jax.Array, mp: Params, flat: bool = False) -> jax.Array:
    """SwiGLU MLP: down(silu(x gate) * (x up)); ``flat``: 2-D dots (see ``project``)."""
    gate_BTF = project("BTD,DF->BTF", x_BTD, mp["gate"], flat)
    up_BTF = project("BTD,DF->BTF", x_BTD, mp["up"], flat)
    return project("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, mp["down"], flat)


def route(x_XD: jax.Array, router_DE: jax.Array, cfg: Qwen3Config) -> tuple[jax.Array, jax.Array]:
    """transformers' router: fp32 softmax over experts, top-k, optional renormalisation.

    Returns weights [X, R] (in x's dtype) and expert ids [X, R] (R = num_experts_per_tok).
    """
    logits_XE = jnp.einsum("XD,DE->XE", x_XD, router_DE.astype(x_XD.dtype))
    probs_XE = jax.nn.softmax(logits_XE.astype(stat_dtype(x_XD.dtype)), axis=-1)
    weights_XR, experts_XR = jax.lax.top_k(probs_XE, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights_XR = weights_XR / jnp.sum(weights_XR, axis=-1, keepdims=True)
    return weights_XR.astype(x_XD.dtype), experts_XR


def moe_mlp(x_BTD: jax.Array, mp: Params, cfg: Qwen3Config) -> jax.Array:
    """Sparse MoE block: the X*R (token, expert) assignments are sorted by expert and run as grouped matmuls
    (``cfg.moe_impl``, resolved for the compile platform by ``grouped_matmul.resolve_moe_impl``).

    Under a mesh with an expert axis (``sharding.expert_layout``) the experts are split over it and the
    assignments travel to them and back by all-to-all (``expert_parallel.moe_block``)."""
    B, T, D = x_BTD.shape
    dt, E, R = x_BTD.dtype, cfg.num_experts, cfg.num_experts_per_tok
    x_XD = x_BTD.reshape(B * T, D)
    weights_XR, experts_XR = route(x_XD, mp["router"], cfg)
    gate_EDF, up_EDF, down_EFD = (mp[k].astype(dt) for k in ("gate", "up", "down"))
    layout = sharding.expert_layout(jax.sharding.get_abstract_mesh(), E, B * T)
    if layout is not None:
        dispatch = expert_parallel.dispatch_kind(_compile_platform())
        ffn = functools.partial(expert_ffn, cfg=cfg)
        out_XD = expert_parallel.moe_block(
            x_XD, weights_XR, experts_XR, gate_EDF, up_EDF, down_EFD, ffn, layout, dispatch
        )
        return out_XD.reshape(B, T, D)
    experts_A = experts_XR.reshape(-1)
    order_A = jnp.argsort(experts_A, stable=True)  # assignment a of the sorted list is order_A[a]
    x_AD = x_XD[order_A // R]
    group_sizes_E = jnp.bincount(experts_A, length=E).astype(jnp.int32)
    y_AD = expert_ffn(x_AD, gate_EDF, up_EDF, down_EFD, group_sizes_E, cfg=cfg)
    y_XRD = jnp.zeros_like(y_AD).at[order_A].set(y_AD).reshape(B * T, R, D)
    out_XD = jnp.einsum("XRD,XR->XD", y_XRD, weights_XR)
    return out_XD.reshape(B, T, D)


def expert_ffn(x_AD, gate_EDF, up_EDF, down_EFD, group_sizes_E, *, cfg: Qwen3Config) -> jax.Array:
    """The experts' SwiGLU over expert-sorted rows [A, D] (group e: the next group_sizes_E[e] rows) -> [A, D],
    by ``cfg.moe_impl``'s grouped matmul; rows past the last group come out zero (``lax.ragged_dot``'s semantics).
    """
    impl = resolve_moe_impl(cfg.moe_impl, _compile_platform(), cfg.pallas_interpret)
    grouped = functools.partial(grouped_matmul, impl=impl, interpret=cfg.pallas_interpret)
    gate_AF = grouped(x_AD, gate_EDF, group_sizes_E)
    up_AF = grouped(x_AD, up_EDF, group_sizes_E)
    return grouped(jax.nn.silu(gate_AF) * up_AF, down_EFD, group_sizes_E)


# --------------------------------------------------------------------------- decoder stack


class _Ctx(NamedTuple):
    """Per-call constants shared by every layer."""

    sin_BTH: jax.Array
    cos_BTH: jax.Array
    mask_BTS: jax.Array  # True = query t may attend to key s
    slots_BT: jax.Array | None  # cache slots of the new tokens (cached forward only)
    segment_ids_BT: jax.Array | None = None  # packed segments (splash takes these instead of the mask)


def _project_qkv(h_BTD: jax.Array, lp: Params, ctx: _Ctx, cfg: Qwen3Config):
    flat = flat_matmuls(cfg, weight_ndim=3)
    q_BTNH = project("BTD,DNH->BTNH", h_BTD, lp["q"], flat)
    k_BTKH = project("BTD,DKH->BTKH", h_BTD, lp["k"], flat)
    v_BTKH = project("BTD,DKH->BTKH", h_BTD, lp["v"], flat)
    q_BTNH = apply_rope(rms_norm(q_BTNH, lp["q_norm"], cfg.rms_norm_eps), ctx.sin_BTH, ctx.cos_BTH)
    k_BTKH = apply_rope(rms_norm(k_BTKH, lp["k_norm"], cfg.rms_norm_eps), ctx.sin_BTH, ctx.cos_BTH)
    return q_BTNH, k_BTKH, v_BTKH


def _write_cache(c: jax.Array, new_BTKH: jax.Array, slots_BT: jax.Array, layer: int | None = None) -> jax.Array:
    # Scatter into this layer's cache c [B,K,S,H] (or into layer ``layer`` of the whole cache [L,B,K,S,H]); slots
    # past max_len (right padding of a full row) are dropped rather than clamped onto real entries. (Advanced
    # indices around a slice put (B, T) first: the update is BTKH.)
    b_B1 = jnp.arange(new_BTKH.shape[0])[:, None]
    index = (b_B1, slice(None), slots_BT) if layer is None else (layer, b_B1, slice(None), slots_BT)
    return c.at[index].set(new_BTKH.astype(c.dtype), mode="drop")


def attention_cached(
    q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array, reduce: bool = False
) -> jax.Array:
    """attention_xla over a cache laid out [B, K, S, H]: the einsums read it without a transpose per step.

    ``reduce`` (Qwen3Config.decode_attention): a one-token step contracts with broadcast-multiply-reduce fusions
    instead: its dots are B*K matrix-vector products of G rows, which XLA:CPU runs one small batched GEMM at a time
    (half the step). Opt-in: the sums associate differently, so the last bits change.
    """
    if q_BTNH.shape[1] != 1 or not reduce:
        return attention_xla(q_BTNH, k_BKSH, v_BKSH, mask_BTS, kv_axes="BKSH")
    B, _, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    acc = stat_dtype(q_BTNH.dtype)
    q_BKG1H = q_BTNH.reshape(B, K, N // K, 1, H).astype(acc)
    logits_BKGS = jnp.sum(q_BKG1H * k_BKSH[:, :, None].astype(acc), axis=-1) * (H**-0.5)
    logits_BKGS = jnp.where(mask_BTS[:, None], logits_BKGS, jnp.finfo(acc).min)  # mask [B,1,S] -> [B,1,1,S]
    probs_BKGS1 = jax.nn.softmax(logits_BKGS, axis=-1)[..., None]
    out_BKGH = jnp.sum(probs_BKGS1 * v_BKSH[:, :, None].astype(acc), axis=-2)
    return out_BKGH.reshape(B, 1, N, H).astype(v_BKSH.dtype)


def _decoder_layer(x_BTD, lp, mp, kind, ctx, cfg, cache=None, layer=None):
    """One pre-norm decoder layer; ``cache`` = this layer's (k [B,K,S,H], v) for the cached forward, or with
    ``layer`` the whole (k [L,B,K,S,H], v), updated in place at that layer (the unrolled stack)."""
    h_BTD = rms_norm(x_BTD, lp["attn_norm"], cfg.rms_norm_eps)
    q_BTNH, k_BSKH, v_BSKH = _project_qkv(h_BTD, lp, ctx, cfg)
    if cache is None:
        o_BTNH = _attend(q_BTNH, k_BSKH, v_BSKH, ctx, cfg)
    else:
        cache = tuple(_write_cache(c, new, ctx.slots_BT, layer) for c, new in zip(cache, (k_BSKH, v_BSKH)))
        k_BKSH, v_BKSH = cache if layer is None else (cache[0][layer], cache[1][layer])
        # Decode steps are bandwidth-bound: the fused kernels buy nothing there.
        dt = x_BTD.dtype
        reduce = reduce_decode_attention(cfg)
        o_BTNH = attention_cached(q_BTNH, k_BKSH.astype(dt), v_BKSH.astype(dt), ctx.mask_BTS, reduce)
    x_BTD = x_BTD + project("BTNH,NHD->BTD", o_BTNH, lp["o"], flat_matmuls(cfg, weight_ndim=3))
    h_BTD = rms_norm(x_BTD, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp_out = moe_mlp(h_BTD, mp, cfg) if kind == "moe" else dense_mlp(h_BTD, mp, flat_matmuls(cfg))
    return x_BTD + mlp_out, cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Save the weight matmuls (no batch dims), recompute attention scores and elementwise ops.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_runs(cfg: Qwen3Config) -> list[tuple[str, int, int, int]]:
    """Maximal runs of consecutive same-kind layers: (kind, first layer, end layer, offset in mlp/moe stack)."""
    runs: list[tuple[str, int, int, int]] = []
    seen = {"mlp": 0, "moe": 0}
    for i in range(cfg.num_hidden_layers):
        kind = "moe" if cfg.is_moe_layer(i) else "mlp"
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], i + 1, runs[-1][3])
        else:
            runs.append((kind, i, i + 1, seen[kind]))
        seen[kind] += 1
    return runs


def _scan(body, carry, xs, cfg: Qwen3Config):
    """lax.scan over stacked layers (one compiled body), or an unrolled loop when cfg.scan_layers is off."""
    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
    if scan_layers(cfg):
        return jax.lax.scan(body, carry, xs)[0]
    n = jax.tree.leaves(xs)[0].shape[0]
    for j in range(n):
        carry = body(carry, jax.tree.map(lambda a, j=j: a[j], xs))[0]
    return carry


def _run_slices(params: Params, kind: str, start: int, stop: int, offset: int):
    lp = jax.tree.map(lambda a: a[start:stop], params["layers"])
    mp = jax.tree.map(lambda a: a[offset : offset + stop - start], params[kind])
    return lp, mp


def _decoder_stack(params: Params, x_BTD: jax.Array, ctx: _Ctx, cfg: Qwen3Config) -> jax.Array:
    for kind, start, stop, offset in layer_runs(cfg):
        lp, mp = _run_slices(params, kind, start, stop, offset)

        def body(x, layer, kind=kind):
            return _decoder_layer(x, layer[0], layer[1], kind, ctx, cfg)[0], None

        x_BTD = _scan(body, x_BTD, (lp, mp), cfg)
    return x_BTD


def _decoder_stack_cached(params, x_BTD, k_all, v_all, ctx: _Ctx, cfg: Qwen3Config):
    if not scan_layers(cfg):
        return _decoder_stack_cached_unrolled(params, x_BTD, k_all, v_all, ctx, cfg)
    # Each layer's cache slice is a scanned input and its updated slice a scanned output (not a carry):
    # carrying the whole [L,B,S,K,H] cache made XLA copy it every layer, so a decode step cost O(L^2 S).
    k_runs, v_runs = [], []
    for kind, start, stop, offset in layer_runs(cfg):
        lp, mp = _run_slices(params, kind, start, stop, offset)

        def body(x, layer, kind=kind):
            x, kv = _decoder_layer(x, layer[0], layer[1], kind, ctx, cfg, cache=(layer[2], layer[3]))
            return x, kv

        x_BTD, (k_run, v_run) = _scan_ys(body, x_BTD, (lp, mp, k_all[start:stop], v_all[start:stop]), cfg)
        k_runs.append(k_run)
        v_runs.append(v_run)
    cat = (lambda xs: xs[0]) if len(k_runs) == 1 else (lambda xs: jnp.concatenate(xs, axis=0))
    return x_BTD, cat(k_runs), cat(v_runs)


def _decoder_stack_cached_unrolled(params, x_BTD, k_all, v_all, ctx: _Ctx, cfg: Qwen3Config):
    # Each layer scatters into the whole [L,B,K,S,H] cache in place: slicing per-layer caches out and stacking
    # them back copied the whole cache three times per decode step.
    for kind, start, stop, offset in layer_runs(cfg):
        lp, mp = _run_slices(params, kind, start, stop, offset)
        for j in range(stop - start):
            lp_j, mp_j = jax.tree.map(lambda a, j=j: a[j], (lp, mp))
            x_BTD, (k_all, v_all) = _decoder_layer(x_BTD, lp_j, mp_j, kind, ctx, cfg, (k_all, v_all), start + j)
    return x_BTD, k_all, v_all


def _scan_ys(body, carry, xs, cfg: Qwen3Config):
    """Like _scan but keeps the stacked per-layer outputs (the updated KV cache)."""
    if scan_layers(cfg):
        return jax.lax.scan(body, carry, xs)
    ys = []
    for j in range(jax.tree.leaves(xs)[0].shape[0]):
        carry, y = body(carry, jax.tree.map(lambda a, j=j: a[j], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _output(params: Params, x_BTD: jax.Array, cfg: Qwen3Config, return_hidden: bool) -> jax.Array:
    h_BTD = rms_norm(x_BTD, params["final_norm"], cfg.rms_norm_eps)
    if return_hidden:
        return h_BTD
    return project("BTD,DV->BTV", h_BTD, lm_head_weight(params, cfg), flat_matmuls(cfg))


def _embed(params: Params, tokens_BT: jax.Array, cfg: Qwen3Config) -> jax.Array:
    return jnp.take(params["embed"], tokens_BT, axis=0).astype(dtype_of(cfg.dtype))


# --------------------------------------------------------------------------- public forward passes


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token within its own packed segment [B, T] (restarts at 0 where the id changes)."""
    T = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BT.shape)
    change_BT = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    start_BT = jax.lax.cummax(jnp.where(change_BT, idx_BT, 0), axis=1)
    return idx_BT - start_BT


def forward(
    params: Params,
    tokens: jax.Array,
    *,
    cfg: Qwen3Config,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Causal LM forward. tokens [B, T] int -> logits [B, T, V] (or hidden [B, T, D] after the final norm).

    positions [B, T]: RoPE positions; default arange(T), or restarting per segment when segment_ids is given.
    segment_ids [B, T]: packed sequences; attention never crosses a segment boundary.
    Output dtype is cfg.dtype (the compute dtype); softmax and norm statistics are fp32.
    """
    _check_attention_backend(cfg)
    B, T = tokens.shape
    if positions is None:
        positions = segment_positions(segment_ids) if segment_ids is not None else jnp.arange(T)[None]
    positions = jnp.broadcast_to(positions, (B, T))
    idx_T = jnp.arange(T)
    mask_BTS = jnp.broadcast_to(idx_T[:, None] >= idx_T[None, :], (B, T, T))
    if segment_ids is not None:
        mask_BTS = mask_BTS & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
        segment_ids = jnp.ones((B, T), jnp.int32)
    sin_BTH, cos_BTH = rope_tables(positions, cfg.head_dim, cfg.rope_theta, stat_dtype(cfg.dtype))
    ctx = _Ctx(sin_BTH, cos_BTH, mask_BTS, None, segment_ids)
    x_BTD = _decoder_stack(params, _embed(params, tokens, cfg), ctx, cfg)
    return _output(params, x_BTD, cfg, return_hidden)


def init_cache(cfg: Qwen3Config, batch: int, max_len: int, dtype: str | None = None) -> Params:
    """Empty KV cache, as ``cache_specs`` declares it: {"k", "v": [L, B, K, S, H], "lengths": [B] int32}, zeros."""
    return jax.tree.map(_filled, cache_specs(cfg, batch, max_len, dtype), is_leaf=is_param_spec)


def forward_cached(
    params: Params,
    tokens: jax.Array,
    cache: Params,
    *,
    cfg: Qwen3Config,
    num_new: jax.Array | None = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, Params]:
    """Append tokens [B, T] to the cache and return (logits [B, T, V] or hidden [B, T, D], new cache).

    Token t of row b goes to cache slot (and RoPE position) lengths[b] + t and attends causally to every slot
    up to its own. num_new [B] (default T) counts the real tokens of each row (right padding); the outputs at
    padded places are meaningless and the new lengths are lengths + num_new. The caller keeps
    lengths + num_new <= max_len (jit cannot raise on data).
    """
    B, T = tokens.shape
    lengths_B = cache["lengths"]
    num_new = jnp.full((B,), T, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
    slots_BT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    S = cache["k"].shape[3]
    mask_BTS = jnp.arange(S)[None, None, :] <= slots_BT[:, :, None]
    sin_BTH, cos_BTH = rope_tables(slots_BT, cfg.head_dim, cfg.rope_theta, stat_dtype(cfg.dtype))
    ctx = _Ctx(sin_BTH, cos_BTH, mask_BTS, slots_BT)
    x_BTD, k_all, v_all = _decoder_stack_cached(params, _embed(params, tokens, cfg), cache["k"], cache["v"], ctx, cfg)
    out = _output(params, x_BTD, cfg, return_hidden)
    return out, {"k": k_all, "v": v_all, "lengths": lengths_B + num_new}


def load_hf(path: str, mesh: Any = None, dtype: Any = jnp.float32) -> tuple[Qwen3Config, Params]:
    """HF checkpoint directory -> (Qwen3Config, params); see lopd_jax.models.hf.load_hf."""
    return hf.load_hf(path, mesh=mesh, dtype=dtype)


def save_hf(path: str, cfg: Qwen3Config, params: Params, **kwargs: Any) -> str:
    """params -> HF checkpoint directory; see lopd_jax.models.hf.save_hf."""
    return hf.save_hf(path, cfg, params, **kwargs)
