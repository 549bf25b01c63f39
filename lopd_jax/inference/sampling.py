"""Batched JAX sampler over the Qwen3 KV cache: rollouts without vLLM, online OPD, evaluation.

One jitted function per (batch size, prompt bucket) runs the whole generation: a prefill of the right-padded
prompts, then a ``lax.while_loop`` of one-token decode steps that stops as soon as every row has finished.
Prompt lengths are bucketed to powers of two and the cache holds ``bucket + max_new_tokens`` slots, so a run
compiles once per bucket, not per prompt length.

Semantics follow vLLM:
  * ``temperature == 0`` is greedy (argmax of the raw logits); otherwise logits / temperature, then top-k, then
    top-p (nucleus over the temperature-scaled, top-k-masked distribution), then a categorical draw.
  * Recorded log-probs are the *raw* policy log-probs, ``log_softmax(logits)`` at temperature 1 with no
    truncation (vLLM V1's default ``logprobs_mode="raw_logprobs"``). The trainer uses them as behaviour
    log-probs in importance weights against the same model's forward, so the unprocessed model log-prob is the
    comparable quantity; the processed distribution can be recomputed from it and the sampling parameters.
  * With ``SamplingConfig.record_topk = K`` the K most likely ids of that same raw distribution and their raw
    log-probs are recorded at every step (``SampleOutput.topk_ids`` / ``topk_logprobs``, by rank), whatever
    temperature / top-k / top-p the token was drawn with.
  * Generated ids include the stop token when one was produced (finish_reason "stop"), else "length".

Randomness: the key of prompt i at decode step t is ``fold_in(fold_in(key, i), t)``, so a prompt's sample does
not depend on which other prompts share its batch, on the batch size, or on the mesh. To draw n samples of a
prompt, list it n times.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Params, Qwen3Config
from lopd_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (vLLM ``SamplingParams`` names).

    temperature 0 means greedy; top_k <= 0 and top_p >= 1 are off. Generation stops at any of
    ``stop_token_ids`` and, unless ``ignore_eos``, at the model's ``eos_token_id``(s).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int = 0
    min_prompt_bucket: int = 16  # smallest padded prompt length (avoids a compile per tiny prompt)
    record_topk: int = 0  # K > 0: also record the raw policy's top-K ids and log-probs at every generated token

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.record_topk < 0:
            raise ValueError(f"SamplingConfig.record_topk must be >= 0, got {self.record_topk}")


@dataclasses.dataclass
class SampleOutput:
    """One generation: ``token_ids`` [n] int32 (stop token included), ``logprobs`` [n] float32 (raw model
    log-probs of those tokens), ``finish_reason`` "stop" | "length"; with ``record_topk`` = K, ``topk_ids`` [n, K]
    int32 and ``topk_logprobs`` [n, K] float32: the raw model's K most likely ids at each token, by rank."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


class _Static(NamedTuple):
    """The sampling settings that shape the compiled program (hashable, passed as a static argument)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    record_topk: int = 0


# --------------------------------------------------------------------------- logits processing


def apply_top_k(logits_BV: jax.Array, k: int) -> jax.Array:
    """Mask (to -inf) every logit below the k-th largest of its row; ties with the k-th are kept (as vLLM)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def apply_top_p(logits_BV: jax.Array, p: float) -> jax.Array:
    """Nucleus mask: keep the smallest set of most likely tokens whose probability reaches p (always >= 1).

    As vLLM: sort ascending, drop tokens while the cumulative probability stays <= 1 - p. The cut is turned
    into a logit threshold, so no scatter back from sorted order is needed.
    """
    if p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    n_drop_B1 = jnp.sum(cum_BV[..., :-1] <= 1.0 - p, axis=-1, keepdims=True)  # the top token always stays
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_drop_B1, axis=-1)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def process_logits(logits_BV: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """The distribution actually sampled from (temperature > 0): logits / T, then top-k, then top-p."""
    x_BV = logits_BV.astype(jnp.float32) / temperature
    return apply_top_p(apply_top_k(x_BV, top_k), top_p)


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, st: _Static) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row. logits [B, V] (any float), keys [B] -> tokens [B] int32, raw log-probs [B] fp32.
    (The raw top-k, when recorded, is taken by ``_record`` from the same log-softmax.)"""
    logits_BV = logits_BV.astype(jnp.float32)
    if st.temperature == 0:
        tokens_B = jnp.argmax(logits_BV, axis=-1)
    else:
        processed_BV = process_logits(logits_BV, st.temperature, st.top_k, st.top_p)
        tokens_B = jax.vmap(jax.random.categorical)(keys_B, processed_BV)
    tokens_B = tokens_B.astype(jnp.int32)
    logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, logprobs_B


# --------------------------------------------------------------------------- the jitted generation


def _last_logits(params: Params, h_BTD: jax.Array, index_B: jax.Array, cfg: Qwen3Config) -> jax.Array:
    """fp32 logits [B, V] of the hidden state at position index_B of each row (only B rows hit the lm_head)."""
    h_BD = jnp.take_along_axis(h_BTD, index_B[:, None, None], axis=1)[:, 0]
    w_DV = qwen3.lm_head_weight(params, cfg).astype(h_BD.dtype)
    return jnp.einsum("BD,DV->BV", h_BD, w_DV, preferred_element_type=jnp.float32)


class _State(NamedTuple):
    step: jax.Array  # index of the token sampled next
    cache: Params
    last_B: jax.Array  # last sampled token of each row
    done_B: jax.Array
    stopped_B: jax.Array
    n_gen_B: jax.Array
    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    topk_ids_BMK: jax.Array  # [B, M, K] (K = st.record_topk; [B, M, 0] when not recorded)
    topk_lp_BMK: jax.Array


def raw_topk(logits_BV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The K most likely ids of the raw (temperature 1, untruncated) distribution and their log-probs, by rank:
    (ids [B, K] int32, log-probs [B, K] fp32)."""
    lp_K, ids_K = jax.lax.top_k(jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1), k)
    return ids_K.astype(jnp.int32), lp_K


def _record(s: _State, logits_BV: jax.Array, keys_B: jax.Array, st: _Static) -> _State:
    """Sample token number s.step for every unfinished row and update the finished flags."""
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, s.step)
    tok_B, lp_B = sample_tokens(logits_BV, step_keys_B, st)
    active_B = ~s.done_B
    if st.record_topk:
        ids_BK, tlp_BK = raw_topk(logits_BV, st.record_topk)
        s = s._replace(
            topk_ids_BMK=s.topk_ids_BMK.at[:, s.step].set(jnp.where(active_B[:, None], ids_BK, -1)),
            topk_lp_BMK=s.topk_lp_BMK.at[:, s.step].set(jnp.where(active_B[:, None], tlp_BK, 0.0)),
        )
    hit_B = active_B & jnp.any(
        tok_B[:, None] == jnp.asarray(st.stop_ids, jnp.int32).reshape(1, len(st.stop_ids)), axis=-1
    )
    return s._replace(
        step=s.step + 1,
        last_B=tok_B,
        done_B=s.done_B | hit_B | (s.step + 1 >= st.max_new_tokens),
        stopped_B=s.stopped_B | hit_B,
        n_gen_B=s.n_gen_B + active_B,
        tokens_BM=s.tokens_BM.at[:, s.step].set(jnp.where(active_B, tok_B, 0)),
        logprobs_BM=s.logprobs_BM.at[:, s.step].set(jnp.where(active_B, lp_B, 0.0)),
    )


def _generate_batch(params, prompts_BP, lengths_B, valid_B, index_B, key, *, cfg, st, cache_sharding):
    """Prefill + decode loop for one padded batch; returns tokens [B, M], logprobs [B, M], n_gen [B], stopped [B]."""
    B, P = prompts_BP.shape
    M = st.max_new_tokens
    cache = qwen3.init_cache(cfg, B, P + M)
    if cache_sharding is not None:
        cache = dict(cache, k=jax.lax.with_sharding_constraint(cache["k"], cache_sharding))
        cache["v"] = jax.lax.with_sharding_constraint(cache["v"], cache_sharding)
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, index_B)
    h_BPD, cache = qwen3.forward_cached(params, prompts_BP, cache, cfg=cfg, num_new=lengths_B, return_hidden=True)
    state = _State(
        step=jnp.int32(0),
        cache=cache,
        last_B=jnp.zeros((B,), jnp.int32),
        done_B=~valid_B,
        stopped_B=jnp.zeros((B,), bool),
        n_gen_B=jnp.zeros((B,), jnp.int32),
        tokens_BM=jnp.zeros((B, M), jnp.int32),
        logprobs_BM=jnp.zeros((B, M), jnp.float32),
        topk_ids_BMK=jnp.full((B, M, st.record_topk), -1, jnp.int32),
        topk_lp_BMK=jnp.zeros((B, M, st.record_topk), jnp.float32),
    )
    state = _record(state, _last_logits(params, h_BPD, lengths_B - 1, cfg), keys_B, st)

    def cond(s: _State) -> jax.Array:
        return (s.step < M) & ~jnp.all(s.done_B)

    def body(s: _State) -> _State:
        # Finished rows feed a dummy step with num_new=0, so their cache length (and slot use) stays put.
        h_B1D, cache = qwen3.forward_cached(
            params, s.last_B[:, None], s.cache, cfg=cfg, num_new=(~s.done_B).astype(jnp.int32), return_hidden=True
        )
        logits_BV = _last_logits(params, h_B1D, jnp.zeros((B,), jnp.int32), cfg)
        return _record(s._replace(cache=cache), logits_BV, keys_B, st)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens_BM, state.logprobs_BM, state.n_gen_B, state.stopped_B, state.topk_ids_BMK, state.topk_lp_BMK


_generate_batch_jit = jax.jit(_generate_batch, static_argnames=("cfg", "st", "cache_sharding"))


# --------------------------------------------------------------------------- host side


def prompt_bucket(length: int, minimum: int = 16) -> int:
    """Padded prompt length: the next power of two >= length (and >= minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(length, 1)))))


def _stop_ids(cfg: Qwen3Config, scfg: SamplingConfig) -> tuple[int, ...]:
    ids = list(scfg.stop_token_ids)
    if not scfg.ignore_eos and cfg.eos_token_id is not None:
        eos = cfg.eos_token_id
        ids += [eos] if isinstance(eos, int) else list(eos)
    return tuple(sorted(set(int(i) for i in ids)))


def _static(cfg: Qwen3Config, scfg: SamplingConfig) -> _Static:
    if scfg.record_topk > cfg.vocab_size:
        raise ValueError(f"SamplingConfig.record_topk {scfg.record_topk} > the vocabulary ({cfg.vocab_size})")
    return _Static(
        float(scfg.temperature),
        float(scfg.top_p),
        int(scfg.top_k),
        scfg.max_new_tokens,
        _stop_ids(cfg, scfg),
        int(scfg.record_topk),
    )


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the sampler needs at least one prompt token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size}): min {min(p)}, max {max(p)}")


def _pack(prompts, idx, batch_size, scfg) -> tuple[np.ndarray, ...]:
    """Right-pad the prompts ``idx`` into [batch_size, bucket]; missing rows are invalid dummies."""
    P = prompt_bucket(max(len(prompts[i]) for i in idx), scfg.min_prompt_bucket)
    tokens = np.zeros((batch_size, P), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    valid = np.zeros((batch_size,), bool)
    index = np.zeros((batch_size,), np.int32)
    for row, i in enumerate(idx):
        tokens[row, : len(prompts[i])] = prompts[i]
        lengths[row], valid[row], index[row] = len(prompts[i]), True, i
    return tokens, lengths, valid, index


def _place(arrays, mesh: Mesh | None, rules: sharding.Rules):
    if mesh is None:
        return arrays
    return tuple(jax.device_put(a, sharding.batch_sharding(mesh, a.ndim, rules)) for a in arrays)


def _cache_sharding(cfg: Qwen3Config, mesh: Mesh | None, batch: int, max_len: int, rules: sharding.Rules):
    if mesh is None:
        return None
    return sharding.shardings(qwen3.cache_specs(cfg, batch, max_len), mesh, rules)["k"]  # k and v alike


def _params_on_mesh(params: Params, cfg: Qwen3Config, mesh: Mesh, rules: sharding.Rules) -> Params:
    """Keep params already laid out on ``mesh`` (whatever their rules); place the others by ``rules``."""
    leaves = jax.tree.leaves(params)
    if all(isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh for x in leaves):
        return params
    return sharding.shard_params(params, qwen3.param_shardings(cfg, mesh, rules))


def generate_batches(
    params: Params,
    cfg: Qwen3Config,
    prompts: Sequence[Sequence[int]],
    sampling_cfg: SamplingConfig,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_size: int = 32,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> Iterator[tuple[list[int], list[SampleOutput]]]:
    """Like ``generate`` but yields (prompt indices, outputs) batch by batch, for streaming writers.

    Prompts are grouped by length (shortest first) so each batch pads to a tight power-of-two bucket.
    """
    _check_prompts(prompts, cfg.vocab_size)
    key = jax.random.key(sampling_cfg.seed) if key is None else key
    st = _static(cfg, sampling_cfg)
    if mesh is not None:
        shards = sharding.batch_shard_count(mesh, rules)
        batch_size = -(-batch_size // shards) * shards  # a whole number of rows per batch shard
        params = _params_on_mesh(params, cfg, mesh, rules)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        arrays = _pack(prompts, idx, batch_size, sampling_cfg)
        cache_sh = _cache_sharding(cfg, mesh, batch_size, arrays[0].shape[1] + st.max_new_tokens, rules)
        out = _generate_batch_jit(params, *_place(arrays, mesh, rules), key, cfg=cfg, st=st, cache_sharding=cache_sh)
        tokens, logprobs, n_gen, stopped, topk_ids, topk_lp = (np.asarray(a) for a in out)
        k = st.record_topk
        outputs = [
            SampleOutput(
                tokens[r, : n_gen[r]].copy(),
                logprobs[r, : n_gen[r]].copy(),
                "stop" if stopped[r] else "length",
                topk_ids[r, : n_gen[r]].copy() if k else None,
                topk_lp[r, : n_gen[r]].copy() if k else None,
            )
            for r in range(len(idx))
        ]
        yield idx, outputs


def generate(
    params: Params,
    cfg: Qwen3Config,
    prompts: Sequence[Sequence[int]],
    sampling_cfg: SamplingConfig,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_size: int = 32,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> list[SampleOutput]:
    """Sample a continuation of every prompt (token-id lists); outputs in prompt order.

    key: a ``jax.random.key``; defaults to ``key(sampling_cfg.seed)``. Same key -> same tokens.
    mesh: when given, params not yet on it are placed by ``qwen3.param_shardings(cfg, mesh, rules)``, and
    the batch and KV cache are split over the ``batch`` rule's mesh axes (batch_size is rounded up to a
    multiple of their size).
    """
    results: list[Any] = [None] * len(prompts)
    for idx, outputs in generate_batches(params, cfg, prompts, sampling_cfg, key, mesh, batch_size, rules):
        for i, out in zip(idx, outputs):
            results[i] = out
    return results
