"""RolloutStore: the on-disk contract between precompute/ and the trainer (DESIGN.md "RolloutStore").

The store in layers, each importing only the ones below it (no cycles, no private name crosses a module)::

    lopd_jax.store          RolloutStore: the entry point (open a store or a dataset, create, open_for_append)
    lopd_jax.store_dataset  RolloutDataset: a directory of shard stores read as one     (reader, layout)
    lopd_jax.store_writer   RolloutWriter: append, write_teacher, commit                (layout, lock)
    lopd_jax.store_reader   StoreReader: one store's committed samples, read-only        (layout)
    lopd_jax.store_lock     FileLock: one writer per local store, one trainer per run    (layout: StoreError only)
    lopd_jax.store_layout   the format: constants, kvstore spec, manifest I/O and checks, array helpers

The layout (arrays, dtypes, chunking) and the commit protocol are described in ``lopd_jax.store_layout``.

Writer API (precompute.rollouts / precompute.teacher_logprobs)::

    w = RolloutStore.create(path, manifest={"policy": fp, "tokenizer": fp, "sampling": {...}, ...}, topk=0)
    w = RolloutStore.open_for_append(path)           # resume: w.committed samples are already there
    w.append([{"tokens": ids, "prompt_length": p, "finish_reason": "stop", "behavior_logprobs": lp,
               "prompt_index": i, "answer": "42"}, ...])   # buffered; flushes (commits) every flush_tokens
    w.write_teacher(start, [lp_0, lp_1, ...], topk=(ids, logprobs) lists or None)  # start == w.teacher_end
    w.update_manifest(teacher=fp, teacher_path=...)   # recorded at the next commit
    w.flush(); w.close()                              # or use ``with`` (close flushes)

``behavior_logprobs`` / teacher log-probs may be given for all tokens (prompt entries are replaced by NaN) or for
the response tokens only; ``behavior_logprobs=None`` stores NaN (data without a behaviour policy, e.g. imported SFT
answers; such stores say ``behavior_logprobs: "none"`` in their manifest). One writer per store, enforced by a
lock file in local stores (``lopd_jax.store_lock``); a new local store appears whole (built beside, renamed).

Reader API: ``RolloutStore.open(path)`` (``len``, ``sample``, ``samples``, ``manifest``, ``lengths``, ``refresh``,
``read_array``); ``RolloutStore(path)`` opens one store without looking for shards.
"""

from __future__ import annotations

import os

from lopd_jax.store_dataset import RolloutDataset, is_dataset
from lopd_jax.store_layout import (
    FINISH_REASONS,
    FORMAT,
    MANIFEST,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    StoreError,
    has_manifest,
    kvstore_spec,
    read_checked,
    read_manifest,
)
from lopd_jax.store_reader import StoreReader
from lopd_jax.store_writer import RolloutWriter


class RolloutStore(StoreReader):
    """One store's committed samples (``StoreReader``), and the factories every caller starts from."""

    @classmethod
    def open(cls, path: str | os.PathLike | dict) -> RolloutStore | RolloutDataset:
        """Open a store for reading; StoreError naming the path for a missing manifest or an inconsistent store.

        A dataset directory of shard stores (``precompute`` with ``--num-shards``) opens as a
        ``lopd_jax.store_dataset.RolloutDataset``: the same reader API over all its shards, in shard order."""
        spec = kvstore_spec(path)
        if not has_manifest(spec) and is_dataset(spec):
            return RolloutDataset(spec)
        return cls(spec)

    @classmethod
    def create(cls, path: str | os.PathLike | dict, manifest: dict, topk: int = 0, **kwargs) -> RolloutWriter:
        """A writer for a new, empty store at ``path`` (see ``lopd_jax.store_writer.RolloutWriter.create``)."""
        return RolloutWriter.create(path, manifest, topk=topk, **kwargs)

    @classmethod
    def open_for_append(cls, path: str | os.PathLike | dict, **kwargs) -> RolloutWriter:
        """A writer that continues an existing store where its last commit ended."""
        return RolloutWriter.open(path, **kwargs)


# The format's public names stay importable from here, where callers and docs have always found them.
__all__ = [
    "FINISH_REASONS",
    "FORMAT",
    "MANIFEST",
    "RESERVED_KEYS",
    "SCHEMA_VERSION",
    "RolloutDataset",
    "RolloutStore",
    "RolloutWriter",
    "StoreError",
    "kvstore_spec",
    "read_checked",
    "read_manifest",
]
