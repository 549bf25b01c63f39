"""Token log-probs (chunked, memory-safe), the OPD objective, SFT cross entropy and their diagnostics.

Every loss has the signature ``loss_fn(params, batch, *, cfg, loss_cfg) -> (loss, metrics)``. Besides namespaced
diagnostics, ``metrics["data/loss_denominator"]`` holds the count the loss was divided by (sequences for
``sample_mean``, response tokens for ``token_mean``): ``update.make_update_step`` weights micro-batches by it, so
gradient accumulation equals one big batch normalised by the GLOBAL count.

Shapes: B batch, T time, D embed, V vocab, C tokens per chunk, J number of chunks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lopd_jax.config.schema import check_choices
from lopd_jax.data.batch import Batch
from lopd_jax.models import qwen3

Metrics = dict[str, jax.Array]
DEFAULT_CHUNK_SIZE = 512  # tokens per row per chunk: [B, 512, 151936] fp32 is 311 MB per row


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Settings of the OPD / SFT losses; defaults are the reference's."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    normalization: Literal["sample_mean", "token_mean"] = "sample_mean"  # sample_mean: the reference
    tis_cap: float | None = None  # truncated importance sampling cap C; None = off
    # pi_old of the PPO ratio and advantage: "current" = stop_gradient(pi_theta) (the reference: one step per batch,
    # ratio 1); "behavior" = the rollout policy's recorded log-probs, so the clip bounds the drift from it.
    old_policy: Literal["current", "behavior"] = "current"
    logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE  # tokens per chunk; 0 = no chunking
    compute_entropy: bool = False
    # What the OPD modes minimise: "sampled_token" (the reference: PPO-clip with A_t = log p_T - log pi_old on the
    # one sampled token), or an exact KL over K + 1 buckets (K stored ids and the rest of the vocabulary) from the
    # store: "topk_reverse_kl" = KL(student || teacher) over the rollout policy's top-K ids (precompute.rollouts
    # --record-topk K, scored by teacher_logprobs --engine jax), "topk_forward_kl" = KL(teacher || student) over
    # the teacher's own top-K ids (teacher_logprobs --top-k K).
    objective: Literal["sampled_token", "topk_reverse_kl", "topk_forward_kl"] = "sampled_token"
    topk: int = 0  # K of a topk_* objective: must equal the store's
    # topk_* objectives: loss = (1 - w) * KL + w * (the sampled-token loss); 0 = the KL alone.
    sampled_token_weight: float = 0.0

    def __post_init__(self):
        check_choices(self, "loss")
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError("loss.clip_eps_low and loss.clip_eps_high must be >= 0")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"loss.tis_cap must be > 0 or None, got {self.tis_cap}")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 0:
            raise ValueError(f"loss.logprob_chunk_size must be >= 0 or None, got {self.logprob_chunk_size}")
        if self.objective == "sampled_token":
            if self.topk or self.sampled_token_weight:
                raise ValueError(
                    "loss.topk and loss.sampled_token_weight belong to a topk_* loss.objective; objective is "
                    "sampled_token"
                )
        elif self.topk <= 0:
            raise ValueError(
                f"loss.topk must be >= 1 for loss.objective {self.objective} (K of the store), got {self.topk}"
            )
        if not 0.0 <= self.sampled_token_weight <= 1.0:
            raise ValueError(f"loss.sampled_token_weight must be in [0, 1], got {self.sampled_token_weight}")

    @property
    def topk_columns(self) -> str:
        """The stored ids a topk_* objective's buckets are ("behavior" / "teacher"); "" for sampled_token."""
        return {"topk_reverse_kl": "behavior", "topk_forward_kl": "teacher"}.get(self.objective, "")


# ----------------------------------------------------------------------------------------------------------------
# Token log-probs
# ----------------------------------------------------------------------------------------------------------------


def _chunk_logprobs(w_DV: jax.Array, h_BCD: jax.Array, tgt_BC: jax.Array, dtype, entropy: bool):
    """log p(targets) [B, C] (and entropy [B, C]) for one chunk; logits live only inside this function."""
    acc = qwen3.stat_dtype(dtype)  # fp32 logits (float64 in the float64 identity tests)
    logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD.astype(dtype), w_DV.astype(dtype), preferred_element_type=acc)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    # A masked sum instead of a gather along V: with V sharded over "tensor" it stays a local reduce + all-reduce.
    hit_BCV = jnp.arange(logits_BCV.shape[-1], dtype=tgt_BC.dtype) == tgt_BC[..., None]
    tgt_logit_BC = jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1)
    lp_BC = tgt_logit_BC - lse_BC
    if not entropy:
        return lp_BC, jnp.zeros_like(lp_BC)
    # -sum p log p on the normalised log-probs: lse - sum(p * logits) cancels catastrophically for large logits.
    logp_BCV = logits_BCV - lse_BC[..., None]
    ent_BC = -jnp.sum(jnp.exp(logp_BCV) * logp_BCV, axis=-1)
    return lp_BC, ent_BC


def token_logprobs(
    params: dict[str, Any],
    hidden: jax.Array,
    targets: jax.Array,
    *,
    cfg,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """fp32 log p(targets[b, t] | prefix) from the final hidden states, never holding [B, T, V] fp32 logits.

    Args:
      params: model params; only the lm_head ([D, V], or embed [V, D] when tied) is read.
      hidden: [B, T, D] hidden states after the final norm (``qwen3.forward(..., return_hidden=True)``).
      targets: [B, T] int token ids.
      cfg: the model's Qwen3Config; ``cfg.dtype`` is the matmul operand dtype (accumulation is fp32).
      chunk_size: tokens per chunk along T (None = DEFAULT_CHUNK_SIZE, 0 = one chunk, i.e. unchunked). The
        chunks run in a ``lax.scan`` whose body is rematerialised, so the backward pass holds one chunk's logits
        at a time. T need not be a multiple of it (the tail is padded).
      return_entropy: also return the policy entropy per token [B, T].

    Returns:
      logprobs [B, T] fp32, or (logprobs, entropy) when ``return_entropy``.
    """
    B, T, _ = hidden.shape
    if targets.shape != (B, T):
        raise ValueError(f"token_logprobs: targets shape {targets.shape} != hidden[:2] {(B, T)}")
    w_DV = qwen3.lm_head_weight(params, cfg)
    dtype = jnp.dtype(cfg.dtype)
    C = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    C = T if C == 0 else min(C, T)
    if C == T:
        lp, ent = _chunk_logprobs(w_DV, hidden, targets, dtype, return_entropy)
        return (lp, ent) if return_entropy else lp
    J = -(-T // C)
    pad = J * C - T
    h_JBCD = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, J, C, -1).swapaxes(0, 1)
    tgt_JBC = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, J, C).swapaxes(0, 1)

    # Rematerialise the chunk in the backward pass: only h/targets chunks are saved, never logits.
    @jax.checkpoint
    def body(w, xs):
        h_BCD, tgt_BC = xs
        return _chunk_logprobs(w, h_BCD, tgt_BC, dtype, return_entropy)

    _, (lp_JBC, ent_JBC) = jax.lax.scan(lambda carry, xs: (carry, body(w_DV, xs)), None, (h_JBCD, tgt_JBC))
    lp = lp_JBC.swapaxes(0, 1).reshape(B, J * C)[:, :T]
    if not return_entropy:
        return lp
    return lp, ent_JBC.swapaxes(0, 1).reshape(B, J * C)[:, :T]


# ----------------------------------------------------------------------------------------------------------------
# Top-k buckets: log-probs at K given ids and the log-mass of the rest of the vocabulary (the tail)
# ----------------------------------------------------------------------------------------------------------------


def bucket_logprobs(logits: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p at ``ids`` and the tail log(1 - sum_k p(ids_k)) of p = softmax(logits), computed in log space.

    Args:
      logits: [..., V] float logits (fp32 or float64; the results have their dtype).
      ids: [..., K] int ids, distinct within a row; an id < 0 (or >= V) matches nothing (its log-prob is then
        -logsumexp(logits), finite, and it leaves the tail alone): padding rows stay finite.

    Returns:
      (logprobs [..., K], tail [..., ]): the tail is logsumexp over the ids NOT in the row less logsumexp over
      all, so it is exact for any mass (no 1 - sum cancellation); -inf exactly when the ids cover the vocabulary
      (an empty tail bucket), with a zero, not NaN, gradient. Each id is a masked sum over V (not a gather), so
      a V sharded over "tensor" stays a local reduce + all-reduce, as in ``token_logprobs``.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jnp.arange(logits.shape[-1], dtype=ids.dtype)
    in_set = jnp.zeros(logits.shape, bool)
    picked = []
    for k in range(ids.shape[-1]):  # K passes over [..., V]: cheap next to the [D, V] matmul for K << D
        hit = vocab == ids[..., k, None]
        in_set = in_set | hit
        picked.append(jnp.sum(jnp.where(hit, logits, 0.0), axis=-1))
    lp = jnp.stack(picked, axis=-1) - lse[..., None]
    empty = jnp.all(in_set, axis=-1)
    # Double where: an all -inf logsumexp has a NaN gradient even where its value is not selected.
    rest = jnp.where(in_set | empty[..., None], jnp.where(empty[..., None], 0.0, -jnp.inf), logits)
    tail = jnp.where(empty, -jnp.inf, jax.nn.logsumexp(rest, axis=-1) - lse)
    return lp, tail


def _chunk_topk(w_DV: jax.Array, h_BCD: jax.Array, tgt_BC: jax.Array, ids_BCK: jax.Array, dtype):
    """log p(targets) [B, C], log p(ids) [B, C, K] and the tail [B, C] of one chunk (logits live only here)."""
    acc = qwen3.stat_dtype(dtype)
    logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD.astype(dtype), w_DV.astype(dtype), preferred_element_type=acc)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    hit_BCV = jnp.arange(logits_BCV.shape[-1], dtype=tgt_BC.dtype) == tgt_BC[..., None]
    lp_BC = jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1) - lse_BC
    lp_BCK, tail_BC = bucket_logprobs(logits_BCV, ids_BCK)
    return lp_BC, lp_BCK, tail_BC


def topk_logprobs(
    params: dict[str, Any],
    hidden: jax.Array,
    targets: jax.Array,
    ids: jax.Array,
    *,
    cfg,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``token_logprobs`` plus the top-k buckets: log p(targets) [B, T], log p(ids) [B, T, K] and the tail
    log(1 - sum_k p(ids_k)) [B, T], fp32 (float64 under x64 with float64 params), chunked along T the same way
    (a ``lax.scan`` over rematerialised chunks: no [B, T, V] fp32 logits, one chunk's in the backward pass).

    Args:
      params, hidden, targets, cfg, chunk_size: as ``token_logprobs``.
      ids: [B, T, K] int32 bucket ids of each position (``bucket_logprobs``: -1 where there are none).
    """
    B, T, _ = hidden.shape
    if targets.shape != (B, T) or ids.shape[:2] != (B, T):
        raise ValueError(f"topk_logprobs: targets {targets.shape} / ids {ids.shape} do not match hidden {(B, T)}")
    w_DV = qwen3.lm_head_weight(params, cfg)
    dtype = jnp.dtype(cfg.dtype)
    C = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    C = T if C == 0 else min(C, T)
    if C == T:
        return _chunk_topk(w_DV, hidden, targets, ids, dtype)
    J = -(-T // C)
    pad = J * C - T
    h_JBCD = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, J, C, -1).swapaxes(0, 1)
    tgt_JBC = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, J, C).swapaxes(0, 1)
    ids_JBCK = jnp.pad(ids, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(B, J, C, -1).swapaxes(0, 1)

    @jax.checkpoint
    def body(w, xs):
        return _chunk_topk(w, *xs, dtype)

    _, outs = jax.lax.scan(lambda carry, xs: (carry, body(w_DV, xs)), None, (h_JBCD, tgt_JBC, ids_JBCK))
    return tuple(x.swapaxes(0, 1).reshape(B, J * C, *x.shape[3:])[:, :T] for x in outs)


def _plogp_ratio(la: jax.Array, lb: jax.Array) -> jax.Array:
    """a * (log a - log b) from log a, log b; 0 where a = 0 (la = -inf), with a finite gradient there."""
    zero = la == -jnp.inf
    la_safe, lb_safe = jnp.where(zero, 0.0, la), jnp.where(zero, 0.0, lb)
    return jnp.where(zero, 0.0, jnp.exp(la_safe) * (la_safe - lb_safe))


def bucket_kl(logq: jax.Array, logq_tail: jax.Array, logp: jax.Array, logp_tail: jax.Array) -> jax.Array:
    """KL(q || p) over K + 1 buckets (K ids and the tail), exactly: sum_k q_k log(q_k / p_k) + q_tail log(q_tail /
    p_tail). Shapes [..., K] and [...]; returns [...].

    Both arguments are normalised bucket distributions (``bucket_logprobs``), so the value is a KL divergence, >= 0
    by Gibbs' inequality (up to float rounding: 0 exactly when q = p), with no clamp. A bucket with q = 0 adds 0;
    one with q > 0 and p = 0 adds +inf (the KL is infinite). Reverse KL is ``bucket_kl(student, teacher)``, forward
    KL ``bucket_kl(teacher, student)``.
    """
    return jnp.sum(_plogp_ratio(logq, logp), axis=-1) + _plogp_ratio(logq_tail, logp_tail)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------


def _sequence_weights(batch: Batch, normalization: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token weights w [B, T] with loss = sum(w * per_token_loss) / denominator.

    sample_mean: w_t = mask_t / (response tokens of t's sequence); denominator = sequences with >= 1 response
    token. A sequence is (batch row, segment id > 0): packed sequences never share a row segment.
    token_mean: w_t = mask_t; denominator = response tokens. Returns (w, denominator, number of sequences).
    """
    # fp32 weights (float64 in the float64 identity tests: an fp32 1 / count would cap them at ~3e-8 relative).
    mask = batch.loss_mask.astype(qwen3.stat_dtype(batch.loss_mask.dtype)) * (batch.segment_ids > 0)
    B, T = mask.shape
    # Unique id per (row, segment); segment ids are < T + 1 because each segment holds >= 1 token.
    seq_id = (jnp.arange(B, dtype=jnp.int32)[:, None] * (T + 1) + batch.segment_ids).reshape(-1)
    counts = jax.ops.segment_sum(mask.reshape(-1), seq_id, num_segments=B * (T + 1))
    num_seqs = jnp.sum((counts > 0).astype(jnp.float32))
    if normalization == "token_mean":
        return mask, jnp.sum(mask), num_seqs
    per_tok_count = counts[seq_id].reshape(B, T)
    w = mask / jnp.maximum(per_tok_count, 1.0)
    return w, num_seqs, num_seqs


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
    mean = _masked_mean(x, mask)
    return jnp.sqrt(_masked_mean(jnp.square(x - mean), mask))


def batch_logprobs(params, batch: Batch, *, cfg, chunk_size: int | None = None, return_entropy: bool = False):
    """log p(batch.targets) [B, T] under the model ``params`` (packed segments, positions), fp32; with
    ``return_entropy`` also the entropy [B, T]. The policy's in the losses, the teacher's in online OPD."""
    hidden = qwen3.forward(
        params,
        batch.inputs,
        cfg=cfg,
        positions=batch.positions,
        segment_ids=batch.segment_ids,
        return_hidden=True,
    )
    return token_logprobs(params, hidden, batch.targets, cfg=cfg, chunk_size=chunk_size, return_entropy=return_entropy)


def _policy_logprobs(params, batch: Batch, cfg, loss_cfg: LossConfig):
    """Current policy log p(targets) [B, T] and entropy [B, T] (None unless loss_cfg.compute_entropy)."""
    out = batch_logprobs(
        params, batch, cfg=cfg, chunk_size=loss_cfg.logprob_chunk_size, return_entropy=loss_cfg.compute_entropy
    )
    return out if loss_cfg.compute_entropy else (out, None)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def ppo_clip_surrogate(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, eps_low: float, eps_high: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clip loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old) [B, T].

    Returns (loss [B, T], clipped [B, T] float, 1 where the clipped branch is the active one).
    """
    ratio = jnp.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def behavior_kl_metrics(logp: jax.Array, behavior_logp: jax.Array, mask: jax.Array) -> Metrics:
    """KL between the current policy and the behaviour policy that sampled the tokens, plus importance weights.

    Tokens come from pi_b, so with log w = log pi - log pi_b: KL(pi_b || pi) is k1 = E[-log w] and
    k3 = E[w - 1 - log w]; KL(pi || pi_b) by importance weighting is k1 = E[w log w] and k3 = E[1 - w + w log w].
    """
    log_w = jax.lax.stop_gradient(logp - behavior_logp) * mask
    w = jnp.exp(log_w)
    k3 = w - 1.0 - log_w
    return {
        "opd/kl_behavior": _masked_mean(k3, mask),
        "opd/kl_behavior_k1": _masked_mean(-log_w, mask),
        "opd/kl_behavior_k3": _masked_mean(k3, mask),
        "opd/kl_behavior_rev_k1": _masked_mean(w * log_w, mask),
        "opd/kl_behavior_rev_k3": _masked_mean(1.0 - w + w * log_w, mask),
        "opd/iw_mean": _masked_mean(w, mask),
        "opd/iw_std": _masked_std(w, mask),
        "opd/iw_max": jnp.max(jnp.where(mask > 0, w, 0.0)),
        "opd/iw_ess": importance_ess(log_w, mask),
    }


def importance_ess(log_w: jax.Array, mask: jax.Array) -> jax.Array:
    """Normalised effective sample size (sum w)^2 / (N sum w^2) of w = exp(log_w) over the N tokens where
    mask > 0; shapes [B, T]. Computed in log space (w^2 overflows fp32 once log w > 44); 1.0 for an empty mask."""
    on = mask > 0
    lse1 = jax.nn.logsumexp(jnp.where(on, log_w, -jnp.inf))
    lse2 = jax.nn.logsumexp(jnp.where(on, 2.0 * log_w, -jnp.inf))
    n = jnp.sum(on.astype(jnp.float32))
    ess = jnp.exp(2.0 * lse1 - lse2 - jnp.log(jnp.maximum(n, 1.0)))
    return jnp.where(n > 0, ess, 1.0)


def opd_loss(
    params: dict[str, Any],
    batch: Batch,
    *,
    cfg,
    loss_cfg: LossConfig,
    old_logprobs: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """The (Lightning) OPD objective: PPO-clip policy gradient with advantage A_t = log p_T - log pi_old.

    Args:
      params: student params.
      batch: a Batch with teacher_logprobs (and behavior_logprobs for TIS / diagnostics), all [B, T].
      cfg: the model's Qwen3Config.
      loss_cfg: LossConfig (clip eps, normalisation, TIS cap, chunk size, entropy).
      old_logprobs: [B, T] log pi_old(targets); None = per loss_cfg.old_policy: stop_gradient(current), exact
        when one optimizer step is taken per batch (the ratio is then 1 and one forward pass serves), or
        batch.behavior_logprobs (the policy that sampled the rollouts; masked tokens are ignored).

    Returns:
      (scalar loss, metrics). The loss is normalised per loss_cfg.normalization; see the module docstring.
    """
    if old_logprobs is not None and old_logprobs.shape != batch.targets.shape:
        raise ValueError(f"opd_loss: old_logprobs shape {old_logprobs.shape} != batch shape {batch.targets.shape}")
    logp, ent = _policy_logprobs(params, batch, cfg, loss_cfg)
    mask = batch.loss_mask.astype(jnp.float32) * (batch.segment_ids > 0)
    w, denom, n_seq = _sequence_weights(batch, loss_cfg.normalization)
    loss, metrics = _sampled_token_term(logp, batch, loss_cfg, old_logprobs, mask, w, denom)
    metrics |= _data_metrics(mask, n_seq, denom)
    if ent is not None:
        metrics["opd/entropy"] = _masked_mean(jax.lax.stop_gradient(ent), mask)
    return loss, metrics


def _sampled_token_term(logp, batch: Batch, loss_cfg: LossConfig, old_logprobs, mask, w, denom):
    """The OPD objective's loss and metrics from the policy's log p(targets) [B, T] (``opd_loss``)."""
    if old_logprobs is None and loss_cfg.old_policy == "behavior":
        old_logprobs = jnp.where(mask > 0, batch.behavior_logprobs, 0.0)
    old = jax.lax.stop_gradient(logp if old_logprobs is None else old_logprobs.astype(jnp.float32))
    adv = (batch.teacher_logprobs - old) * mask
    pg, clipped = ppo_clip_surrogate(logp, old, adv, loss_cfg.clip_eps_low, loss_cfg.clip_eps_high)
    if loss_cfg.tis_cap is not None:
        # Truncated importance sampling: correct for rollouts sampled by pi_behavior instead of pi_old.
        pg = pg * jnp.minimum(jnp.exp(old - batch.behavior_logprobs), loss_cfg.tis_cap)
    loss = jnp.sum(w * pg) / jnp.maximum(denom, 1.0)
    sg_logp = jax.lax.stop_gradient(logp)
    metrics = {
        "opd/pg_loss": loss,
        "opd/adv_mean": _masked_mean(adv, mask),
        "opd/adv_std": _masked_std(adv, mask),
        "opd/teacher_student_gap": _masked_mean(batch.teacher_logprobs - sg_logp, mask),
        "opd/clip_frac": _masked_mean(clipped, mask),
        **behavior_kl_metrics(sg_logp, batch.behavior_logprobs, mask),
    }
    return loss, metrics


def topk_kl_per_token(student_logp, student_tail, batch: Batch, objective: str) -> jax.Array:
    """The per-position KL [B, T] of a topk_* objective from the student's bucket log-probs [B, T, K] / tail
    [B, T] (``topk_logprobs``) and the batch's teacher buckets (``topk_teacher_logprobs`` / ``_tail``):
    ``topk_reverse_kl`` = KL(student || teacher), ``topk_forward_kl`` = KL(teacher || student) (``bucket_kl``)."""
    t_lp, t_tail = batch.topk_teacher_logprobs, batch.topk_teacher_tail
    if objective == "topk_reverse_kl":
        return bucket_kl(student_logp, student_tail, t_lp, t_tail)
    if objective == "topk_forward_kl":
        return bucket_kl(t_lp, t_tail, student_logp, student_tail)
    raise ValueError(f"topk_kl_per_token: objective {objective!r} is not a topk_* objective")


def topk_opd_loss(
    params: dict[str, Any],
    batch: Batch,
    *,
    cfg,
    loss_cfg: LossConfig,
    old_logprobs: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """A topk_* objective: the exact KL over the K stored ids + the tail bucket at every response token,
    normalised per ``loss_cfg.normalization`` (token_mean: the mean over response tokens), mixed with the
    sampled-token OPD loss as (1 - w) * KL + w * that loss (w = ``loss_cfg.sampled_token_weight``; 0: the KL).

    Args:
      params, cfg, loss_cfg, old_logprobs: as ``opd_loss``.
      batch: a Batch with the top-k fields (``topk_ids`` [B, T, K], ``topk_teacher_logprobs`` [B, T, K],
        ``topk_teacher_tail`` [B, T]) besides ``opd_loss``'s.

    Returns:
      (scalar loss, metrics): ``topk/kl`` is the normalised KL (the loss itself when w = 0), ``topk/kl_token_mean``
      its token mean, ``topk/student_tail`` / ``topk/teacher_tail`` the mean tail masses (how much the K ids miss).
    """
    if batch.topk_ids is None or batch.topk_ids.shape[-1] != loss_cfg.topk:
        got = None if batch.topk_ids is None else batch.topk_ids.shape
        raise ValueError(f"topk_opd_loss: batch.topk_ids {got} does not hold loss.topk = {loss_cfg.topk} ids")
    hidden = qwen3.forward(
        params, batch.inputs, cfg=cfg, positions=batch.positions, segment_ids=batch.segment_ids, return_hidden=True
    )
    logp, q_lp, q_tail = topk_logprobs(
        params, hidden, batch.targets, batch.topk_ids, cfg=cfg, chunk_size=loss_cfg.logprob_chunk_size
    )
    mask = batch.loss_mask.astype(jnp.float32) * (batch.segment_ids > 0)
    on = mask > 0
    # Off the loss the teacher fields are 0 / ids -1: keep every term finite there (where, not multiply).
    kl = jnp.where(on, topk_kl_per_token(q_lp, q_tail, batch, loss_cfg.objective), 0.0)
    w, denom, n_seq = _sequence_weights(batch, loss_cfg.normalization)
    kl_loss = jnp.sum(w * kl) / jnp.maximum(denom, 1.0)
    sg = jax.lax.stop_gradient
    metrics = {
        "topk/kl": kl_loss,
        "topk/kl_token_mean": _masked_mean(sg(kl), mask),
        "topk/student_tail": _masked_mean(jnp.where(on, jnp.exp(sg(q_tail)), 0.0), mask),
        "topk/teacher_tail": _masked_mean(jnp.where(on, jnp.exp(batch.topk_teacher_tail), 0.0), mask),
        **_data_metrics(mask, n_seq, denom),
    }
    loss = kl_loss
    if loss_cfg.sampled_token_weight > 0:
        pg_loss, pg_metrics = _sampled_token_term(logp, batch, loss_cfg, old_logprobs, mask, w, denom)
        loss = (1.0 - loss_cfg.sampled_token_weight) * kl_loss + loss_cfg.sampled_token_weight * pg_loss
        metrics |= pg_metrics
    else:
        metrics |= behavior_kl_metrics(sg(logp), batch.behavior_logprobs, mask)
    return loss, metrics


def objective_loss(params: dict[str, Any], batch: Batch, *, cfg, loss_cfg: LossConfig) -> tuple[jax.Array, Metrics]:
    """The OPD modes' loss for ``loss_cfg.objective``: ``opd_loss`` (sampled_token) or ``topk_opd_loss``."""
    fn = opd_loss if loss_cfg.objective == "sampled_token" else topk_opd_loss
    return fn(params, batch, cfg=cfg, loss_cfg=loss_cfg)


def sft_loss(params: dict[str, Any], batch: Batch, *, cfg, loss_cfg: LossConfig) -> tuple[jax.Array, Metrics]:
    """Token-level cross entropy -log p(targets) on loss_mask, normalised like opd_loss.

    Args:
      params: model params. batch: a Batch ([B, T] fields; teacher/behavior columns are ignored).
      cfg: the model's Qwen3Config. loss_cfg: LossConfig (normalisation, chunk size, entropy).

    Returns:
      (scalar loss, metrics with sft/nll = the token-mean NLL whatever the normalisation).
    """
    logp, ent = _policy_logprobs(params, batch, cfg, loss_cfg)
    mask = batch.loss_mask.astype(jnp.float32) * (batch.segment_ids > 0)
    w, denom, n_seq = _sequence_weights(batch, loss_cfg.normalization)
    loss = -jnp.sum(w * logp) / jnp.maximum(denom, 1.0)
    metrics = {"sft/nll": _masked_mean(-jax.lax.stop_gradient(logp), mask), **_data_metrics(mask, n_seq, denom)}
    if ent is not None:
        metrics["sft/entropy"] = _masked_mean(jax.lax.stop_gradient(ent), mask)
    return loss, metrics


def _data_metrics(mask: jax.Array, n_seq: jax.Array, denom: jax.Array) -> Metrics:
    return {"data/tokens": jnp.sum(mask), "data/sequences": n_seq, "data/loss_denominator": denom}
