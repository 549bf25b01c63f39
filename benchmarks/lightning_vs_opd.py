"""Lightning OPD vs standard (online) OPD: wall-clock per optimizer step and to the same number of steps.

Both modes run the project's own code at the same batch (B prompts, one answer each, rows of T tokens) and the
same jitted update step (``update.make_update_step`` over ``losses.opd_loss``):

* standard OPD step = ``online_opd.OnlineOPD.next_batch`` (sample from the *current* student with
  ``lopd_jax.inference.sampling``, then score with the in-process teacher) + the update;
* Lightning OPD step = the update on a batch that was precomputed once (host -> device copy included);
* the one-off precompute = the same sampling + scoring, once, from the initial student (pi_ref), for every step's
  prompts in one batch (as the precompute tools batch a prompt set): reported separately, and added to Lightning's
  total. (The paper's 3.6-4x is total GPU hours.)

Random weights on the demo shapes: the student never stops early, so every answer has ``max_new_tokens`` tokens,
as long as the demo's medium answers (~45 tokens).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_step import build_step, compile_step, make_state
from lopd_jax.inference import sampling
from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Qwen3Config


def _online(student: Qwen3Config, teacher: Qwen3Config, prompts, batch_size: int, seq_len: int, max_new: int):
    from lopd_jax.training import online_opd

    teacher_params = jax.jit(qwen3.init_params, static_argnums=0)(teacher, jax.random.key(7))
    return online_opd.OnlineOPD(
        prompts=prompts,
        model_cfg=student,
        teacher_cfg=teacher,
        teacher_params=teacher_params,
        sampling_cfg=sampling.SamplingConfig(temperature=1.0, max_new_tokens=max_new, seed=0),
        batch_size=batch_size,
        seq_len=seq_len,
        max_response_len=0,
        seed=0,
        shuffle=True,
        chunk_size=None,
        mesh=None,
        place=jax.device_put,
    )


def _precompute(online, params, steps: int) -> tuple[list[Any], float]:
    """The one-off precompute, batched as the precompute tools batch it: every step's prompts sampled from
    ``params`` (pi_ref) in one ``sampling.generate`` call, all rows scored by the teacher in one call, then split
    into the steps' batches and kept on the host (as a store would). Returns (batches, seconds)."""
    from lopd_jax.training import online_opd

    start = time.perf_counter()
    B = online.batch_size
    prompts = [online.prompts[i] for s in range(steps) for i in online.stream.indices(s)]
    outs = sampling.generate(params, online.model_cfg, prompts, online.scfg, online.key, None, len(prompts))
    host, _ = online_opd.samples_to_batch(
        prompts, outs, seq_len=online.seq_len, max_response_len=online.max_response_len
    )
    batch = jax.device_put(host)
    batch = jax.device_get(batch.replace(teacher_logprobs=online.score(online.teacher_params, batch)))
    batches = [jax.tree.map(lambda x, s=s: x[s * B : (s + 1) * B], batch) for s in range(steps)]
    return batches, time.perf_counter() - start


def _lightning_steps(compiled, state, batches) -> tuple[Any, list[float]]:
    times = []
    for host in batches:
        start = time.perf_counter()
        state, metrics = compiled(state, jax.device_put(host))
        jax.block_until_ready(metrics["train/loss"])
        times.append(time.perf_counter() - start)
    return state, times


def _standard_steps(compiled, state, online, steps: int) -> tuple[Any, list[float], dict[str, list[float]]]:
    times, parts = [], {"sample_s": [], "teacher_s": [], "update_s": []}
    for s in range(steps):
        start = time.perf_counter()
        batch, stats = online.next_batch(s, state.params)
        mid = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["train/loss"])
        times.append(time.perf_counter() - start)
        parts["sample_s"].append(stats["time/sample_s"])
        parts["teacher_s"].append(stats["time/teacher_s"])
        parts["update_s"].append(time.perf_counter() - mid)
    return state, times, parts


def bench_lightning_vs_opd(
    student: Qwen3Config,
    teacher: Qwen3Config,
    batch_size: int,
    seq_len: int,
    max_new_tokens: int,
    steps: int,
    rounds: int,
) -> dict[str, Any]:
    """``rounds`` alternating runs of ``steps`` optimizer steps per mode, each run from the same initial student."""
    prompts, _ = common.task_sequences(batch_size * steps, seed=1)
    online = _online(student, teacher, prompts, batch_size, seq_len, max_new_tokens)
    built = build_step(student)  # the trainer's own step (lopd_jax.training.step.build) on one device
    state0 = make_state(built, student)
    init_params = jax.device_get(state0.params)
    _, first_s = _precompute(online, state0.params, steps)  # compiles the precompute's sampling and scoring
    batches, pre_s = _precompute(online, state0.params, steps)
    for s in range(steps):  # compiles the per-step sampling (each prompt bucket) and scoring of standard OPD
        online.next_batch(s, state0.params)
    compiled, compile_s, _ = compile_step(built.step, state0, jax.device_put(batches[0]))
    light, std, parts = [], [], {"sample_s": [], "teacher_s": [], "update_s": []}
    for _ in range(rounds):
        state = built.init_state(jax.device_put(init_params), 1)
        _, t = _lightning_steps(compiled, state, batches)
        light += t
        state = built.init_state(jax.device_put(init_params), 1)
        _, t, p = _standard_steps(compiled, state, online, steps)
        std += t
        for k in parts:
            parts[k] += p[k]
    light_s, std_s = common.spread(light), common.spread(std)
    tokens = [float((np.asarray(b.segment_ids) > 0).sum()) for b in batches]
    return {
        "student_params": qwen3.param_count(student),
        "teacher_params": qwen3.param_count(teacher),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "max_new_tokens": max_new_tokens,
        "steps": steps,
        "rounds": rounds,
        "tokens_per_step": float(np.mean(tokens)),
        "lightning_step_s": light_s,
        "standard_step_s": std_s,
        "standard_parts_median_s": {k: common.spread(v)["median"] for k, v in parts.items()},
        "step_speedup": common.ratio(std_s, light_s),
        "precompute_s": pre_s,
        "precompute_first_s": first_s,
        "update_compile_s": compile_s,
        "lightning_total_s": pre_s + steps * light_s["median"],
        "standard_total_s": steps * std_s["median"],
        "total_speedup": steps * std_s["median"] / (pre_s + steps * light_s["median"]),
    }
