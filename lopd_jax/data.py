"""Training batches: the Batch contract (DESIGN.md) and the Grain pipeline that builds them from a RolloutStore."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
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


# ----------------------------------------------------------------------------------------------------------------
# The Grain pipeline: RolloutStore -> shuffled per-process indices -> shifted samples -> first-fit packed rows ->
# [B, T] batches -> background prefetch. Every stage is a Grain transformation, so the iterator state (a small
# JSON dict) captures the whole pipeline and grain.checkpoint.CheckpointHandler saves it through orbax.
# ----------------------------------------------------------------------------------------------------------------

# Per-token fields that are packed; each gets [T] slots in a row.
_SEQ_FIELDS = ("inputs", "targets", "loss_mask", "teacher_logprobs", "behavior_logprobs", "dropped")
# Cumulative counters reported by DataIterator.metrics (and carried in the iterator state).
_COUNTERS = ("samples", "truncated_samples", "dropped_tokens", "response_tokens", "padding_tokens", "batches")


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
    prompts: str = ""  # mode opd: prompts.jsonl sampled online every step (no store needed)
    batch_size: int = 0  # rows per global batch (split evenly over JAX processes)
    seq_len: int = 0  # T, tokens per row (shifted: a sample of L tokens takes L - 1 slots)
    max_response_len: int = 0  # response tokens kept per sample (0: no limit beyond seq_len)
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever (the trainer stops after train.steps)
    pack: bool = True
    require_teacher: bool = False  # lightning_opd: every response token needs a teacher log-prob
    read_threads: int = 4  # parallel store reads (TensorStore releases the GIL)
    prefetch: int = 2  # finished batches buffered ahead of the training loop

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "max_response_len", "read_threads", "prefetch"):
            if getattr(self, name) < 0:
                raise DataError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"data.num_epochs must be >= 1 or null (forever), got {self.num_epochs}")


def shift_sample(
    sample: dict[str, Any], *, seq_len: int, max_response_len: int = 0, require_teacher: bool = False
) -> dict[str, np.ndarray]:
    """One store sample -> per-token arrays in the shifted convention, each [L'] with L' <= seq_len.

    Store entry j of ``teacher_logprobs``/``behavior_logprobs`` scores tokens[j]; after the shift position t
    predicts targets[t] = tokens[t + 1], so it carries store entry t + 1. loss_mask[t] = 1 where targets[t] is a
    response token (t + 1 >= prompt_length). The response is cut to ``max_response_len`` tokens and the whole
    sample to seq_len + 1 tokens; ``dropped`` holds the number of cut response tokens at index 0 (0 elsewhere),
    so packed rows carry the truncation count to the metrics.
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
    if require_teacher and not np.isfinite(teacher[on]).all():
        bad = int(np.flatnonzero(on & ~np.isfinite(teacher))[0]) + 1
        raise DataError(
            f"store sample {sample.get('index')}: response token {bad} has no teacher log-prob "
            f"({teacher[bad - 1]}); score the store with precompute.teacher_logprobs"
        )
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


class _StoreSource:
    """Random access view of a RolloutStore for grain.MapDataset.source (adds the sample's store index)."""

    def __init__(self, store):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self._store.sample(int(i)), index=int(i))


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], num_rows: int) -> dict[str, np.ndarray]:
    """Stacks packed rows into [num_rows, T] arrays; a short final batch is padded with empty rows (segment 0)."""
    out = {}
    for k in rows[0]:
        x = np.stack([r[k] for r in rows])
        if len(rows) < num_rows:
            x = np.concatenate([x, np.zeros((num_rows - len(rows), *x.shape[1:]), x.dtype)])
        out[k] = x
    return out


def _to_batch(x: dict[str, np.ndarray]) -> tuple[Batch, dict[str, int]]:
    """Packed arrays (grain names: ``inputs_segment_ids`` ...) -> (Batch, per-batch counts)."""
    batch = Batch(
        inputs=x["inputs"],
        targets=x["targets"],
        positions=x["inputs_positions"],
        segment_ids=x["inputs_segment_ids"],
        loss_mask=x["loss_mask"],
        teacher_logprobs=x["teacher_logprobs"],
        behavior_logprobs=x["behavior_logprobs"],
    )
    seg, dropped = x["inputs_segment_ids"], x["dropped"]
    starts = (seg > 0) & (x["inputs_positions"] == 0)
    counts = {
        "samples": int(starts.sum()),
        "truncated_samples": int((dropped > 0).sum()),
        "dropped_tokens": int(dropped.sum()),
        "response_tokens": int(x["loss_mask"].sum()),
        "padding_tokens": int((seg == 0).sum()),
        "batches": 1,
    }
    return batch, counts


class DataIterator(grain.DatasetIterator):
    """Yields ``Batch`` objects of numpy [B_local, T] arrays and keeps cumulative data metrics.

    A Grain ``DatasetIterator``: ``get_state``/``set_state`` return/accept a JSON-able dict (the whole pipeline's
    position plus the counters), so ``grain.checkpoint.CheckpointSave(it)`` stores it with orbax.
    """

    def __init__(self, parent: grain.DatasetIterator, slots_per_batch: int):
        super().__init__(parent)
        self._slots = slots_per_batch
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def __next__(self) -> Batch:
        batch, counts = next(self._parent)
        for k, v in counts.items():
            self._counts[k] += v
        return batch

    @property
    def metrics(self) -> dict[str, float]:
        """Cumulative ``data/*`` metrics of this process since training started (they survive resume)."""
        c = self._counts
        out = {f"data/{k}": float(v) for k, v in c.items()}
        out["data/truncated_frac"] = c["truncated_samples"] / max(c["samples"], 1)
        out["data/padding_frac"] = c["padding_tokens"] / max(c["batches"] * self._slots, 1)
        return out

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._counts = {k: int(state["counts"][k]) for k in _COUNTERS}


class _WithMetrics(grain.IterDataset):
    """The last stage: turns (Batch, counts) pairs into Batches and accumulates the counts."""

    def __init__(self, parent: grain.IterDataset, slots_per_batch: int):
        super().__init__(parent)
        self._slots = slots_per_batch

    def __iter__(self) -> DataIterator:
        return DataIterator(self._parent.__iter__(), self._slots)


def make_dataset(cfg: DataConfig, store, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The pipeline as a Grain IterDataset yielding (Batch, counts); each Batch field is [B / P, T].

    Process p reads only store indices p, p + P, p + 2P, ... (disjoint slices whose union is the store), and
    shuffles its slice with a permutation that changes every epoch (Grain reseeds ``shuffle`` per ``repeat``).
    """
    rows = _local_rows(cfg, process_count)
    ds = grain.MapDataset.source(_StoreSource(store))[process_index::process_count]
    if len(ds) == 0:
        raise DataError(f"data.store {cfg.store!r}: no samples for process {process_index} of {process_count}")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    shift = functools.partial(
        shift_sample,
        seq_len=cfg.seq_len,
        max_response_len=cfg.max_response_len,
        require_teacher=cfg.require_teacher,
    )
    # A small read-ahead buffer: Grain scans the whole buffer on every element, so its default (500) costs
    # more CPU than the reads it hides.
    threads = max(cfg.read_threads, 1)
    it = ds.map(shift).to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct=dict.fromkeys(_SEQ_FIELDS, cfg.seq_len),
        num_packing_bins=rows,
        shuffle_bins=False,  # rows of one packing group form one batch, so their order does not matter
        max_sequences_per_bin=None if cfg.pack else 1,
    )
    it = it.batch(rows, batch_fn=functools.partial(_stack_rows, num_rows=rows)).map(_to_batch)
    if cfg.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
    return _WithMetrics(it, rows * cfg.seq_len)


def _local_rows(cfg: DataConfig, process_count: int) -> int:
    if cfg.batch_size <= 0 or cfg.seq_len <= 0:
        raise DataError(f"data.batch_size ({cfg.batch_size}) and data.seq_len ({cfg.seq_len}) must be set (> 0)")
    if cfg.batch_size % process_count:
        raise DataError(f"data.batch_size {cfg.batch_size} is not divisible by {process_count} JAX processes")
    return cfg.batch_size // process_count


def make_iterator(
    cfg: DataConfig, process_index: int | None = None, process_count: int | None = None, *, store=None
) -> DataIterator:
    """Opens the store (unless given) and returns this process's checkpointable iterator of Batches.

    Each ``next(it)`` is a ``Batch`` of numpy arrays, every field [batch_size / process_count, seq_len]; the
    trainer assembles the global array (``jax.make_array_from_process_local_data``). ``it.metrics`` holds the
    cumulative ``data/*`` counters (samples, truncated samples, dropped tokens, padding fraction).

    Multi-host: packing makes the number of batches per epoch differ between processes, so training runs with
    ``num_epochs=None`` (endless, every process always has a next batch) and stops after ``train.steps``; a
    finite ``num_epochs`` is for single-process use (tests, evaluation passes).
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if store is None:
        from lopd_jax.store import RolloutStore  # imported here: only the trainer needs the on-disk store

        store = RolloutStore.open(cfg.store)
    return iter(make_dataset(cfg, store, process_index, process_count))
