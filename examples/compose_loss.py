"""Compose your own loss: a researcher's objective built from the functional API, trained by the update step.

The loss below is NOT the library's opd_loss: it is a plain (unclipped) policy gradient on the teacher's advantage
with a clamp and an entropy bonus, normalised per token. It needs three public pieces only:
``qwen3.forward(..., return_hidden=True)``, ``losses.token_logprobs`` (chunked, never builds [B, T, V] fp32) and
``update.make_update_step`` (jitted, donated, gradient accumulation). Runs on CPU in seconds:

    python examples/compose_loss.py --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from lopd_jax import losses, update
from lopd_jax.data.batch import Batch
from lopd_jax.models import qwen3

STUDENT = qwen3.Qwen3Config(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)  # fmt: skip
TEACHER = dataclasses.replace(STUDENT, initializer_range=0.2)  # a sharper random "teacher"
ENTROPY_COEF = 1e-3


def my_loss(params, batch: Batch):
    """-mean_t [clamp(log p_T - log p_theta, -5, 5) * log p_theta + c * entropy] over response tokens."""
    hidden = qwen3.forward(
        params, batch.inputs, cfg=STUDENT, positions=batch.positions, segment_ids=batch.segment_ids,
        return_hidden=True,
    )  # fmt: skip
    logp, ent = losses.token_logprobs(params, hidden, batch.targets, cfg=STUDENT, chunk_size=8, return_entropy=True)
    mask = batch.loss_mask
    adv = jnp.clip(batch.teacher_logprobs - jax.lax.stop_gradient(logp), -5.0, 5.0)
    n_tokens = jnp.sum(mask)
    loss = -jnp.sum((adv * logp + ENTROPY_COEF * ent) * mask) / n_tokens
    gap = jnp.sum((batch.teacher_logprobs - jax.lax.stop_gradient(logp)) * mask) / n_tokens
    # data/loss_denominator tells the step how to weight micro-batches (here: by response tokens).
    return loss, {"mine/gap": gap, "data/loss_denominator": n_tokens}


def make_batch(teacher_params, key, batch_size: int = 8, seq_len: int = 32) -> Batch:
    """Stand-in for stored rollouts: random token rows (one sequence each, 4-token prompt), scored by the teacher."""
    tokens = jax.random.randint(key, (batch_size, seq_len + 1), 0, STUDENT.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = qwen3.forward(teacher_params, inputs, cfg=TEACHER, return_hidden=True)
    mask = jnp.broadcast_to((jnp.arange(seq_len) >= 3).astype(jnp.float32), inputs.shape)
    teacher_lp = losses.token_logprobs(teacher_params, hidden, targets, cfg=TEACHER) * mask
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), inputs.shape)
    return Batch(
        inputs=inputs, targets=targets, positions=positions, segment_ids=jnp.ones_like(inputs),
        loss_mask=mask, teacher_logprobs=teacher_lp, behavior_logprobs=jnp.zeros_like(mask),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    k_student, k_teacher, k_data, k_state = jax.random.split(jax.random.key(0), 4)
    teacher_params = qwen3.init_params(TEACHER, k_teacher)
    batch = make_batch(teacher_params, k_data)
    optimizer = update.make_optimizer(update.OptimizerConfig(lr=args.lr))
    state = update.init_train_state(qwen3.init_params(STUDENT, k_student), optimizer, k_state)
    step = update.make_update_step(my_loss, optimizer, grad_accum=2)

    gaps = []
    for i in range(args.steps):
        state, metrics = step(state, batch)
        metrics = jax.device_get(metrics)
        gaps.append(float(metrics["mine/gap"]))
        print(f"step {i + 1:3d}  loss {metrics['train/loss']:+.4f}  teacher-student gap {gaps[-1]:+.4f}")
    summary = {"steps": args.steps, "first_gap": gaps[0], "last_gap": gaps[-1], "finite": bool(np.isfinite(gaps).all())}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
