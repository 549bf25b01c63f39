"""Training batches: the Batch contract (DESIGN.md) and the Grain pipeline that builds them from a RolloutStore."""

from __future__ import annotations

import jax
import numpy as np
from flax import struct


@struct.dataclass
class Batch:
    """One packed training batch; every field is [B, T] in the "shifted" convention.

    inputs[t] is fed to the model and targets[t] is the token that follows it. Packed rows hold several
    sequences, told apart by segment_ids (0 = padding, 1..k = sequences); positions restart per segment.
    """

    inputs: jax.Array  # int32
    targets: jax.Array  # int32
    positions: jax.Array  # int32
    segment_ids: jax.Array  # int32
    loss_mask: jax.Array  # float32, 1 where targets[t] is a response token to train on
    teacher_logprobs: jax.Array  # float32, log p_T(targets[t] | prefix); 0 where loss_mask is 0
    behavior_logprobs: jax.Array  # float32, log pi_behavior(targets[t]) recorded at rollout time

    @classmethod
    def zeros(cls, batch_size: int, seq_len: int) -> Batch:
        """An all-padding batch (useful for tracing shapes)."""
        i = np.zeros((batch_size, seq_len), np.int32)
        f = np.zeros((batch_size, seq_len), np.float32)
        return cls(i, i, i, i, f, f, f)
