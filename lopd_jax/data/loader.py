"""The Grain pipeline that builds training batches (``lopd_jax.data.batch.Batch``) from a RolloutStore.

``data.store`` may also be a sharded dataset directory (``RolloutStore.open`` returns a ``RolloutDataset``): its
samples are indexed 0..N-1 in shard order, so the pipeline, its shuffling and its checkpoints are the same as for
one store holding the same samples."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from lopd_jax.data.batch import Batch, DataConfig, DataError, rows_to_batch, shift_sample
from lopd_jax.store import RolloutStore

__all__ = ["Batch", "DataConfig", "DataError", "DataIterator", "make_dataset", "make_iterator", "shift_sample"]


# ----------------------------------------------------------------------------------------------------------------
# The Grain pipeline: RolloutStore -> shuffled per-process indices -> shifted samples -> first-fit packed rows ->
# [B, T] batches -> background prefetch. Every stage is a Grain transformation, so the iterator state (a small
# JSON dict) captures the whole pipeline and grain.checkpoint.CheckpointHandler saves it through orbax.
# ----------------------------------------------------------------------------------------------------------------

# Per-token fields that are packed; each gets [T] slots in a row.
_SEQ_FIELDS = ("inputs", "targets", "loss_mask", "teacher_logprobs", "behavior_logprobs", "dropped")
# Added for the top-k KL objectives (data.topk_columns): [T, K] and [T] slots.
_TOPK_FIELDS = ("topk_ids", "topk_teacher_logprobs", "topk_teacher_tail")
# Cumulative counters reported by DataIterator.metrics (and carried in the iterator state).
_COUNTERS = ("samples", "truncated_samples", "dropped_tokens", "response_tokens", "padding_tokens", "batches")


class _StoreSource:
    """Random access view of a RolloutStore for grain.MapDataset.source (adds the sample's store index)."""

    def __init__(self, store):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self._store.sample(int(i)), index=int(i))


def _packed_rows_to_batch(rows: Sequence[dict[str, np.ndarray]], num_rows: int) -> tuple[Batch, dict[str, int]]:
    """Grain's packed rows (``inputs_segment_ids`` / ``inputs_positions`` name the packing) -> ``rows_to_batch``."""
    named = [{**r, "segment_ids": r["inputs_segment_ids"], "positions": r["inputs_positions"]} for r in rows]
    return rows_to_batch(named, seq_len=len(rows[0]["inputs"]), num_rows=num_rows)


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
        require_behavior=cfg.require_behavior,
        topk_columns=cfg.topk_columns,
    )
    # A small read-ahead buffer: Grain scans the whole buffer on every element, so its default (500) costs
    # more CPU than the reads it hides.
    threads = max(cfg.read_threads, 1)
    it = ds.map(shift).to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct=dict.fromkeys(_SEQ_FIELDS + (_TOPK_FIELDS if cfg.topk_columns else ()), cfg.seq_len),
        num_packing_bins=rows,
        shuffle_bins=False,  # rows of one packing group form one batch, so their order does not matter
        max_sequences_per_bin=None if cfg.pack else 1,
    )
    it = it.batch(rows, batch_fn=functools.partial(_packed_rows_to_batch, num_rows=rows))
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
        store = RolloutStore.open(cfg.store)
    return iter(make_dataset(cfg, store, process_index, process_count))
