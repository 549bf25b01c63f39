"""The training batch contract (docs/design.md) and the per-sample shift that builds its rows.

Nothing here imports a data-loader package: the loss, the update step, ``--plan`` and the benchmarks import
``Batch`` from this module, and only the trainer's loader (``lopd_jax.data.loader``) needs Grain.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import struct

from lopd_jax.store.layout import LOGPROB_MAX  # the bound precompute.validate checks too


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


class DataError(ValueError):
    """Bad data or data settings; the message names the store sample or config key."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Settings of the training data pipeline (the ``data`` section of the config).

    ``batch_size`` and ``seq_len`` are 0 in YAML unless set: config.load_config fills them from the ``train``
    section (the single place a user sets them). ``batch_size`` counts rows of the global batch: with packing a
    row of ``seq_len`` tokens holds as many whole samples as fit (first-fit), without packing exactly one.
    """

    store: str = ""  # RolloutStore path or TensorStore kvstore URL
    prompts: str = ""  # mode opd: the prompt set sampled online every step (lopd_jax.data.prompts' formats; no store)
    prompt_key: str | None = None  # column of the prompt in ``prompts`` (None: prompt / messages)
    batch_size: int = 0  # rows per global batch (split evenly over JAX processes)
    seq_len: int = 0  # T, tokens per row (shifted: a sample of L tokens takes L - 1 slots)
    max_response_len: int = 0  # response tokens kept per sample (0: no limit beyond seq_len)
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever (the trainer stops after train.steps)
    pack: bool = True
    require_teacher: bool = False  # lightning_opd: every response token needs a teacher log-prob
    require_behavior: bool = False  # loss.old_policy behavior: every response token needs a behaviour log-prob
    read_threads: int = 4  # parallel store reads (TensorStore releases the GIL)
    prefetch: int = 2  # finished batches buffered ahead of the training loop

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "max_response_len", "read_threads", "prefetch"):
            if getattr(self, name) < 0:
                raise DataError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"data.num_epochs must be >= 1 or null (forever), got {self.num_epochs}")


def _check_logprobs(values: np.ndarray, on: np.ndarray, *, name: str, sample: Any, required: bool, fix: str) -> None:
    """Raises DataError naming the store sample and token when a loss token's log-prob is missing (only when
    ``required``) or impossible (> LOGPROB_MAX, or +-inf)."""
    finite = np.isfinite(values)
    bad = on & ((finite & (values > LOGPROB_MAX)) | np.isinf(values))
    if required:
        bad |= on & ~finite
    if not bad.any():
        return
    t = int(np.flatnonzero(bad)[0])
    what = "has no" if np.isnan(values[t]) else "has an impossible"
    raise DataError(
        f"store sample {sample.get('index')}: token {t + 1} (response token) {what} {name} log-prob ({values[t]}; "
        f"log-probs must be finite and <= {LOGPROB_MAX}); {fix}"
    )


def shift_sample(
    sample: dict[str, Any],
    *,
    seq_len: int,
    max_response_len: int = 0,
    require_teacher: bool = False,
    require_behavior: bool = False,
) -> dict[str, np.ndarray]:
    """One store sample -> per-token arrays in the shifted convention, each [L'] with L' <= seq_len.

    Store entry j of ``teacher_logprobs``/``behavior_logprobs`` scores tokens[j]; after the shift position t
    predicts targets[t] = tokens[t + 1], so it carries store entry t + 1. loss_mask[t] = 1 where targets[t] is a
    response token (t + 1 >= prompt_length). The response is cut to ``max_response_len`` tokens and the whole
    sample to seq_len + 1 tokens; ``dropped`` holds the number of cut response tokens at index 0 (0 elsewhere),
    so packed rows carry the truncation count to the metrics.

    Log-probs are checked where they are read (DataError naming the sample and token): on kept response tokens
    a value above ``LOGPROB_MAX`` or infinite is refused always; NaN (not scored) is refused when the value is
    required (``require_teacher`` for lightning_opd, ``require_behavior`` for ``loss.old_policy: behavior``) and
    otherwise becomes 0, which no loss term then reads.
    """
    tokens = np.asarray(sample["tokens"], np.int32)
    p = int(sample["prompt_length"])
    n_resp = len(tokens) - p
    if p < 1 or n_resp < 0 or len(tokens) < 2:
        raise DataError(f"store sample {sample.get('index')}: prompt_length {p} for {len(tokens)} tokens")
    keep = n_resp if max_response_len <= 0 else min(n_resp, max_response_len)
    end = min(p + keep, seq_len + 1)
    teacher = np.asarray(sample["teacher_logprobs"], np.float32)[1:end]
    behavior = np.asarray(sample["behavior_logprobs"], np.float32)[1:end]
    mask = (np.arange(1, end) >= p).astype(np.float32)
    on = mask > 0
    score = "score the store with precompute.teacher_logprobs (or check it with precompute.validate)"
    _check_logprobs(teacher, on, name="teacher", sample=sample, required=require_teacher, fix=score)
    redo = "use rollouts with recorded log-probs (precompute.rollouts) or loss.old_policy: current"
    _check_logprobs(behavior, on, name="behaviour", sample=sample, required=require_behavior, fix=redo)
    dropped = np.zeros(end - 1, np.int32)
    if end - 1 > 0:
        dropped[0] = len(tokens) - end  # counts prompt tokens only if the prompt itself overflows seq_len
    return {
        "inputs": tokens[: end - 1],
        "targets": tokens[1:end],
        "loss_mask": mask,
        "teacher_logprobs": np.where(on & np.isfinite(teacher), teacher, 0.0).astype(np.float32),
        "behavior_logprobs": np.where(on & np.isfinite(behavior), behavior, 0.0).astype(np.float32),
        "dropped": dropped,
    }


ROW_FIELDS = ("inputs", "targets", "loss_mask", "teacher_logprobs", "behavior_logprobs")  # what shift_sample gives


def rows_to_batch(rows: list[dict[str, np.ndarray]], *, seq_len: int, num_rows: int) -> tuple[Batch, dict[str, int]]:
    """The one row-to-Batch assembler: rows -> numpy Batch [num_rows, seq_len] and the batch's counts.

    A row is ``shift_sample``'s output (one sequence: segment 1, positions from 0) or a packed row that carries its
    own ``segment_ids`` and ``positions`` (several sequences). Each row is padded to ``seq_len`` and missing rows
    are empty (segment 0). Counts: samples (sequence starts), truncated samples and dropped tokens (``dropped``),
    response tokens, padding tokens.
    """
    fields = {name: np.zeros((num_rows, seq_len), np.float32) for name in ROW_FIELDS}
    for name in ("inputs", "targets", "positions", "segment_ids"):
        fields[name] = np.zeros((num_rows, seq_len), np.int32)
    dropped = np.zeros((num_rows, seq_len), np.int32)
    for i, row in enumerate(rows):
        n = len(row["inputs"])
        for name in ROW_FIELDS:
            fields[name][i, :n] = row[name]
        fields["positions"][i, :n] = row["positions"] if "positions" in row else np.arange(n)
        fields["segment_ids"][i, :n] = row.get("segment_ids", 1)
        dropped[i, :n] = row["dropped"]
    seg, pos = fields["segment_ids"], fields["positions"]
    counts = {
        "samples": int(((seg > 0) & (pos == 0)).sum()),
        "truncated_samples": int((dropped > 0).sum()),
        "dropped_tokens": int(dropped.sum()),
        "response_tokens": int(fields["loss_mask"].sum()),
        "padding_tokens": int((seg == 0).sum()),
        "batches": 1,
    }
    return Batch(**fields), counts
