"""RolloutStore: the on-disk contract between precompute/ and the trainer (docs/design.md "The RolloutStore").

The store in layers, each importing only the ones below it (no cycles, no private name crosses a module)::

    lopd_jax.store.rollout_store  RolloutStore: the entry point (open a store or a dataset, create, open_for_append)
    lopd_jax.store.dataset  RolloutDataset: a directory of shard stores read as one     (reader, layout)
    lopd_jax.store.writer   RolloutWriter: append, write_teacher, commit                (layout, lock)
    lopd_jax.store.reader   StoreReader: one store's committed samples, read-only        (layout)
    lopd_jax.store.lock     FileLock: one writer per local store, one trainer per run    (layout: StoreError only)
    lopd_jax.store.layout   the format: constants, kvstore spec, manifest I/O and checks, array helpers

The layout (arrays, dtypes, chunking) and the commit protocol are described in ``lopd_jax.store.layout``.

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
lock file in local stores (``lopd_jax.store.lock``); a new local store appears whole (built beside, renamed).

Reader API: ``RolloutStore.open(path)`` (``len``, ``sample``, ``samples``, ``manifest``, ``lengths``, ``refresh``,
``read_array``); ``RolloutStore(path)`` opens one store without looking for shards.
"""

from lopd_jax.store.dataset import RolloutDataset, is_dataset
from lopd_jax.store.layout import (
    FINISH_REASONS,
    FORMAT,
    MANIFEST,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    StoreError,
    kvstore_spec,
    read_checked,
    read_manifest,
)
from lopd_jax.store.reader import StoreReader
from lopd_jax.store.rollout_store import RolloutStore
from lopd_jax.store.writer import RolloutWriter

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
    "StoreReader",
    "is_dataset",
    "kvstore_spec",
    "read_checked",
    "read_manifest",
]
