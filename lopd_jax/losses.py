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

from lopd_jax.batch import Batch
from lopd_jax.drift import importance_ess
from lopd_jax.models import qwen3
from lopd_jax.schema import check_choices

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

    def __post_init__(self):
        check_choices(self, "loss")
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError("loss.clip_eps_low and loss.clip_eps_high must be >= 0")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"loss.tis_cap must be > 0 or None, got {self.tis_cap}")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 0:
            raise ValueError(f"loss.logprob_chunk_size must be >= 0 or None, got {self.logprob_chunk_size}")


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
    if old_logprobs is None and loss_cfg.old_policy == "behavior":
        old_logprobs = jnp.where(mask > 0, batch.behavior_logprobs, 0.0)
    old = jax.lax.stop_gradient(logp if old_logprobs is None else old_logprobs.astype(jnp.float32))
    adv = (batch.teacher_logprobs - old) * mask
    pg, clipped = ppo_clip_surrogate(logp, old, adv, loss_cfg.clip_eps_low, loss_cfg.clip_eps_high)
    if loss_cfg.tis_cap is not None:
        # Truncated importance sampling: correct for rollouts sampled by pi_behavior instead of pi_old.
        pg = pg * jnp.minimum(jnp.exp(old - batch.behavior_logprobs), loss_cfg.tis_cap)
    w, denom, n_seq = _sequence_weights(batch, loss_cfg.normalization)
    loss = jnp.sum(w * pg) / jnp.maximum(denom, 1.0)
    sg_logp = jax.lax.stop_gradient(logp)
    metrics = {
        "opd/pg_loss": loss,
        "opd/adv_mean": _masked_mean(adv, mask),
        "opd/adv_std": _masked_std(adv, mask),
        "opd/teacher_student_gap": _masked_mean(batch.teacher_logprobs - sg_logp, mask),
        "opd/clip_frac": _masked_mean(clipped, mask),
        **behavior_kl_metrics(sg_logp, batch.behavior_logprobs, mask),
        **_data_metrics(mask, n_seq, denom),
    }
    if ent is not None:
        metrics["opd/entropy"] = _masked_mean(jax.lax.stop_gradient(ent), mask)
    return loss, metrics


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
