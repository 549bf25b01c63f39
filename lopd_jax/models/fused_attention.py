"""Fused attention kernels (cuDNN on NVIDIA GPUs, Pallas splash on TPUs) behind ``qwen3``'s attention choice.

Same shapes as ``qwen3.attention_xla`` (q [B, T, N, H], k and v [B, S, K, H] with GQA, K dividing N), and the same
result up to summation order, but no [B, N, T, S] scores in memory. Both run per device under a mesh
(``per_device``): XLA partitions neither kernel reliably.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lopd_jax.parallel import sharding


def _cudnn_rows(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], is_causal=True, implementation="cudnn"
    )


def attention_cudnn(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """cuDNN fused attention; the causal+segment mask is passed whole, so packing is honoured, never dropped.

    cuDNN needs bf16/fp16 operands (it raises on fp32); the mask costs one [B, 1, T, S] bias, shared by heads.
    Per device under a mesh (``per_device``).
    """
    return per_device(_cudnn_rows, q_BTNH, k_BSKH, v_BSKH, mask_BTS)


SPLASH_BLOCKS = (512, 256, 128)  # largest first; multiples of 128 (TPU lanes), 512 suits head_dim 128 (as MaxText)


def _splash_block(T: int) -> int:
    return next(b for b in SPLASH_BLOCKS if T % b == 0)


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
    """A causal splash-attention kernel for one row ([N, T, H] queries, [K, T, H] keys/values, GQA natively).

    Built inside each trace (it holds its mask tables as arrays, which must not outlive the trace); the mask
    processing is numpy work at trace time, never per step.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b = _splash_block(seq_len)
    blocks = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_rows(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, interpret: bool):
    """Splash over the rows of one device (vmapped kernel); T padded up to a multiple of 128 at the end.

    The padding is exact: padded keys come after every real query, so the causal mask hides them, and the
    padded queries' outputs are cut off.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q_BTNH.shape
    pad = -T % SPLASH_BLOCKS[-1]
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BNTH = jnp.pad(q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype), widths).transpose(0, 2, 1, 3)
    k_BKSH = jnp.pad(k_BSKH, widths).transpose(0, 2, 1, 3)
    v_BKSH = jnp.pad(v_BSKH, widths).transpose(0, 2, 1, 3)
    seg_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, pad)))
    kernel = _splash_kernel(N, T + pad, interpret)
    out_BNTH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
        q_BNTH, k_BKSH, v_BKSH, seg_BT
    )
    return out_BNTH.transpose(0, 2, 1, 3)[:, :T]


def attention_splash(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array, interpret: bool = False
) -> jax.Array:
    """Pallas splash attention (TPU): causal, packed rows by segment ids, GQA; never builds [B, N, T, S] scores.

    Softmax statistics are fp32 inside the kernel; its custom VJP recomputes scores blockwise, so it composes with
    ``jax.checkpoint``. Mosaic rejects bf16 operands under ``jax_default_matmul_precision="highest"`` ("Bad lhs
    type"), so keep the default precision on TPU. XLA does not partition Pallas kernels: under a mesh
    (``jax.sharding.get_abstract_mesh``, set by the update step) the kernel runs per device in a ``shard_map``,
    rows split as the ``batch`` logical axis and heads as ``kv_heads`` (a GQA group stays on one device).
    """
    run = functools.partial(_splash_rows, interpret=interpret)
    return per_device(run, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def per_device(kernel, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, rows: jax.Array) -> jax.Array:
    """Run a fused attention kernel per device under the enclosing mesh (none: call it directly).

    XLA cannot partition custom kernels well (Pallas not at all; cuDNN's rule wants q, k, v sharded alike, which
    propagation does not guarantee), so the kernel runs in a ``shard_map``: rows split as the ``batch`` logical
    axis, heads as ``kv_heads`` (a GQA group stays on one device); ``rows`` is the per-row mask or segment ids.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q_BTNH, k_BSKH, v_BSKH, rows)
    logical = ("batch", None, "kv_heads", None)
    spec = sharding.logical_to_spec(logical, sharding.mesh_rules(mesh), shape=k_BSKH.shape, mesh=mesh)
    heads = spec[2] if q_BTNH.shape[2] % math.prod(mesh.shape[a] for a in sharding._as_tuple(spec[2])) == 0 else None
    spec = jax.sharding.PartitionSpec(spec[0], None, heads, None)
    rows_spec = jax.sharding.PartitionSpec(spec[0], *([None] * (rows.ndim - 1)))
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, rows_spec), out_specs=spec, check_vma=False)(
        q_BTNH, k_BSKH, v_BSKH, rows
    )
