"""Grouped matmuls for the MoE block, one per backend: ``grouped_matmul(lhs_AD, rhs_EDF, group_sizes_E, impl=...)``.

Every implementation has the semantics of ``jax.lax.ragged_dot(lhs, rhs, group_sizes)``: the A rows of ``lhs`` are
sorted by group, rows ``[start_e, start_e + group_sizes[e])`` are multiplied by ``rhs[e]``, and rows past
``sum(group_sizes)`` (which must be <= A) give zeros. They differ in what the compiler makes of them:

- ``ragged_dot``: ``lax.ragged_dot``. XLA:TPU lowers it to a grouped GEMM; XLA:GPU (jax 0.10-0.11) rewrites it
  into a dense dot over all experts with masked operands ([A, E * D]), and XLA:CPU expands it through an
  [A, E, D] intermediate (E times the FLOPs).
- ``triton``: Pallas-Triton kernels (NVIDIA GPUs): ``gmm`` (forward), the same kernel with the weights
  transposed (the activation gradient) and ``tgmm`` (the weight gradient, ragged over the contraction), under a
  ``custom_vjp``. Tiles below (``GMM_TILES``, ``TGMM_TILES``). On CPU only in Pallas interpret mode (tests).
- ``padded``: pure XLA. Rows are scattered into per-expert blocks padded to ``PADDED_BM`` rows, each block's
  expert weight is gathered, one batched einsum, rows gathered back. Static worst-case shapes (A + E * (bm - 1)
  rows, rounded up to bm); runs on every backend.
- ``scan``: a scan over experts with masked rows. E times a grouped GEMM's FLOPs, a grouped GEMM's buffers: what
  ``--plan`` compiles on CPU to size memory, never a run's choice.

``resolve_moe_impl`` maps ``"auto"`` to the backend's choice and refuses one the backend cannot run. XLA does not
partition a Pallas call: with sharded operands it replicates them around the call, so the triton kernels do each
device's share of the work only inside a per-device region (``shard_map``) of the MoE block.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------------------------------------------
# Choice per backend
# ----------------------------------------------------------------------------------------------------------------

IMPLS = ("ragged_dot", "triton", "padded", "scan")
# What "auto" runs on each jax platform name. GPU: XLA:GPU densifies ragged_dot. TPU: XLA:TPU's own grouped GEMM.
# CPU: padded, measured 6-18x faster than XLA:CPU's [A, E, D] expansion of ragged_dot and 2-5x faster than the scan
# (benchmarks/moe_cpu.py, docs/internals.md). Another platform (rocm as a lowering platform) gets "padded" too.
AUTO = {"gpu": "triton", "cuda": "triton", "tpu": "ragged_dot", "cpu": "padded"}
GPU_PLATFORMS = ("gpu", "cuda")


def resolve_moe_impl(impl: str, platform: str, interpret: bool = False) -> str:
    """The implementation ``impl`` ("auto" or one of ``IMPLS``) runs as on ``platform`` (a jax platform name).

    ValueError for one the platform cannot run: ``triton`` needs an NVIDIA GPU, or Pallas interpret mode
    (``interpret``, tests on CPU); interpret mode is never taken implicitly.
    """
    if impl == "auto":
        impl = AUTO.get(platform, "padded")
    if impl not in IMPLS:
        raise ValueError(f"moe_impl must be 'auto' or one of {list(IMPLS)}, got {impl!r}")
    if impl == "triton" and platform not in GPU_PLATFORMS and not interpret:
        raise ValueError(
            f"moe_impl='triton' runs Pallas-Triton kernels, which need an NVIDIA GPU (backend is {platform!r}); "
            f"use 'auto', 'ragged_dot' or 'padded'"
        )
    return impl


def grouped_matmul(
    lhs_AD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array, *, impl: str, interpret: bool = False
) -> jax.Array:
    """``lax.ragged_dot(lhs_AD, rhs_EDF, group_sizes_E)`` -> [A, F] in lhs's dtype, run as ``impl`` (one of
    ``IMPLS``, already resolved). ``interpret``: the triton kernels in Pallas interpret mode (CPU tests)."""
    if impl == "triton":
        return grouped_matmul_triton(lhs_AD, rhs_EDF, group_sizes_E, interpret)
    return _XLA_IMPLS[impl](lhs_AD, rhs_EDF, group_sizes_E)


# ----------------------------------------------------------------------------------------------------------------
# Pallas-Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's tile: ``bm`` x ``bn`` output tile, ``bk`` contraction step; Triton's warps and stages."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


# Hopper (H100 / H200), bf16 operands, fp32 accumulators. gmm: 64-row tiles, because each expert's last tile is
# partly empty (about E * bm / 2 rows computed and discarded per matmul: 10% of a 30B-A3B layer's 40960 rows at
# bm=64, 20% at 128) and a 64-row tile is one warpgroup's wgmma M; 128 columns and a 64-deep K step keep 4 pipeline
# stages in shared memory (4 * (64*64 + 64*128) * 2 bytes = 96 KiB of 228). tgmm's output tile is a weight block,
# never partial: 128 x 128 with 8 warps (two warpgroups), rows streamed 64 at a time. Not tuned on a GPU:
# benchmarks/moe_check.py (a gpu_suite section) times the alternatives in TILE_CANDIDATES.
GMM_TILES = Tiles(bm=64, bn=128, bk=64, num_warps=4, num_stages=4)
TGMM_TILES = Tiles(bm=128, bn=128, bk=64, num_warps=8, num_stages=3)
TILE_CANDIDATES = {
    "gmm 64x128x64 w4 s4 / tgmm 128x128x64 w8 s3": (GMM_TILES, TGMM_TILES),
    "gmm 128x128x64 w8 s3 / tgmm 128x128x32 w4 s4": (Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 32, 4, 4)),
    "gmm 64x256x64 w4 s3 / tgmm 128x256x64 w8 s3": (Tiles(64, 256, 64, 4, 3), Tiles(128, 256, 64, 8, 3)),
}


def _pow2_at_most(block: int, size: int) -> int:
    """``block`` shrunk to the smallest power of two >= ``size`` when the axis is smaller (Triton blocks are powers
    of two; tiny test shapes must not be padded to a Hopper tile), and at least 16 (a Triton dot's minimum)."""
    return max(16, min(block, 1 << max(size - 1, 0).bit_length()))


def tile_metadata(group_sizes_E: jax.Array, num_rows: int, bm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The row tiles of a grouped matmul over ``num_rows`` rows: (group_T, start_T, end_T), int32, static length.

    Tile t holds rows [start_t, end_t) of group_t: tiles start at their group's first row (never straddle a
    group), ``bm`` rows each, the last one of a group cut at the group's end. Group E (one past the experts) is
    the tail of rows past ``sum(group_sizes)``: its tiles write zeros. T = (num_rows + (E + 1) * (bm - 1)) // bm
    bounds the number of tiles (sum over E + 1 groups of ceil(size / bm)); unused ones have start == end.
    """
    E = group_sizes_E.shape[0]
    sizes_G = jnp.append(group_sizes_E.astype(jnp.int32), num_rows - jnp.sum(group_sizes_E, dtype=jnp.int32))
    ends_G = jnp.cumsum(sizes_G)
    tiles_G = (sizes_G + bm - 1) // bm
    tile_ends_G = jnp.cumsum(tiles_G)
    T = (num_rows + (E + 1) * (bm - 1)) // bm
    t_T = jnp.arange(T, dtype=jnp.int32)
    group_T = jnp.searchsorted(tile_ends_G, t_T, side="right").astype(jnp.int32)
    used_T = group_T <= E
    g_T = jnp.minimum(group_T, E)
    first_T = tile_ends_G[g_T] - tiles_G[g_T]
    start_T = ends_G[g_T] - sizes_G[g_T] + (t_T - first_T) * bm
    end_T = jnp.where(used_T, jnp.minimum(start_T + bm, ends_G[g_T]), start_T)
    return g_T, jnp.where(used_T, start_T, 0), jnp.where(used_T, end_T, 0)


def _gmm_kernel(group_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *, tiles: Tiles, E: int, transpose: bool):
    """One [bm, bn] output tile of rows [start, end) of one group: lhs rows @ rhs[group] (or rhs[group]^T)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    g, start, end = group_ref[()], start_ref[()], end_ref[()]
    K = lhs_ref.shape[1]
    N = out_ref.shape[1]
    n0 = pl.program_id(1) * tiles.bn
    rows = pl.ds(start, tiles.bm)
    cols = pl.ds(n0, tiles.bn)
    row_ok = (start + jnp.arange(tiles.bm)) < end
    col_ok = (n0 + jnp.arange(tiles.bn)) < N

    def step(i, acc_MN):
        k_ok = (i * tiles.bk + jnp.arange(tiles.bk)) < K
        ks = pl.ds(i * tiles.bk, tiles.bk)
        a_MK = plgpu.load(lhs_ref.at[rows, ks], mask=row_ok[:, None] & k_ok[None, :], other=0)
        if transpose:  # rhs is [E, N, K]: the activation gradient dout @ w^T
            b_NK = plgpu.load(rhs_ref.at[g, cols, ks], mask=col_ok[:, None] & k_ok[None, :], other=0)
            return acc_MN + plgpu.dot(a_MK, b_NK, trans_b=True)
        b_KN = plgpu.load(rhs_ref.at[g, ks, cols], mask=k_ok[:, None] & col_ok[None, :], other=0)
        return acc_MN + plgpu.dot(a_MK, b_KN)

    out = out_ref.at[rows, cols]
    mask = row_ok[:, None] & col_ok[None, :]

    @pl.when((start < end) & (g < E))
    def _():
        acc_MN = jax.lax.fori_loop(0, pl.cdiv(K, tiles.bk), step, jnp.zeros((tiles.bm, tiles.bn), jnp.float32))
        plgpu.store(out, acc_MN.astype(out_ref.dtype), mask=mask)

    @pl.when((start < end) & (g == E))  # rows past sum(group_sizes)
    def _():
        plgpu.store(out, jnp.zeros((tiles.bm, tiles.bn), out_ref.dtype), mask=mask)


def _gmm(lhs_AK, rhs, group_sizes_E, t: Tiles, transpose: bool, interpret: bool) -> jax.Array:
    """[A, K] x ([E, K, N], or [E, N, K] when ``transpose``) -> [A, N] in lhs's dtype, ragged over A."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    A, K = lhs_AK.shape
    E, N = rhs.shape[0], rhs.shape[1] if transpose else rhs.shape[2]
    tiles = dataclasses.replace(t, bm=_pow2_at_most(t.bm, A), bn=_pow2_at_most(t.bn, N), bk=_pow2_at_most(t.bk, K))
    meta = tile_metadata(group_sizes_E, A, tiles.bm)
    scalar = pl.BlockSpec((None,), lambda i, j: (i,))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tiles=tiles, E=E, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((A, N), lhs_AK.dtype),
        grid=(meta[0].shape[0], pl.cdiv(N, tiles.bn)),
        in_specs=[scalar, scalar, scalar, pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="lopd_gmm_t" if transpose else "lopd_gmm",
    )(*meta, lhs_AK, rhs.astype(lhs_AK.dtype))


def _tgmm_kernel(lo_ref, hi_ref, lhs_ref, dout_ref, out_ref, *, tiles: Tiles):
    """One [bm, bn] block of group e's weight gradient: sum over its rows r of lhs[r, :]^T dout[r, :]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    lo, hi = lo_ref[()], hi_ref[()]
    D, F = lhs_ref.shape[1], dout_ref.shape[1]
    d0, f0 = pl.program_id(1) * tiles.bm, pl.program_id(2) * tiles.bn
    d_ok = (d0 + jnp.arange(tiles.bm)) < D
    f_ok = (f0 + jnp.arange(tiles.bn)) < F

    def step(i, acc_MN):
        r0 = lo + i * tiles.bk
        r_ok = (r0 + jnp.arange(tiles.bk)) < hi
        rs = pl.ds(r0, tiles.bk)
        a_KM = plgpu.load(lhs_ref.at[rs, pl.ds(d0, tiles.bm)], mask=r_ok[:, None] & d_ok[None, :], other=0)
        b_KN = plgpu.load(dout_ref.at[rs, pl.ds(f0, tiles.bn)], mask=r_ok[:, None] & f_ok[None, :], other=0)
        return acc_MN + plgpu.dot(a_KM, b_KN, trans_a=True)

    n_steps = pl.cdiv(hi - lo, tiles.bk).astype(jnp.int32)
    acc_MN = jax.lax.fori_loop(jnp.int32(0), n_steps, step, jnp.zeros((tiles.bm, tiles.bn), jnp.float32))
    out = out_ref.at[pl.program_id(0), pl.ds(d0, tiles.bm), pl.ds(f0, tiles.bn)]
    plgpu.store(out, acc_MN.astype(out_ref.dtype), mask=d_ok[:, None] & f_ok[None, :])


def _tgmm(lhs_AD, dout_AF, group_sizes_E, t: Tiles, interpret: bool) -> jax.Array:
    """The weight gradient: [E, D, F] with block e = lhs[rows of e]^T @ dout[rows of e] (zeros for empty e)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    A, D = lhs_AD.shape
    E, F = group_sizes_E.shape[0], dout_AF.shape[1]
    tiles = dataclasses.replace(t, bm=_pow2_at_most(t.bm, D), bn=_pow2_at_most(t.bn, F), bk=_pow2_at_most(t.bk, A))
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    scalar = pl.BlockSpec((None,), lambda e, i, j: (e,))
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tiles=tiles),
        out_shape=jax.ShapeDtypeStruct((E, D, F), lhs_AD.dtype),
        grid=(E, pl.cdiv(D, tiles.bm), pl.cdiv(F, tiles.bn)),
        in_specs=[scalar, scalar, pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="lopd_tgmm",
    )(ends_E - group_sizes_E.astype(jnp.int32), ends_E, lhs_AD, dout_AF.astype(lhs_AD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul_triton(
    lhs_AD: jax.Array,
    rhs_EDF: jax.Array,
    group_sizes_E: jax.Array,
    interpret: bool = False,
    tiles: tuple[Tiles, Tiles] = (GMM_TILES, TGMM_TILES),
) -> jax.Array:
    """``lax.ragged_dot`` as Pallas-Triton kernels: forward ``gmm``; backward ``gmm`` against the transposed
    weights (d lhs) and ``tgmm`` (d rhs). ``tiles``: (gmm's, tgmm's), each shrunk to small axes. fp32
    accumulation; fp32 operands multiply in IEEE fp32 (Triton's default for fp32, not TF32)."""
    return _gmm(lhs_AD, rhs_EDF, group_sizes_E, tiles[0], False, interpret)


def _triton_fwd(lhs_AD, rhs_EDF, group_sizes_E, interpret, tiles):
    return _gmm(lhs_AD, rhs_EDF, group_sizes_E, tiles[0], False, interpret), (lhs_AD, rhs_EDF, group_sizes_E)


def _triton_bwd(interpret, tiles, res, dout_AF):
    lhs_AD, rhs_EDF, group_sizes_E = res
    dlhs_AD = _gmm(dout_AF, rhs_EDF, group_sizes_E, tiles[0], True, interpret).astype(lhs_AD.dtype)
    drhs_EDF = _tgmm(lhs_AD, dout_AF, group_sizes_E, tiles[1], interpret).astype(rhs_EDF.dtype)
    return dlhs_AD, drhs_EDF, None


grouped_matmul_triton.defvjp(_triton_fwd, _triton_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Pure-XLA forms
# ----------------------------------------------------------------------------------------------------------------

PADDED_BM = 64  # rows per expert block of grouped_matmul_padded


def grouped_matmul_padded(
    lhs_AD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array, bm: int = PADDED_BM
) -> jax.Array:
    """``lax.ragged_dot`` as one batched einsum over expert blocks of ``bm`` rows (J blocks, P = J * bm rows).

    Each group's rows are scattered to the start of its own run of blocks (padded with zero rows to a multiple of
    ``bm``), each block gathers its expert's weight, ``JbD,JDF->JbF`` multiplies them, and the rows are gathered
    back. P = A + E * (bm - 1) rounded down to bm is the worst case over all group sizes (static shapes); the padding
    rows add their FLOPs, and the [J, D, F] gathered weights are the largest temporary. Autodiff gives the exact
    gradients (scatter and gather transpose into each other; the weight gather into a scatter-add over blocks).
    """
    A, D = lhs_AD.shape
    E, _, F = rhs_EDF.shape
    J = (A + E * (bm - 1)) // bm  # sum_e ceil(size_e / bm) <= (A + E * (bm - 1)) / bm
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    block_ends_E = jnp.cumsum((sizes_E + bm - 1) // bm)  # in blocks
    rows_A = jnp.arange(A, dtype=jnp.int32)
    group_A = jnp.searchsorted(ends_E, rows_A, side="right")  # E for rows past sum(group_sizes)
    g_A = jnp.minimum(group_A, E - 1)
    dest_A = (block_ends_E[g_A] - (sizes_E[g_A] + bm - 1) // bm) * bm + rows_A - (ends_E[g_A] - sizes_E[g_A])
    dest_A = jnp.where(group_A < E, dest_A, J * bm)  # out of range: dropped by the scatter, filled by the gather
    x_PD = jnp.zeros((J * bm, D), lhs_AD.dtype).at[dest_A].set(lhs_AD, mode="drop")
    expert_J = jnp.minimum(jnp.searchsorted(block_ends_E, jnp.arange(J), side="right"), E - 1)
    w_JDF = rhs_EDF.astype(lhs_AD.dtype)[expert_J]
    y_JbF = jnp.einsum("JbD,JDF->JbF", x_PD.reshape(J, bm, D), w_JDF)
    return y_JbF.reshape(J * bm, F).at[dest_A].get(mode="fill", fill_value=0)


def grouped_matmul_scan(lhs_AD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """``lax.ragged_dot`` as a scan over experts with masked rows: the same result, and a grouped GEMM's buffers.

    XLA:CPU lowers ragged_dot densely through an [A, E, D] intermediate (tens of GB for Qwen3-30B-A3B), which
    says nothing about a GPU run; ``moe_impl="scan"`` (what ``--plan`` compiles on CPU) has as largest temporaries
    [A, F] (forward) and one expert's [D, F] gradient per iteration. E times a grouped GEMM's FLOPs.
    """
    ends_E = jnp.cumsum(group_sizes_E)
    starts_E = ends_E - group_sizes_E
    rows_A = jnp.arange(lhs_AD.shape[0])

    def body(acc_AF, xs):
        w_DF, start, end = xs
        in_group_A = (rows_A >= start) & (rows_A < end)
        y_AF = jnp.dot(lhs_AD, w_DF.astype(lhs_AD.dtype))
        return acc_AF + jnp.where(in_group_A[:, None], y_AF, 0).astype(acc_AF.dtype), None

    # Remat keeps the backward from saving a [A, F] mask per expert; the masks are recomputed from two scalars.
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    acc = jnp.zeros((lhs_AD.shape[0], rhs_EDF.shape[-1]), lhs_AD.dtype)
    return jax.lax.scan(body, acc, (rhs_EDF, starts_E, ends_E))[0]


def _ragged_dot(lhs_AD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs_AD, rhs_EDF.astype(lhs_AD.dtype), group_sizes_E)


_XLA_IMPLS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "ragged_dot": _ragged_dot,
    "padded": grouped_matmul_padded,
    "scan": grouped_matmul_scan,
}
