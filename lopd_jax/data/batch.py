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

    The top-k KL objectives (``loss.objective: topk_*``) also read the K bucket ids of each position and the
    teacher's log-probs of those buckets; the other losses get None there (nothing is traced for them).
    """

    inputs: jax.Array  # int32
    targets: jax.Array  # int32
    positions: jax.Array  # int32
    segment_ids: jax.Array  # int32
    loss_mask: jax.Array  # float32, 1 where targets[t] is a response token to train on
    teacher_logprobs: jax.Array  # float32, log p_T(targets[t] | prefix); 0 where loss_mask is 0
    behavior_logprobs: jax.Array  # float32, log pi_behavior(targets[t]) recorded at rollout time
    topk_ids: jax.Array | None = None  # int32 [B, T, K]: bucket ids of targets[t]'s distribution; -1 off the loss
    topk_teacher_logprobs: jax.Array | None = None  # float32 [B, T, K]: log p_T(topk_ids); 0 off the loss
    topk_teacher_tail: jax.Array | None = None  # float32 [B, T]: log(1 - sum_k p_T(topk_ids)); 0 off the loss

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
    # Top-k KL objectives (set from loss.objective / loss.topk by config.resolve): which stored ids are the
    # buckets ("behavior": the rollout policy's top-k, "teacher": the teacher's own) and K.
    topk_columns: str = ""
    topk: int = 0
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


# Store columns of each top-k source: (bucket ids, the teacher's log-probs of them, the teacher's tail).
TOPK_COLUMNS = {
    "behavior": ("behavior_topk_ids", "teacher_behavior_topk_logprobs", "teacher_behavior_topk_tail"),
    "teacher": ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_tail"),
}


def _topk_fields(sample: dict[str, Any], source: str, end: int, on: np.ndarray) -> dict[str, np.ndarray]:
    """The shifted top-k fields [L', K] / [L'] of one sample: store rows 1..end-1, zeroed (ids -1) off the loss.
    DataError naming the sample and token for ids < 0, or teacher log-probs / tails that are NaN or > LOGPROB_MAX
    on a loss token (a tail may be -inf: an empty tail bucket)."""
    ids_key, lp_key, tail_key = TOPK_COLUMNS[source]
    ids = np.asarray(sample[ids_key], np.int32)[1:end]
    lp = np.asarray(sample[lp_key], np.float32)[1:end]
    tail = np.asarray(sample[tail_key], np.float32)[1:end]
    bad = on & ((ids < 0).any(-1) | ~np.isfinite(lp).all(-1) | (lp > LOGPROB_MAX).any(-1))
    bad |= on & (np.isnan(tail) | (tail > LOGPROB_MAX))
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"store sample {sample.get('index')}: token {t + 1} (response token) has no valid {ids_key} / {lp_key} / "
            f"{tail_key} (ids {ids[t].tolist()}, log-probs {lp[t].tolist()}, tail {tail[t]}); score the store with "
            "precompute.teacher_logprobs --engine jax (or check it with precompute.validate)"
        )
    return {
        "topk_ids": np.where(on[:, None], ids, -1).astype(np.int32),
        "topk_teacher_logprobs": np.where(on[:, None], lp, 0.0).astype(np.float32),
        "topk_teacher_tail": np.where(on, tail, 0.0).astype(np.float32),
    }


def shift_sample(
    sample: dict[str, Any],
    *,
    seq_len: int,
    max_response_len: int = 0,
    require_teacher: bool = False,
    require_behavior: bool = False,
    topk_columns: str = "",
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
    otherwise becomes 0, which no loss term then reads. ``topk_columns`` ("behavior" / "teacher", ``TOPK_COLUMNS``)
    adds the top-k KL fields (``_topk_fields``).
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
    out = {
        "inputs": tokens[: end - 1],
        "targets": tokens[1:end],
        "loss_mask": mask,
        "teacher_logprobs": np.where(on & np.isfinite(teacher), teacher, 0.0).astype(np.float32),
        "behavior_logprobs": np.where(on & np.isfinite(behavior), behavior, 0.0).astype(np.float32),
        "dropped": dropped,
    }
    if topk_columns:
        out |= _topk_fields(sample, topk_columns, end, on)
    return out


ROW_FIELDS = ("inputs", "targets", "loss_mask", "teacher_logprobs", "behavior_logprobs")  # what shift_sample gives
TOPK_ROW_FIELDS = {
    "topk_ids": (np.int32, -1),
    "topk_teacher_logprobs": (np.float32, 0.0),
    "topk_teacher_tail": (np.float32, 0.0),
}


def rows_to_batch(rows: list[dict[str, np.ndarray]], *, seq_len: int, num_rows: int) -> tuple[Batch, dict[str, int]]:
    """The one row-to-Batch assembler: rows -> numpy Batch [num_rows, seq_len] and the batch's counts.

    A row is ``shift_sample``'s output (one sequence: segment 1, positions from 0; with the top-k KL fields when
    it has them) or a packed row that carries its
    own ``segment_ids`` and ``positions`` (several sequences). Each row is padded to ``seq_len`` and missing rows
    are empty (segment 0). Counts: samples (sequence starts), truncated samples and dropped tokens (``dropped``),
    response tokens, padding tokens.
    """
    fields = {name: np.zeros((num_rows, seq_len), np.float32) for name in ROW_FIELDS}
    for name in ("inputs", "targets", "positions", "segment_ids"):
        fields[name] = np.zeros((num_rows, seq_len), np.int32)
    dropped = np.zeros((num_rows, seq_len), np.int32)
    topk = [name for name in TOPK_ROW_FIELDS if rows and name in rows[0]]
    for name in topk:
        dtype, fill = TOPK_ROW_FIELDS[name]
        fields[name] = np.full((num_rows, seq_len, *np.shape(rows[0][name])[1:]), fill, dtype)
    for i, row in enumerate(rows):
        n = len(row["inputs"])
        for name in (*ROW_FIELDS, *topk):
            fields[name][i, :n] = row[name]
        fields["positions"][i, :n] = row["positions"] if "positions" in row else np.arange(n)
        fields["segment_ids"][i, :n] = row.get("segment_ids", 1)
        dropped[i, :n] = row["dropped"]
    seg, pos = fields["segment_ids"], fields["positions"]
    if "topk_ids" in fields:  # packing pads with 0: padding slots get no bucket id
        fields["topk_ids"] = np.where(seg[..., None] > 0, fields["topk_ids"], -1)
    counts = {
        "samples": int(((seg > 0) & (pos == 0)).sum()),
        "truncated_samples": int((dropped > 0).sum()),
        "dropped_tokens": int(dropped.sum()),
        "response_tokens": int(fields["loss_mask"].sum()),
        "padding_tokens": int((seg == 0).sum()),
        "batches": 1,
    }
    return Batch(**fields), counts
