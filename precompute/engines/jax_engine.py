"""The JAX precompute engine: our Qwen3 on a device mesh scores samples (teacher log-probs) and samples rollouts.

Scoring runs one jitted prefill per (rows, bucket length) shape: samples are sorted by length, padded on the
right to a bucket length from a short geometric ladder (powers of two and 1.5x powers of two, so padding wastes
at most a third and only a few shapes ever compile) and grouped into batches of about ``batch_tokens`` tokens.
Right padding never changes the real tokens' results (attention is causal). Log-probs come from the final
hidden states one chunk of positions at a time, so a [B, T, V] fp32 logits array never exists.

Alignment (the store convention): entry j of a sample's result is log p(tokens[j] | tokens[:j]), computed from
the logits at position j - 1; entry 0 has no prefix and is NaN (it is a prompt token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopd_jax import losses
from lopd_jax.inference import sampling
from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Params, Qwen3Config
from lopd_jax.parallel import sharding

MIN_BUCKET = 32
# XLA:CPU scores fastest per token with batches of at most this many padded tokens: larger batches' activations
# ([rows * T, F] fp32) fall out of cache. Demo teacher, 256 samples of ~62 tokens, one process, CPU time per pass
# vs 16384 tokens per batch: 8192 1.08x, 4096 1.22x, 2048 1.25x, 1024 1.22x; a 50M model is flat from 256 to 4096.
CPU_BATCH_TOKENS = 4096


class Scored(NamedTuple):
    """One sample's scores: ``logprobs`` [L] f32 (NaN at 0); with top-k, ``topk_ids`` [L, k] int32 (-1 at 0)
    and ``topk_logprobs`` [L, k] f32 (NaN at 0), ranked by probability, and ``topk_tail`` [L] f32 = log(1 - their
    mass); with given ids (``score(..., ids=...)``), ``ids_logprobs`` [L, K] f32 = log p at them and ``ids_tail``
    [L] f32 = log(1 - their mass). Tails come from the full logits in log space (``losses.bucket_logprobs``): -inf
    only for an empty tail bucket (the ids cover the vocabulary), NaN at 0 only."""

    logprobs: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    topk_tail: np.ndarray | None = None
    ids_logprobs: np.ndarray | None = None
    ids_tail: np.ndarray | None = None


def bucket_length(length: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest ladder value >= length: minimum, then 2^k and 1.5 * 2^k (48, 64, 96, 128, 192, ...)."""
    if length <= minimum:
        return minimum
    p = 1 << (length - 1).bit_length()  # next power of two >= length
    return p * 3 // 4 if p * 3 // 4 >= length and p >= 4 else p


def rows_for(bucket: int, batch_tokens: int, multiple: int) -> int:
    """Rows per batch for a bucket: a power of two <= batch_tokens / bucket (>= 1), rounded up to ``multiple``
    (the batch shard count). Powers of two keep the number of distinct compiled shapes small."""
    rows = 1 << max(0, int(math.log2(max(1, batch_tokens // bucket))))
    return -(-rows // multiple) * multiple


def plan_batches(lengths: Sequence[int], batch_tokens: int, multiple: int = 1) -> list[tuple[int, int, list[int]]]:
    """Group sample indices into (rows, bucket, indices) batches: sorted by length (ties by index, so the plan is a
    deterministic function of the lengths), then cut whenever the bucket changes or the batch is full. A bucket's
    last, partly filled batch shrinks to the next power of two of its rows (at most log2 extra shapes per bucket)
    instead of padding with empty rows."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[tuple[int, int, list[int]]] = []
    for i in order:
        b = bucket_length(lengths[i])
        if batches and batches[-1][1] == b and len(batches[-1][2]) < batches[-1][0]:
            batches[-1][2].append(i)
        else:
            batches.append((rows_for(b, batch_tokens, multiple), b, [i]))
    return [(min(rows, _round_rows(len(idx), multiple)), b, idx) for rows, b, idx in batches]


def _round_rows(n: int, multiple: int) -> int:
    rows = 1 << (n - 1).bit_length()
    return -(-rows // multiple) * multiple


# --------------------------------------------------------------------------- jitted scoring


def _chunk_scores(w_DV, h_BCD, tgt_BC, ids_BCK, dtype, k: int):
    """One chunk of positions: log p(tgt) [B, C]; with k > 0 the top-k (values [B, C, k], ids [B, C, k]) and its
    tail [B, C]; with ``ids_BCK`` (else None) log p at those ids [B, C, K] and their tail [B, C]."""
    logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD.astype(dtype), w_DV.astype(dtype), preferred_element_type=jnp.float32)
    logp_BCV = logits_BCV - jax.nn.logsumexp(logits_BCV, axis=-1, keepdims=True)
    lp_BC = jnp.take_along_axis(logp_BCV, tgt_BC[..., None], axis=-1)[..., 0]
    top = (None, None, None)
    if k:
        top_v, top_i = jax.lax.top_k(logp_BCV, k)
        top = (top_v, top_i.astype(jnp.int32), losses.bucket_logprobs(logits_BCV, top_i)[1])
    given = (None, None) if ids_BCK is None else losses.bucket_logprobs(logits_BCV, ids_BCK)
    return (lp_BC, *top, *given)


def _topk_scores(params: Params, h_BTD, tgt_BT, ids_BTK, cfg: Qwen3Config, k: int, chunk: int):
    """Chunked over T with lax.scan: only one [B, chunk, V] logits block is alive at a time."""
    B, T, D = h_BTD.shape
    J = T // chunk  # bucket lengths are multiples of the chunk (see _chunk_len)
    h_JBCD = h_BTD.reshape(B, J, chunk, D).swapaxes(0, 1)
    tgt_JBC = tgt_BT.reshape(B, J, chunk).swapaxes(0, 1)
    ids_JBCK = None if ids_BTK is None else ids_BTK.reshape(B, J, chunk, -1).swapaxes(0, 1)
    w_DV = qwen3.lm_head_weight(params, cfg)
    dtype = jnp.dtype(cfg.dtype)
    xs = (h_JBCD, tgt_JBC, ids_JBCK)
    _, outs = jax.lax.scan(lambda c, x: (c, _chunk_scores(w_DV, *x, dtype, k)), None, xs)
    merge = lambda x: None if x is None else x.swapaxes(0, 1).reshape(B, T, *x.shape[3:])  # noqa: E731
    return tuple(merge(x) for x in outs)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "chunk"))
def score_batch(params: Params, tokens_BT: jax.Array, ids_BTK: jax.Array | None = None, *, cfg: Qwen3Config,
                k: int, chunk: int):  # fmt: skip
    """Next-token scores of a right-padded batch. tokens [B, T] int32 ->

    (lp, top-k log-probs, top-k ids, top-k tail, log p at ids, their tail): lp [B, T] f32 with lp[b, t] =
    log p(tokens[b, t + 1] | tokens[b, :t + 1]) (the last column is padding); when k > 0, the top-k log-probs
    [B, T, k] f32, ids [B, T, k] int32 and tail [B, T] of p(. | tokens[b, :t + 1]); with ``ids_BTK`` [B, T, K]
    (ids of the next token's distribution at each position), log p at them [B, T, K] and their tail [B, T].
    What is not asked for is None."""
    h_BTD = qwen3.forward(params, tokens_BT, cfg=cfg, return_hidden=True)
    tgt_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
    if k == 0 and ids_BTK is None:
        return losses.token_logprobs(params, h_BTD, tgt_BT, cfg=cfg, chunk_size=chunk), None, None, None, None, None
    return _topk_scores(params, h_BTD, tgt_BT, ids_BTK, cfg, k, chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "chunk"))
def score_batch_aligned(params: Params, tokens_BT: jax.Array, ids_BTK: jax.Array | None = None, *,
                        cfg: Qwen3Config, k: int, chunk: int):  # fmt: skip
    """``score_batch`` in the store's alignment: column j scores tokens[b, j] (NaN, or id -1, in column 0), so the
    host only slices each row's first L entries instead of shifting every sample. ``ids_BTK`` is in the store's
    alignment too (row j: ids of token j's distribution)."""

    def shift(x, fill):
        return None if x is None else jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)

    if ids_BTK is not None:  # to next-token positions: position t predicts token t + 1
        ids_BTK = jnp.concatenate([ids_BTK[:, 1:], jnp.full_like(ids_BTK[:, :1], -1)], axis=1)
    lp, tv, ti, tt, il, it = score_batch(params, tokens_BT, ids_BTK, cfg=cfg, k=k, chunk=chunk)
    return (
        shift(lp, jnp.nan),
        shift(tv, jnp.nan),
        shift(ti, -1),
        shift(tt, jnp.nan),
        shift(il, jnp.nan),
        shift(it, jnp.nan),
    )


def _chunk_len(bucket: int, rows: int, logit_tokens: int) -> int:
    """Positions per logits chunk: the largest power-of-two divisor of the bucket with rows * chunk <= logit_tokens."""
    c = bucket & -bucket  # largest power of two dividing the bucket
    while c > 1 and rows * c > logit_tokens:
        c //= 2
    return c


# --------------------------------------------------------------------------- engine


class JaxEngine:
    """Loads an HF Qwen3 directory onto a mesh; ``score`` (teacher log-probs) and ``generate`` (rollouts)."""

    name = "jax"

    def __init__(
        self,
        model_dir: str,
        mesh_cfg: sharding.MeshConfig | None = None,
        dtype: str = "float32",
        logit_tokens: int = 8192,
    ):
        """dtype: weights and matmul operands ("float32" exact on CPU; "bfloat16" on accelerators).
        logit_tokens: positions per logits chunk across the batch (bounds the [rows, chunk, V] f32 block)."""
        # This host's devices only: a precompute process is one independent shard, also in a multi-process runtime.
        self.mesh = sharding.make_mesh(mesh_cfg or sharding.MeshConfig(), devices=jax.local_devices())
        cfg, self.params = qwen3.load_hf(model_dir, mesh=self.mesh, dtype=jnp.dtype(dtype))
        self.cfg = dataclasses.replace(cfg, dtype=jnp.dtype(dtype).name)
        # Scoring is a forward pass only: scanned layers, whose forward XLA:CPU runs ~10% faster than the unrolled
        # one "auto" picks on CPU for training and sampling (benchmarks/results/cpu_profile.txt, sections A and D).
        auto_scan = self.cfg.scan_layers == "auto"
        self.score_cfg = dataclasses.replace(self.cfg, scan_layers=True) if auto_scan else self.cfg
        self.logit_tokens = logit_tokens
        self.rows_multiple = sharding.batch_shard_count(self.mesh)
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self.max_batch_tokens = CPU_BATCH_TOKENS if on_cpu else None

    def batch_tokens(self, requested: int) -> int:
        """Padded tokens per batch this engine uses for a requested ``batch_tokens``: capped on CPU (see
        CPU_BATCH_TOKENS), the request itself on an accelerator."""
        return requested if self.max_batch_tokens is None else min(requested, self.max_batch_tokens)

    def score(
        self,
        samples: Sequence[np.ndarray],
        topk: int = 0,
        batch_tokens: int = 16384,
        ids: Sequence[np.ndarray] | None = None,
    ) -> list[Scored]:
        """Score token sequences [L_i] under this model; returns one ``Scored`` per sample, in input order.
        ``batch_tokens``: padded tokens per batch, at most (``self.batch_tokens`` caps it on CPU). ``ids``: per
        sample [L_i, K] int ids in the store's alignment (row j: ids of token j's distribution, -1 = none) whose
        log-probs and tail are wanted (the rollout policy's recorded top-k).

        Pipelined: batch i + 1 is padded and dispatched (asynchronously) before batch i's results are read back,
        so the host's padding, copies and unpacking overlap the device's forward (neutral on CPU, where that host
        work is ~2% of a pass; an accelerator would otherwise idle through it)."""
        lengths = [len(s) for s in samples]
        if min(lengths, default=2) < 2:
            raise ValueError("JaxEngine.score: every sample needs at least 2 tokens (a prompt and a response)")
        if ids is not None and any(np.shape(x)[0] != n for x, n in zip(ids, lengths, strict=True)):
            raise ValueError("JaxEngine.score: ids[i] must have one row per token of sample i")
        out: list[Scored | None] = [None] * len(samples)
        pending = None
        for rows, bucket, idx in plan_batches(lengths, self.batch_tokens(batch_tokens), self.rows_multiple):
            batch_ids = None if ids is None else [ids[i] for i in idx]
            launched = (idx, self._dispatch([samples[i] for i in idx], rows, bucket, topk, batch_ids))
            if pending is not None:
                self._collect(*pending, lengths, out)
            pending = launched
        if pending is not None:
            self._collect(*pending, lengths, out)
        return out  # type: ignore[return-value]

    def _dispatch(self, seqs: list[np.ndarray], rows: int, bucket: int, topk: int, ids: list | None) -> tuple:
        """Pad one batch and launch its scoring; returns the (not yet ready) device results."""
        tokens = np.zeros((rows, bucket), np.int32)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)] = s
        tokens_dev = jax.device_put(tokens, sharding.batch_sharding(self.mesh, 2))
        ids_dev = None
        if ids is not None:
            ids_pad = np.full((rows, bucket, np.shape(ids[0])[1]), -1, np.int32)
            for r, x in enumerate(ids):
                ids_pad[r, : len(x)] = x
            ids_dev = jax.device_put(ids_pad, sharding.batch_sharding(self.mesh, 3))
        chunk = _chunk_len(bucket, rows, self.logit_tokens)
        return score_batch_aligned(self.params, tokens_dev, ids_dev, cfg=self.score_cfg, k=topk, chunk=chunk)

    @staticmethod
    def _collect(idx: list[int], results: tuple, lengths: list[int], out: list) -> None:
        """Read one batch back and store each sample's first L entries (copies: no sample keeps the batch alive)."""
        lp, tv, ti, tt, il, it = (None if x is None else np.asarray(x) for x in results)
        for r, i in enumerate(idx):
            n = lengths[i]
            out[i] = Scored(*(None if x is None else x[r, :n].copy() for x in (lp, ti, tv, tt, il, it)))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_cfg: sampling.SamplingConfig,
        key: jax.Array,
        batch_size: int,
    ) -> list[sampling.SampleOutput]:
        """Sample one continuation per prompt (lopd_jax.inference.sampling on this mesh); outputs in prompt order."""
        return sampling.generate(
            self.params, self.cfg, prompts, sampling_cfg, key=key, mesh=self.mesh, batch_size=batch_size
        )
