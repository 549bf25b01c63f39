"""How far the student has moved from the policies whose samples it learns on.

Two measurements (docs/drift.md):

* Per step, on the training batch, against the *rollout* policy pi_b that sampled the batch (the behaviour
  log-probs of the store): the KL estimators k1 / k3 in both directions and the importance weights
  w = pi_theta / pi_b (``losses.behavior_kl_metrics``), and the weights' effective sample size
  ``importance_ess`` = (sum w)^2 / (N sum w^2) over the batch's N response tokens (1: pi_theta = pi_b on the
  batch; 1/N: one token carries all the weight).
* Every evaluation, a direct estimate of KL(pi_student || pi_ref) on fresh samples: the student samples
  ``drift.ref_kl_prompts`` held-out prompts at temperature 1 (its own distribution, no top-p), and both the
  student and pi_ref (the init checkpoint, ``model.init``) score the sampled tokens with the trainer's forward.
  With r_t = pi_ref(y_t | y_<t) / pi_student(y_t | y_<t) per response token:

    k1 = - sum_t log r_t          (unbiased for the sequence KL; can be negative on one sample)
    k3 = sum_t (r_t - 1 - log r_t)  (each term is >= 0 and unbiased for the KL of position t given its prefix,
                                     so the sum is unbiased for the sequence KL too, with lower variance)

  both in nats per sequence (responses end at the stop ids or at ``max_new_tokens``: the KL of that truncated
  distribution). ``drift/kl_ref_k1_stderr`` is the standard error of the k1 mean over the samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lopd_jax import losses
from lopd_jax.config.errors import ConfigError
from lopd_jax.data import prompts as prompts_lib
from lopd_jax.inference import evaluation, sampling
from lopd_jax.training.online_opd import samples_to_batch

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """The direct KL(pi_student || pi_ref) estimate at every evaluation (``train.eval_every``)."""

    ref_kl_prompts: int = 0  # held-out prompts (the first of eval.prompts) sampled for it; 0 = off
    ref_kl_samples: int = 1  # samples per prompt
    ref_kl_max_new_tokens: int = 0  # response length cap; 0 = eval.max_new_tokens

    def __post_init__(self):
        for name in ("ref_kl_prompts", "ref_kl_max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"drift.{name} must be >= 0, got {getattr(self, name)}")
        if self.ref_kl_samples < 1:
            raise ValueError(f"drift.ref_kl_samples must be >= 1, got {self.ref_kl_samples}")


# ----------------------------------------------------------------------------------------------------------------
# Per-step estimators on the training batch
# ----------------------------------------------------------------------------------------------------------------


def sequence_kl_terms(logp_pi: np.ndarray, logp_ref: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence k1 and k3 sums [B] (float64) of KL(pi || ref) for tokens sampled from pi; inputs [B, T]."""
    logp_pi, logp_ref = np.asarray(logp_pi, np.float64), np.asarray(logp_ref, np.float64)
    on = np.asarray(mask) > 0
    log_r = np.where(on, logp_ref - logp_pi, 0.0)
    k1 = -log_r.sum(axis=1)
    k3 = np.where(on, np.expm1(log_r) - log_r, 0.0).sum(axis=1)
    return k1, k3


def ref_kl_summary(k1: np.ndarray, k3: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """The logged ``drift/kl_ref_*`` numbers from per-sequence k1 / k3 sums and response lengths [N]."""
    n = len(k1)
    total = max(float(np.sum(tokens)), 1.0)
    return {
        "drift/kl_ref_k1": float(np.mean(k1)),
        "drift/kl_ref_k3": float(np.mean(k3)),
        "drift/kl_ref_k1_stderr": float(np.std(k1, ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "drift/kl_ref_k3_per_token": float(np.sum(k3) / total),
        "drift/kl_ref_tokens": float(np.sum(tokens)),
    }


# ----------------------------------------------------------------------------------------------------------------
# The direct estimate on fresh samples
# ----------------------------------------------------------------------------------------------------------------


class RefKL:
    """``(student params, step) -> drift/kl_ref_* metrics``: student samples of held-out prompts scored by both.

    Args:
      ref_params: pi_ref's params (the init checkpoint), on the same mesh as the student's.
      model_cfg: the Qwen3Config both share (pi_ref is the student's own init).
      prompts: encoded prompts (token-id lists); each is sampled ``samples`` times.
      stop_ids: the ids sampling stops at (``prompts.stop_ids``), as every other sampler in the run.
      seq_len: rows of the scoring batch (prompt + response are cut to seq_len + 1 tokens, like training rows).
    """

    def __init__(
        self,
        *,
        ref_params: Any,
        model_cfg: Any,
        prompts: Sequence[Sequence[int]],
        samples: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        seed: int,
        mesh: Any,
        batch_size: int,
        seq_len: int,
        place: Callable[[Any], Any] | None = None,
        chunk_size: int | None = None,
    ):

        self.ref_params, self.cfg, self.mesh = ref_params, model_cfg, mesh
        self.prompts = [list(p) for p in prompts] * samples
        self.scfg = sampling.SamplingConfig(
            temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids), ignore_eos=True
        )
        self.key = jax.random.fold_in(jax.random.key(seed), 0x6B6C)  # not the eval's key: other samples
        self.batch_size, self.seq_len = batch_size, seq_len
        self.place = place or (lambda b: b)
        self.score = jax.jit(lambda p, b: losses.batch_logprobs(p, b, cfg=model_cfg, chunk_size=chunk_size))

    def sample(self, params: Any, step: int):

        key = jax.random.fold_in(self.key, step)
        return sampling.generate(params, self.cfg, self.prompts, self.scfg, key, self.mesh, self.batch_size)

    def terms(self, params: Any, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-sequence (k1, k3, response tokens) [N] of KL(student || ref) on this step's samples."""

        outs = self.sample(params, step)
        k1s, k3s, toks = [], [], []
        for lo in range(0, len(outs), self.batch_size):
            chunk_p, chunk_o = self.prompts[lo : lo + self.batch_size], outs[lo : lo + self.batch_size]
            pad = self.batch_size - len(chunk_p)  # a full batch: one compile for every chunk
            host, _ = samples_to_batch(chunk_p + chunk_p[:1] * pad, chunk_o + chunk_o[:1] * pad, seq_len=self.seq_len)
            batch = self.place(host)
            lp_s, lp_r = jax.device_get((self.score(params, batch), self.score(self.ref_params, batch)))
            mask = np.asarray(host.loss_mask)[: len(chunk_p)]
            k1, k3 = sequence_kl_terms(lp_s[: len(chunk_p)], lp_r[: len(chunk_p)], mask)
            k1s.append(k1), k3s.append(k3), toks.append(mask.sum(axis=1))
        return np.concatenate(k1s), np.concatenate(k3s), np.concatenate(toks)

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        return ref_kl_summary(*self.terms(params, step))


def with_ref_kl(evaluator: Callable | None, ref_kl: RefKL | None) -> Callable | None:
    """The run's evaluator extended with the ``drift/kl_ref_*`` metrics (either may be None)."""
    if ref_kl is None:
        return evaluator

    def both(params: Any, step: int) -> dict[str, float]:
        out = dict(evaluator(params, step)) if evaluator is not None else {}
        return {**out, **ref_kl(params, step)}

    return both


def check(run_cfg: Any) -> None:
    """The config can run the direct estimate: it needs pi_ref's weights and held-out prompts (ConfigError)."""

    if run_cfg.drift.ref_kl_prompts == 0:
        return
    if not run_cfg.eval.prompts:
        raise ConfigError("drift.ref_kl_prompts: needs eval.prompts (the held-out prompts it samples)")
    if run_cfg.model.init in ("", "scratch"):
        raise ConfigError(
            "drift.ref_kl_prompts: needs model.init to be a checkpoint (pi_ref); this run starts from scratch"
        )


def build_ref_kl(run_cfg: Any, setup: Any, load_ref: Callable[[], Any], place: Callable | None) -> RefKL | None:
    """The run's ``RefKL`` (None when ``drift.ref_kl_prompts`` is 0): the first prompts of ``eval.prompts``
    encoded like the evaluation's, pi_ref's params from ``load_ref()``."""
    d = run_cfg.drift
    if d.ref_kl_prompts == 0:
        return None

    rows = evaluation.load_eval_set(run_cfg.eval.prompts)[: d.ref_kl_prompts]
    encoded = prompts_lib.encode_prompts(setup.tokenizer, rows, run_cfg.prompt)
    max_new = d.ref_kl_max_new_tokens or run_cfg.eval.max_new_tokens
    return RefKL(
        ref_params=load_ref(),
        model_cfg=setup.model_cfg,
        prompts=encoded,
        samples=d.ref_kl_samples,
        max_new_tokens=max_new,
        stop_ids=setup.stop_ids,
        seed=run_cfg.train.seed,
        mesh=setup.mesh,
        batch_size=run_cfg.train.batch_size,
        seq_len=max(len(p) for p in encoded) + max_new,
        place=place,
        chunk_size=run_cfg.loss.logprob_chunk_size,
    )
