"""StoreReader: the committed samples of one RolloutStore, read-only (the reader layer of ``lopd_jax.store``).

It imports only the format (``lopd_jax.store.layout``); sharded datasets (``lopd_jax.store.dataset``) are built
from it, and ``lopd_jax.store.RolloutStore`` (the entry point users call) is it plus the ``open`` / ``create`` /
``open_for_append`` factories, which need the dataset and the writer above it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lopd_jax.store.layout import (
    FINISH_REASONS,
    TOKEN_ARRAYS,
    StoreError,
    array_width,
    behavior_topk,
    check_lengths,
    check_manifest,
    check_metadata,
    describe,
    error_reason,
    kvstore_spec,
    manifest_array_names,
    open_arrays,
    read_checked,
    read_manifest,
    read_sample_metadata,
    required_lengths,
    teacher_array,
    unfinished,
)


class StoreReader:
    """Read-only view of the committed samples of one store (``lopd_jax.store.layout`` describes the format)."""

    def __init__(self, path: str | os.PathLike | dict):
        self.spec = kvstore_spec(path)
        self.path = describe(self.spec)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest (picks up samples committed since ``open``) and the per-sample metadata."""
        m = read_manifest(self.spec)
        check_manifest(m, self.path)
        self._load(m)

    def _load(self, m: dict) -> None:
        self._manifest, self.topk, self.teacher_committed = m, m["topk"], m["teacher_committed"]
        self.behavior_topk = behavior_topk(m)
        self.arrays = open_arrays(self.spec, m)
        names = manifest_array_names(m)
        # Per-token arrays written with the samples, and those written by the teacher pass (read when scored).
        self._token_names = [*TOKEN_ARRAYS, *(k for k in names if k.startswith("behavior_topk_"))]
        self._teacher_names = [k for k in names if teacher_array(k)]
        meta = read_sample_metadata(self.spec, self.arrays, m)
        self.offsets, self.answer_offsets = meta["sample_offsets"], meta["answer_offsets"]
        self.prompt_lengths = meta["prompt_lengths"].astype(np.int64)
        self.finish_codes, self.prompt_index = meta["finish_reason"], meta["prompt_index"]
        teacher_tokens = int(self.offsets[self.teacher_committed])
        check_lengths(self.spec, self.arrays, required_lengths(m, int(self.answer_offsets[-1]), teacher_tokens))
        check_metadata(self.path, self.offsets, self.prompt_lengths, self.finish_codes, m["committed_tokens"])

    def __getstate__(self) -> dict:
        # Pickled (e.g. into Grain worker processes) as its location and the manifest it read: the copy reopens
        # the arrays and sees exactly the same committed samples.
        return {"spec": self.spec, "manifest": self._manifest}

    def __setstate__(self, state: dict) -> None:
        self.spec, self.path = state["spec"], describe(state["spec"])
        self._load(state["manifest"])

    def __len__(self) -> int:
        return self._manifest["committed"]

    def incomplete(self) -> str | None:
        """What keeps this from being a finished input: fewer committed samples than its run planned
        (``store_layout.unfinished``), or None."""
        return unfinished(self._manifest, self.path)

    @property
    def manifest(self) -> dict:
        """A copy of the manifest dict."""
        return json.loads(json.dumps(self._manifest))

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: tokens (prompt + response) per committed sample; for length-aware packing."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return self._manifest["committed_tokens"]

    def sample(self, i: int) -> dict[str, Any]:
        """Committed sample ``i``: tokens [L] int32, prompt_length, finish_reason ("stop"/"length"),
        behavior_logprobs [L] f32, teacher_logprobs [L] f32 (NaN on prompt tokens / not scored), prompt_index,
        answer, and teacher_topk_ids / teacher_topk_logprobs [L, k] (teacher_topk_tail [L]) when the store has top-k,
        behavior_topk_ids / behavior_topk_logprobs / teacher_behavior_topk_logprobs [L, K] and
        teacher_behavior_topk_tail [L] when it has behaviour top-k."""
        return self.samples([i])[0]

    def samples(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several committed samples (see ``sample``); all reads are issued before any is awaited."""
        idx = np.asarray([self._check_index(i) for i in indices], np.int64)
        try:
            return self._samples(idx)
        except ValueError as e:  # a damaged chunk: name the array and the sample
            raise self._damage(idx, e) from None

    def read_array(self, name: str, lo: int, hi: int) -> np.ndarray:
        """``name``[lo:hi] of a per-token array; StoreError naming the array and sample of a damaged chunk."""
        a = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        b = int(np.searchsorted(self.offsets, hi, side="left"))
        data = read_checked(self.path, name, self.arrays[name], a, b, lambda i, j: (self.offsets[i], self.offsets[j]))
        return data[lo - int(self.offsets[a]) : hi - int(self.offsets[a])]

    def _damage(self, idx: np.ndarray, e: Exception) -> StoreError:
        """StoreError for the first sample of ``idx`` that cannot be read, array by array."""
        bounds = {"answers": lambda i, j: (self.answer_offsets[i], self.answer_offsets[j])}
        for i in idx.tolist():
            names = [*self._token_names, *(self._teacher_names if i < self.teacher_committed else []), "answers"]
            for name in names:
                span = bounds.get(name, lambda a, b: (self.offsets[a], self.offsets[b]))
                data = read_checked(self.path, name, self.arrays[name], i, i + 1, span)
                if name == "answers":
                    try:
                        json.loads(data.tobytes().decode("utf-8"))
                    except ValueError:
                        return StoreError(f"{self.path}: sample {i}: answer is not valid UTF-8 JSON")
        return StoreError(f"{self.path}: samples {idx.tolist()[:8]} cannot be read ({error_reason(e)})")

    def _samples(self, idx: np.ndarray) -> list[dict[str, Any]]:
        scored = idx[idx < self.teacher_committed]
        tnames = self._teacher_names
        reads = {name: self._read_ranges(name, self.offsets, idx) for name in self._token_names}
        reads |= {name: self._read_ranges(name, self.offsets, scored) for name in tnames}
        reads["answers"] = self._read_ranges("answers", self.answer_offsets, idx)
        got = {k: [f.result() for f in v] for k, v in reads.items()}
        teacher = {k: dict(zip(scored.tolist(), got[k])) for k in tnames}
        out = []
        for j, i in enumerate(idx.tolist()):
            s = {k: got[k][j] for k in self._token_names}
            for k in tnames:
                s[k] = teacher[k][i] if i in teacher[k] else self._unscored(k, len(s["tokens"]))
            s.update(self._scalars(i))
            s["answer"] = json.loads(got["answers"][j].tobytes().decode("utf-8"))
            out.append(s)
        return out

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range (store has {len(self)} committed samples)")
        return i

    def _scalars(self, i: int) -> dict[str, Any]:
        return {
            "prompt_length": int(self.prompt_lengths[i]),
            "finish_reason": FINISH_REASONS[int(self.finish_codes[i])],
            "prompt_index": int(self.prompt_index[i]),
        }

    def _unscored(self, name: str, length: int) -> np.ndarray:
        width = array_width(name, self.topk, self.behavior_topk)
        shape = (length, width) if width else (length,)
        return np.full(shape, -1, np.int32) if name == "teacher_topk_ids" else np.full(shape, np.nan, np.float32)

    def _read_ranges(self, name: str, offsets: np.ndarray, idx: np.ndarray) -> list:
        """Futures of name[offsets[i]:offsets[i + 1]] for i in idx; nearby ranges share one read of their span."""
        if idx.size == 0:
            return []
        starts, ends = offsets[idx], offsets[idx + 1]
        lo, hi, total = int(starts.min()), int(ends.max()), int((ends - starts).sum())
        arr = self.arrays[name]
        if hi - lo <= 2 * total + 4096:  # dense enough (e.g. sequential iteration): one read, slice in numpy
            span = arr[lo:hi].read().result()
            return [_Done(span[s - lo : e - lo]) for s, e in zip(starts.tolist(), ends.tolist())]
        return [arr[s:e].read() for s, e in zip(starts.tolist(), ends.tolist())]


class _Done:
    """A finished future (same ``result()`` interface as a TensorStore future)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


__all__ = ["StoreReader"]
