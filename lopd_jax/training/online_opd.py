"""Standard (online) OPD, the comparison baseline: each step samples from the current student and a live teacher
scores the samples.

Each step: draw ``batch_size`` prompts from ``data.prompts`` (a seeded permutation per epoch, so step s always gets
the same prompts and a resumed run needs nothing but the step), sample one answer per prompt from the *current*
student with ``lopd_jax.inference.sampling`` (key folded with the step), shift each (prompt + answer) with
``data.shift_sample`` (the same code path as store samples, one sample per row), score the targets with the
in-process teacher, and hand the Batch to the same update step as Lightning OPD.

Prompts are encoded and stop ids chosen by ``lopd_jax.data.prompts`` (the encoder the precompute rollouts use), and the
sampler stops at exactly those ids (``ignore_eos``), so both arms of the comparison see the same prompt tokens and
stop on the same tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lopd_jax import losses
from lopd_jax.data.batch import Batch, rows_to_batch, shift_sample
from lopd_jax.inference import sampling
from lopd_jax.models import qwen3


def sampler_config(scfg: sampling.SamplingConfig, stop_ids: Sequence[int]) -> sampling.SamplingConfig:
    """``scfg`` stopping at exactly ``stop_ids`` (``prompts.stop_ids``): the model's own eos is not added on top,
    as in the precompute rollouts, so online OPD, evaluation and the stored rollouts stop on the same ids."""
    return dataclasses.replace(scfg, stop_token_ids=tuple(stop_ids), ignore_eos=True)


class PromptStream:
    """Step s -> the indices of its ``batch_size`` prompts: position p = s * B + j of an endless stream that
    walks a fresh seeded permutation of the prompts every epoch (identity when ``shuffle`` is off)."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.b, self.seed, self.shuffle = num_prompts, batch_size, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(self.n) if self.shuffle else np.arange(self.n)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        pos = range(step * self.b, (step + 1) * self.b)
        return [int(self._perm(p // self.n)[p % self.n]) for p in pos]


# ----------------------------------------------------------------------------------------------------------------
# Samples -> Batch
# ----------------------------------------------------------------------------------------------------------------


def samples_to_batch(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[sampling.SampleOutput],
    *,
    seq_len: int,
    max_response_len: int = 0,
) -> tuple[Batch, dict[str, float]]:
    """One row per (prompt, generated answer): numpy Batch [len(prompts), seq_len] and counts for the metrics.

    Behaviour log-probs are the sampler's raw log-probs; teacher log-probs are left at 0 (scored on device).
    """
    rows = []
    for p, out in zip(prompts, outputs):
        tokens = np.concatenate([np.asarray(p, np.int32), out.token_ids.astype(np.int32)])
        behavior = np.concatenate([np.full(len(p), np.nan, np.float32), out.logprobs.astype(np.float32)])
        sample = {"tokens": tokens, "prompt_length": len(p), "behavior_logprobs": behavior}
        sample["teacher_logprobs"] = np.zeros(len(tokens), np.float32)
        rows.append(shift_sample(sample, seq_len=seq_len, max_response_len=max_response_len))
    batch, counts = rows_to_batch(rows, seq_len=seq_len, num_rows=len(rows))
    stats = {
        "opd/response_len_mean": float(np.mean([len(o.token_ids) for o in outputs])),
        "opd/stop_frac": float(np.mean([o.finish_reason == "stop" for o in outputs])),
        "data/dropped_tokens": float(counts["dropped_tokens"]),
    }
    return batch, stats


def make_teacher_scorer(teacher_cfg: qwen3.Qwen3Config, chunk_size: int | None):
    """Jitted ``(teacher_params, batch) -> [B, T]`` fp32 log p_T(targets), 0 where loss_mask is 0."""

    def score(tparams, batch: Batch) -> jax.Array:
        lp = losses.batch_logprobs(tparams, batch, cfg=teacher_cfg, chunk_size=chunk_size)
        return jnp.where(batch.loss_mask > 0, lp, 0.0)

    return jax.jit(score)


class OnlineOPD:
    """Produces each online-OPD step's scored Batch (global, placed on ``place``'s shardings).

    ``place(numpy Batch) -> device Batch`` assembles the global arrays; ``next_batch`` returns the Batch, the
    host-side counts (tokens, timings) for the metrics.
    """

    def __init__(
        self,
        *,
        prompts: list[list[int]],
        model_cfg: qwen3.Qwen3Config,
        teacher_cfg: qwen3.Qwen3Config,
        teacher_params: Any,
        sampling_cfg: sampling.SamplingConfig,
        batch_size: int,
        seq_len: int,
        max_response_len: int,
        seed: int,
        shuffle: bool,
        chunk_size: int | None,
        mesh,
        place,
    ):
        self.prompts, self.model_cfg, self.scfg = prompts, model_cfg, sampling_cfg
        self.teacher_params, self.mesh, self.place = teacher_params, mesh, place
        self.batch_size, self.seq_len, self.max_response_len = batch_size, seq_len, max_response_len
        self.stream = PromptStream(len(prompts), batch_size, seed, shuffle)
        self.score = make_teacher_scorer(teacher_cfg, chunk_size)
        self.key = jax.random.key(sampling_cfg.seed)

    def next_batch(self, step: int, params: Any) -> tuple[Batch, dict[str, float]]:
        """Sample from ``params`` for step ``step`` (0-based), score with the teacher; timings in the stats."""
        idx = self.stream.indices(step)
        prompts = [self.prompts[i] for i in idx]
        t0 = time.perf_counter()
        outs = sampling.generate(
            params, self.model_cfg, prompts, self.scfg, jax.random.fold_in(self.key, step), self.mesh, self.batch_size
        )
        t1 = time.perf_counter()
        host, stats = samples_to_batch(prompts, outs, seq_len=self.seq_len, max_response_len=self.max_response_len)
        batch = self.place(host)
        batch = batch.replace(teacher_logprobs=self.score(self.teacher_params, batch))
        jax.block_until_ready(batch.teacher_logprobs)
        t2 = time.perf_counter()
        stats |= {"time/sample_s": t1 - t0, "time/teacher_s": t2 - t1, "_tokens": float((host.segment_ids > 0).sum())}
        return batch, stats
