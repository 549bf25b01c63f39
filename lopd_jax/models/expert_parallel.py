"""Expert parallelism: the MoE block with whole experts per device and an all-to-all token dispatch.

With an expert axis in the mesh (``mesh.expert = N``; ``sharding.expert_layout``), each device holds E / N whole
experts and its own slice of the tokens. Inside a ``shard_map`` every device sorts its A = X * R (token, expert)
assignments by expert, sends each one to the device that holds its expert, runs the grouped matmuls of its local
experts over what it received, and sends the results back to where the tokens live. Dropless: the receive buffer
holds the worst case (every assignment of all N devices routed to one device's experts, N * A rows), so no
assignment is ever cut, whatever the routing.

Two dispatches, the same arithmetic:
  * ``ragged``: ``jax.lax.ragged_all_to_all`` moves only the assigned rows (A per device on average): what
    XLA:GPU (NCCL) and XLA:TPU run. XLA:CPU does not implement the op ("not supported by XLA:CPU ThunkEmitter").
  * ``dense``: ``jax.lax.all_to_all`` of [N, A, D] buffers padded to the worst case: N times the bytes, runs on
    every backend; what XLA:CPU (tests on fake devices) runs.

Shape letters as ``qwen3``: X tokens on this device, R experts per token, A = X * R assignments, D embed, F expert
hidden; N devices on the expert axes, G = E / N experts per device, M = N * A rows of the receive buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lopd_jax.parallel import sharding

# (x [M, D], gate [G, D, F], up [G, D, F], down [G, F, D], group_sizes [G]) -> [M, D]; rows past the groups -> 0.
ExpertFFN = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


# The op the ragged dispatch calls; tests on XLA:CPU, which lacks it, put an all-gather emulation in its place.
ragged_all_to_all = jax.lax.ragged_all_to_all


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def dispatch_kind(platform: str) -> str:
    """The dispatch a backend runs: "dense" on XLA:CPU (no ragged all-to-all there), "ragged" elsewhere."""
    return "dense" if platform == "cpu" else "ragged"


def moe_block(
    x_XD: jax.Array,
    weights_XR: jax.Array,
    experts_XR: jax.Array,
    gate_EDF: jax.Array,
    up_EDF: jax.Array,
    down_EFD: jax.Array,
    ffn: ExpertFFN,
    layout: sharding.ExpertLayout,
    dispatch: str,
) -> jax.Array:
    """The routed MoE output [X, D] (sum over r of weights[x, r] * expert_r(x)) with experts split per ``layout``.

    ``x_XD`` and the routing (``weights_XR``, ``experts_XR``: global expert ids) are the token rows of the whole
    mesh, split as ``layout.token_spec``; the expert weights [E, ...] are split as ``layout.weight_spec`` (XLA
    gathers any FSDP split of D before the ``shard_map``, and reduce-scatters their gradients after).
    """
    mesh = jax.sharding.get_abstract_mesh()
    body = functools.partial(_local_block, ffn=ffn, layout=layout, dispatch=dispatch)
    tok, w = layout.token_spec, layout.weight_spec
    # check_vma=False: Pallas kernels (moe_impl=triton) declare outputs without a varying-axes type. The
    # transpose then psums the weights' cotangents over every axis their spec leaves out, which is the sum a
    # replicated input needs (tests/integration/test_expert_parallel.py checks the gradients against one device).
    smap = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w, w, w), out_specs=tok, check_vma=False)
    return smap(x_XD, weights_XR, experts_XR, gate_EDF, up_EDF, down_EFD)


def _local_block(x_XD, weights_XR, experts_XR, gate_GDF, up_GDF, down_GFD, *, ffn, layout, dispatch):
    X, D = x_XD.shape
    R, G, N = experts_XR.shape[1], gate_GDF.shape[0], layout.num_shards
    axes = layout.expert_axes
    experts_A = experts_XR.reshape(-1)
    order_A = jnp.argsort(experts_A, stable=True)  # sorted by expert, hence by destination device
    x_AD = x_XD[order_A // R]
    counts_E = jnp.bincount(experts_A, length=G * N).astype(jnp.int32)
    # Every device's per-expert counts: [source, destination, local expert]. From them each device knows where
    # its rows land in every receive buffer and where the answers come back, without a second exchange.
    counts_NNG = jax.lax.all_gather(counts_E, axes).reshape(N, N, G)
    me = jax.lax.axis_index(axes)
    route = _Route(counts_NNG, me, X * R)
    if dispatch == "ragged":
        recv_MD, starts_N = _send_ragged(x_AD, route, axes), _exclusive_cumsum(route.recv_sizes)
    else:
        recv_MD, starts_N = _send_dense(x_AD, route, axes), jnp.arange(N, dtype=jnp.int32) * route.A
    local_M, group_sizes_G = _local_groups(route, starts_N, G)
    local_order_M = jnp.argsort(local_M, stable=True)  # grouped by local expert; rows of no group last
    y_MD = ffn(recv_MD[local_order_M], gate_GDF, up_GDF, down_GFD, group_sizes_G)
    y_MD = jnp.zeros_like(y_MD).at[local_order_M].set(y_MD)  # back to the receive buffer's order
    if dispatch == "ragged":
        y_AD = _return_ragged(y_MD, starts_N, route, axes)
    else:
        y_AD = _return_dense(y_MD, route, axes, experts_A[order_A] // G)
    y_XRD = jnp.zeros_like(y_AD).at[order_A].set(y_AD).reshape(X, R, D)
    return jnp.einsum("XRD,XR->XD", y_XRD, weights_XR)


class _Route:
    """The dispatch's bookkeeping on one device, from the [source, destination, local expert] count table."""

    def __init__(self, counts_NNG: jax.Array, me: jax.Array, A: int):
        self.counts_NNG, self.me, self.A = counts_NNG, me, A
        self.sent_NN = counts_NNG.sum(-1)  # rows source s sends to destination d
        self.send_sizes = self.sent_NN[me]  # [destination]
        self.recv_sizes = self.sent_NN[:, me]  # [source]
        self.recv_counts_NG = counts_NNG[:, me]  # [source, local expert]
        self.send_starts = _exclusive_cumsum(self.send_sizes)  # my rows for destination d start here


def _send_ragged(x_AD: jax.Array, route: _Route, axes) -> jax.Array:
    """The assigned rows only; source s's rows land in my buffer after those of sources < s."""
    N = route.sent_NN.shape[0]
    landing_N = _exclusive_cumsum(route.sent_NN, axis=0)[route.me]  # in destination d's buffer
    buffer_MD = jnp.zeros((N * route.A, x_AD.shape[1]), x_AD.dtype)
    return ragged_all_to_all(
        x_AD, buffer_MD, route.send_starts, route.send_sizes, landing_N, route.recv_sizes, axis_name=axes
    )


def _return_ragged(y_MD: jax.Array, starts_N: jax.Array, route: _Route, axes) -> jax.Array:
    """Each source's rows back to it, where they left from (its send offset for this device)."""
    landing_N = _exclusive_cumsum(route.sent_NN, axis=1)[:, route.me]  # in source s's [A, D] buffer
    buffer_AD = jnp.zeros((route.A, y_MD.shape[1]), y_MD.dtype)
    return ragged_all_to_all(y_MD, buffer_AD, starts_N, route.recv_sizes, landing_N, route.send_sizes, axis_name=axes)


def _send_dense(x_AD: jax.Array, route: _Route, axes) -> jax.Array:
    """[N, A, D] blocks, block d holding my rows for destination d (zero-padded to A): source s's rows land in
    my buffer at s * A."""
    N, A = route.sent_NN.shape[0], route.A
    j_A = jnp.arange(A, dtype=jnp.int32)
    rows_NA = jnp.minimum(route.send_starts[:, None] + j_A[None], A - 1)
    valid_NA = j_A[None] < route.send_sizes[:, None]
    send_NAD = jnp.where(valid_NA[..., None], x_AD[rows_NA], 0)
    recv_NAD = jax.lax.all_to_all(send_NAD, axes, 0, 0, tiled=False)
    return recv_NAD.reshape(N * A, -1)


def _return_dense(y_MD: jax.Array, route: _Route, axes, dest_A: jax.Array) -> jax.Array:
    """The inverse of ``_send_dense``: sorted assignment a (sent to ``dest_A[a]``) is row a - send_starts[d] of
    the block that comes back from d."""
    N, A = route.sent_NN.shape[0], route.A
    back_NAD = jax.lax.all_to_all(y_MD.reshape(N, A, -1), axes, 0, 0, tiled=False)
    j_A = jnp.arange(A, dtype=jnp.int32) - route.send_starts[dest_A]
    return back_NAD[dest_A, j_A]


def _local_groups(route: _Route, starts_N: jax.Array, G: int) -> tuple[jax.Array, jax.Array]:
    """(local expert of each receive-buffer row, G for rows that hold nothing; rows per local expert).

    Source s's block starts at ``starts_N[s]`` and is sorted by local expert (``recv_counts_NG[s]`` rows each), so
    the (source, expert) segments are in buffer order and a row's segment is the last that starts at or before it.
    """
    sizes_K = route.recv_counts_NG.reshape(-1)  # K = N * G segments, source-major
    starts_K = (starts_N[:, None] + _exclusive_cumsum(route.recv_counts_NG, axis=1)).reshape(-1)
    rows_M = jnp.arange(route.sent_NN.shape[0] * route.A, dtype=jnp.int32)
    seg_M = jnp.searchsorted(starts_K, rows_M, side="right") - 1
    inside_M = rows_M < starts_K[seg_M] + sizes_K[seg_M]
    return jnp.where(inside_M, seg_M % G, G), route.recv_counts_NG.sum(0)
