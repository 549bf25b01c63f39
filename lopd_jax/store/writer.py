"""RolloutWriter: appends samples and teacher columns to a RolloutStore and commits them (the writer layer).

It imports the format (``lopd_jax.store.layout``, where the layout and the commit protocol are described) and the
writer lock (``lopd_jax.store.lock``), never the reader: a writer checks what it resumes with the layout's own
checks. Writers are obtained with ``RolloutStore.create`` / ``RolloutStore.open_for_append`` (``lopd_jax.store``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from lopd_jax.store.layout import (
    FINISH_REASONS,
    FORMAT,
    MANIFEST,
    OFFSET_ARRAYS,
    SAMPLE_ARRAYS,
    SCHEMA_VERSION,
    TOKEN_ARRAYS,
    StoreError,
    array_metadata,
    array_names,
    array_width,
    behavior_topk,
    check_lengths,
    check_manifest,
    check_metadata,
    check_user_keys,
    delete_manifest,
    describe,
    error_reason,
    has_manifest,
    kvstore_spec,
    local_dir,
    open_array,
    open_arrays,
    read_manifest,
    read_sample_metadata,
    required_lengths,
    teacher_array,
    write_manifest,
)
from lopd_jax.store.lock import FileLock, store_lock


class _Column:
    """Appends to one resizable array in blocks that start on an inner-chunk boundary.

    The partial last chunk (``tail``) stays in memory and is rewritten with the next block, so no write ever
    starts mid-chunk and a resumed writer overwrites anything a killed one left past the commit.
    """

    def __init__(self, arr: ts.TensorStore, end: int):
        self.arr, self.end = arr, end
        self.chunk = arr.chunk_layout.read_chunk.shape[0]
        start = end // self.chunk * self.chunk
        empty = np.empty((0, *arr.shape[1:]), arr.dtype.numpy_dtype)
        self.tail = arr[start:end].read().result() if end > start else empty

    def write(self, data: np.ndarray) -> ts.Future:
        start, new_end = self.end - len(self.tail), self.end + len(data)
        block = np.concatenate([self.tail, data.astype(self.arr.dtype.numpy_dtype, copy=False)])
        bound = [new_end] + [None] * (self.arr.rank - 1)
        self.arr = self.arr.resize(exclusive_max=bound, resize_metadata_only=True).result()
        future = self.arr[start:new_end].write(block)
        self.tail = block[len(block) - (new_end - new_end // self.chunk * self.chunk) :]
        self.end = new_end
        return future


def _full_length(values, length: int, prompt_length: int, what: str, where: str) -> np.ndarray:
    """Per-token values [length] from full-length or response-only input; NaN on prompt tokens."""
    v = np.asarray(values, np.float32)
    if v.shape[0] == length - prompt_length:
        v = np.concatenate([np.full((prompt_length, *v.shape[1:]), np.nan, np.float32), v])
    if v.shape[0] != length:
        raise StoreError(
            f"{where}: {what} has {v.shape[0]} entries, expected {length} (all tokens) "
            f"or {length - prompt_length} (response tokens)"
        )
    v = v.copy()
    v[:prompt_length] = np.nan
    if not np.all(np.isfinite(v[prompt_length:])):
        j = prompt_length + int(
            np.flatnonzero(~np.isfinite(v[prompt_length:]).reshape(len(v) - prompt_length, -1).any(-1))[0]
        )
        raise StoreError(f"{where}: {what} is not finite at token {j} (a response token)")
    return v


def _topk_rows(
    ids, logprobs, length: int, p: int, k: int, what: str, where: str, distinct: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """([length, k] int32 ids with -1 on prompt rows, [length, k] f32 log-probs with NaN there) from full-length or
    response-only input; log-probs finite, ids (``distinct``) >= 0 and distinct within a row (a bucket each)."""
    ids = np.array(ids, np.int32)  # a copy: prompt rows are overwritten below
    if ids.ndim == 2 and len(ids) == length - p:
        ids = np.concatenate([np.full((p, ids.shape[1]), -1, np.int32), ids])
    if ids.shape != (length, k):
        raise StoreError(f"{where}: {what}_ids shape {ids.shape} != {(length, k)} (tokens, k)")
    ids[:p] = -1
    resp = np.sort(ids[p:], axis=-1)
    bad = np.flatnonzero((resp[:, 0] < 0) | (np.diff(resp, axis=-1) == 0).any(-1)) if distinct else []
    if len(bad):
        raise StoreError(f"{where}: {what}_ids at token {p + int(bad[0])} are not distinct ids >= 0")
    return ids, _full_length(logprobs, length, p, f"{what}_logprobs", where)


def _tail(values, length: int, p: int, what: str, where: str) -> np.ndarray:
    """A per-token tail log-mass [length] (NaN on prompt rows): <= 0 up to rounding, -inf allowed (an empty or
    underflowed tail bucket), NaN or +inf refused."""
    v = np.asarray(values, np.float32)
    if v.shape[0] == length - p:
        v = np.concatenate([np.full(p, np.nan, np.float32), v])
    if v.shape != (length,):
        raise StoreError(f"{where}: {what} has shape {v.shape}, expected ({length},) or ({length - p},)")
    v = v.copy()
    v[:p] = np.nan
    bad = np.flatnonzero(np.isnan(v[p:]) | (v[p:] == np.inf))
    if bad.size:
        raise StoreError(f"{where}: {what} is {v[p + bad[0]]} at token {p + int(bad[0])} (a response token)")
    return v


def _normalize_sample(s: dict, where: str, k: int = 0) -> dict:
    tokens = np.asarray(s["tokens"])
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise StoreError(f"{where}: tokens must be a 1-D integer array, got {tokens.dtype}{list(tokens.shape)}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
        raise StoreError(f"{where}: token ids must be in [0, 2**31)")
    p, n = int(s["prompt_length"]), len(tokens)
    if not 1 <= p < n:
        raise StoreError(f"{where}: prompt_length {p} must be in [1, {n}) (a prompt and >= 1 response token)")
    fr = s["finish_reason"]
    if fr not in FINISH_REASONS:
        raise StoreError(f"{where}: finish_reason {fr!r} not in {FINISH_REASONS}")
    pi = int(s["prompt_index"])
    if pi < 0:
        raise StoreError(f"{where}: prompt_index {pi} < 0")
    out = {
        "tokens": tokens.astype(np.int32),
        "behavior_logprobs": np.full(n, np.nan, np.float32)  # None: no behaviour policy (imported SFT data)
        if s["behavior_logprobs"] is None
        else _full_length(s["behavior_logprobs"], n, p, "behavior_logprobs", where),
        "prompt_length": p,
        "finish_reason": FINISH_REASONS.index(fr),
        "prompt_index": pi,
        "answer": json.dumps(s.get("answer"), ensure_ascii=False).encode("utf-8"),
    }
    if k:  # the store records the rollout policy's top-k: every sample brings it
        if s.get("behavior_topk_ids") is None or s.get("behavior_topk_logprobs") is None:
            raise StoreError(f"{where}: the store has behavior_topk={k}; the sample has no behavior_topk_ids/_logprobs")
        ids, lps = _topk_rows(s["behavior_topk_ids"], s["behavior_topk_logprobs"], n, p, k, "behavior_topk", where)
        out |= {"behavior_topk_ids": ids, "behavior_topk_logprobs": lps}
    return out


class RolloutWriter:
    """Appends samples and teacher columns to a store; see the module docstring for the protocol."""

    def __init__(
        self,
        spec: dict,
        manifest: dict,
        arrays: dict[str, ts.TensorStore],
        flush_tokens: int | None,
        lock: FileLock | None = None,
    ):
        self.spec, self.path, self._manifest, self._lock = spec, describe(spec), manifest, lock
        self.topk, self.behavior_topk = manifest["topk"], behavior_topk(manifest)
        self.topk_tail = bool(manifest.get("topk_tail"))
        n, tc = manifest["committed"], manifest["teacher_committed"]
        layout = manifest["layout"]
        self.flush_tokens = flush_tokens or layout["chunk_tokens"] * layout["shard_chunks"]
        meta = read_sample_metadata(spec, arrays, manifest)
        teacher_tokens, answer_bytes = int(meta["sample_offsets"][tc]), int(meta["answer_offsets"][n])
        check_lengths(spec, arrays, required_lengths(manifest, answer_bytes, teacher_tokens))
        args = (meta["sample_offsets"], meta["prompt_lengths"], meta["finish_reason"], manifest["committed_tokens"])
        check_metadata(self.path, *args)  # never append to a store that is already inconsistent
        ends = {k: manifest["committed_tokens"] for k in TOKEN_ARRAYS} | {k: n for k in SAMPLE_ARRAYS}
        ends |= {k: n + 1 for k in OFFSET_ARRAYS} | {"answers": answer_bytes}
        ends |= {k: teacher_tokens for k in arrays if teacher_array(k)}
        ends |= {k: manifest["committed_tokens"] for k in arrays if k.startswith("behavior_topk_")}
        self._cols = {k: _Column(arrays[k], e) for k, e in ends.items()}
        self._pending: list[dict] = []
        self._pending_teacher: list[tuple] = []
        self._dirty = False

    @classmethod
    def create(
        cls,
        path: str | os.PathLike | dict,
        manifest: dict,
        topk: int = 0,
        *,
        behavior_topk: int = 0,
        topk_tail: bool = False,
        chunk_tokens: int = 1 << 14,
        chunk_samples: int = 1 << 12,
        shard_chunks: int = 64,
        zstd_level: int = 3,
        flush_tokens: int | None = None,
        overwrite: bool = False,
    ) -> RolloutWriter:
        """Create an empty store at ``path`` with the user ``manifest`` fields (fingerprints, sampling, ...).

        A local store is built in a hidden directory beside ``path`` and renamed into place with its first
        (empty) commit, under its writer lock: ``path`` is either absent or a whole store, never half made. An
        existing directory that is not empty is refused before anything is written. ``overwrite`` (non-local
        stores only) replaces a store. Flushes every ``flush_tokens`` appended tokens (default: one shard).
        ``topk``: width of the teacher's own top-k columns, with their tail column when ``topk_tail``;
        ``behavior_topk``: K of the rollout policy's top-k columns (and of the teacher's scores of them)."""
        spec = kvstore_spec(path)
        check_user_keys(manifest, describe(spec))
        layout = {"chunk_tokens": chunk_tokens, "chunk_samples": chunk_samples, "shard_chunks": shard_chunks}
        layout["zstd_level"] = zstd_level
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        full = {**manifest, "format": FORMAT, "schema_version": SCHEMA_VERSION, "topk": topk, "layout": layout}
        full.update(behavior_topk=behavior_topk, topk_tail=bool(topk) and topk_tail)
        full.update(committed=0, committed_tokens=0, teacher_committed=0, created_at=now)
        if local_dir(spec) is not None:
            return cls._create_local(spec, full, flush_tokens, overwrite)
        if not overwrite and has_manifest(spec):
            raise StoreError(f"{describe(spec)}: a store already exists (open_for_append to resume)")
        if overwrite:  # uncommit first: a crash while the arrays are recreated leaves no store, not a broken one
            delete_manifest(spec)
        arrays = _create_arrays(spec, full)
        return cls(spec, full, arrays, flush_tokens)

    @classmethod
    def _create_local(cls, spec: dict, full: dict, flush_tokens: int | None, overwrite: bool) -> RolloutWriter:
        final = local_dir(spec).rstrip("/")
        old_lock = None  # overwrite: the old store's lock, so that no writer of it is running while it is replaced
        if overwrite and os.path.exists(os.path.join(final, MANIFEST)):
            old_lock = store_lock(final, final)
        else:
            check_new_store_dir(final)
        parent, name = os.path.split(final)
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{name}.creating-{os.getpid()}-", dir=parent)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 would hide the store from the rest of a group
        except OSError as e:
            raise StoreError(f"{final}: cannot create the store ({e.strerror}: {e.filename})") from None
        try:
            lock = store_lock(tmp, final)
            _create_arrays(kvstore_spec(tmp), full)
            _publish(tmp, final, replace=old_lock is not None)
            lock.path = os.path.join(final, os.path.basename(lock.path))
        except StoreError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (OSError, ValueError) as e:  # a full disk while the empty arrays are made: nothing is left
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{final}: cannot create the store ({error_reason(e)}); nothing was written") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old_lock is not None:
                old_lock.release()
        return cls(spec, full, open_arrays(spec, full), flush_tokens, lock)

    @classmethod
    def open(cls, path: str | os.PathLike | dict, flush_tokens: int | None = None) -> RolloutWriter:
        """Reopen a store for appending (taking its writer lock); continues exactly where the last commit ended."""
        spec = kvstore_spec(path)
        check_manifest(read_manifest(spec), describe(spec))  # a directory that is no store gets no lock file
        lock = store_lock(local_dir(spec), describe(spec)) if local_dir(spec) is not None else None
        try:
            manifest = read_manifest(spec)  # again, under the lock: the last writer may have committed meanwhile
            check_manifest(manifest, describe(spec))
            return cls(spec, manifest, open_arrays(spec, manifest), flush_tokens, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _verify_lock(self, what: str) -> None:
        if self._lock is not None:
            self._lock.verify(f"{what} of {len(self._pending)} samples / {len(self._pending_teacher)} teacher rows")

    def release(self) -> None:
        """Give up the writer lock without flushing (what was not committed is lost, as in a crash)."""
        if self._lock is not None:
            self._lock.release()

    def discard_empty(self) -> None:
        """Delete this store, which must have no committed sample, and release it (a rerun then recreates it).

        For a run that failed after creating its store: its empty store must not block the corrected rerun. A
        store with committed samples is never deleted."""
        on_disk = read_manifest(self.spec)
        if self.committed or self._pending or on_disk.get("committed") or on_disk.get("teacher_committed"):
            raise StoreError(f"{self.path}: has committed samples; refusing to delete it")
        local = local_dir(self.spec)
        if local is None:
            delete_manifest(self.spec)
        else:
            parent, name = os.path.split(local.rstrip("/"))
            trash = tempfile.mkdtemp(prefix=f".{name}.discarded-", dir=parent)
            os.rename(local.rstrip("/"), os.path.join(trash, name))  # atomic: the store vanishes as a whole
            shutil.rmtree(trash, ignore_errors=True)
        self.release()

    @property
    def committed(self) -> int:
        """Samples committed (visible to readers)."""
        return self._manifest["committed"]

    @property
    def teacher_committed(self) -> int:
        return self._manifest["teacher_committed"]

    @property
    def teacher_end(self) -> int:
        """Index of the next sample ``write_teacher`` expects (committed + buffered teacher rows)."""
        return self.teacher_committed + len(self._pending_teacher)

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))

    def update_manifest(self, **fields) -> None:
        """Set user manifest fields (e.g. teacher=fingerprint); written with the next commit."""
        check_user_keys(fields, self.path)
        self._manifest.update(fields)
        self._dirty = True

    def append(self, samples: Sequence[dict]) -> None:
        """Buffer samples (dicts: tokens, prompt_length, finish_reason, behavior_logprobs, prompt_index,
        optional answer); flushes whenever a shard's worth of tokens is buffered."""
        base = self.committed + len(self._pending)
        for j, s in enumerate(samples):
            self._pending.append(_normalize_sample(s, f"{self.path}: appended sample {base + j}", self.behavior_topk))
        if sum(len(s["tokens"]) for s in self._pending) >= self.flush_tokens:
            self.flush()

    def write_teacher(
        self,
        start: int,
        per_sample_logprobs: Sequence,
        topk: tuple | None = None,
        *,
        topk_tail: Sequence | None = None,
        behavior: tuple | None = None,
    ) -> None:
        """Buffer teacher log-probs of committed samples start, start+1, ... (start must be ``teacher_end``).

        per_sample_logprobs[i]: [L_i] or [L_i - prompt_length_i] f32, entry j = log p_T(tokens[j] | tokens[:j]).
        topk: (ids, logprobs) with ids[i] / logprobs[i] of shape [L_i or response, k], required iff topk > 0.
        topk_tail: [L_i or response] log(1 - sum_k p_T(ids_k)) per sample, required iff the store has ``topk_tail``.
        behavior: (logprobs, tail): log p_T at the sample's behavior_topk_ids [L_i or response, K] and the tail
        [L_i or response], required iff behavior_topk > 0. A tail may be -inf (an empty tail bucket), never NaN."""
        n = len(per_sample_logprobs)
        if start != self.teacher_end or start + n > self.committed:
            raise StoreError(
                f"{self.path}: write_teacher(start={start}, {n} samples): expected start {self.teacher_end} "
                f"and start + n <= committed {self.committed}"
            )
        if (topk is None) != (self.topk == 0):
            raise StoreError(f"{self.path}: store has topk={self.topk}; topk columns must be given iff topk > 0")
        if (topk_tail is None) != (not self.topk_tail):
            raise StoreError(f"{self.path}: store has topk_tail={self.topk_tail}; topk_tail must be given iff it is")
        if (behavior is None) != (self.behavior_topk == 0):
            raise StoreError(
                f"{self.path}: store has behavior_topk={self.behavior_topk}; the teacher's scores of the behaviour "
                "top-k must be given iff behavior_topk > 0"
            )
        offsets = self._cols["sample_offsets"].arr[start : start + n + 1].read().result()
        plens = self._cols["prompt_lengths"].arr[start : start + n].read().result()
        for i in range(n):
            where, length, p = (
                f"{self.path}: teacher row of sample {start + i}",
                int(offsets[i + 1] - offsets[i]),
                int(plens[i]),
            )
            row = [_full_length(per_sample_logprobs[i], length, p, "teacher_logprobs", where)]
            if topk is not None:
                row += _topk_rows(topk[0][i], topk[1][i], length, p, self.topk, "teacher_topk", where, self.topk_tail)
            if topk_tail is not None:
                row.append(_tail(topk_tail[i], length, p, "teacher_topk_tail", where))
            if behavior is not None:
                lps = _full_length(behavior[0][i], length, p, "teacher_behavior_topk_logprobs", where)
                if lps.shape != (length, self.behavior_topk):
                    raise StoreError(
                        f"{where}: teacher_behavior_topk_logprobs shape {lps.shape} != {(length, self.behavior_topk)}"
                    )
                row += [lps, _tail(behavior[1][i], length, p, "teacher_behavior_topk_tail", where)]
            self._pending_teacher.append(tuple(row))
        if sum(len(r[0]) for r in self._pending_teacher) >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        """Write buffered data, wait for it, then commit the new counts in the manifest."""
        if not (self._pending or self._pending_teacher or self._dirty):
            return
        self._verify_lock("write")  # a writer whose lock file was replaced must not touch another's data
        m = dict(self._manifest)
        try:
            futures = self._write_samples() + self._write_teacher_rows()
            for f in futures:
                f.result()
            self._verify_lock("commit")
            m["committed"] += len(self._pending)
            m["committed_tokens"] = self._cols["tokens"].end
            m["teacher_committed"] += len(self._pending_teacher)
            m["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_manifest(self.spec, m)
        except StoreError:
            self.release()
            raise
        except (OSError, ValueError) as e:  # a full disk, a quota, an I/O error (TensorStore raises ValueError)
            self.release()  # this writer's columns are past its commit now: it must not write again
            raise StoreError(
                f"{self.path}: cannot write ({error_reason(e)}); nothing of this commit is visible: the store keeps "
                f"its last commit ({self.committed} samples, {self.teacher_committed} scored); fix the cause (free "
                "space) and rerun the same command to continue"
            ) from None
        self._manifest = m
        self._pending, self._pending_teacher, self._dirty = [], [], False

    def _write_samples(self) -> list:
        if not self._pending:
            return []
        p = self._pending
        lengths = np.array([len(s["tokens"]) for s in p], np.int64)
        alens = np.array([len(s["answer"]) for s in p], np.int64)
        c = self._cols
        data = {
            "tokens": np.concatenate([s["tokens"] for s in p]),
            "behavior_logprobs": np.concatenate([s["behavior_logprobs"] for s in p]),
            "sample_offsets": c["tokens"].end + np.cumsum(lengths),
            "prompt_lengths": np.array([s["prompt_length"] for s in p], np.int32),
            "finish_reason": np.array([s["finish_reason"] for s in p], np.uint8),
            "prompt_index": np.array([s["prompt_index"] for s in p], np.int32),
            "answer_offsets": c["answers"].end + np.cumsum(alens),
            "answers": np.frombuffer(b"".join(s["answer"] for s in p), np.uint8),
        }
        if self.behavior_topk:
            data |= {k: np.concatenate([s[k] for s in p]) for k in ("behavior_topk_ids", "behavior_topk_logprobs")}
        return [c[k].write(v) for k, v in data.items()]

    def _write_teacher_rows(self) -> list:
        if not self._pending_teacher:
            return []
        names = ["teacher_logprobs", *(["teacher_topk_ids", "teacher_topk_logprobs"] if self.topk else [])]
        names += ["teacher_topk_tail"] if self.topk_tail else []
        names += ["teacher_behavior_topk_logprobs", "teacher_behavior_topk_tail"] if self.behavior_topk else []
        cols = zip(*self._pending_teacher)
        return [self._cols[k].write(np.concatenate(v)) for k, v in zip(names, cols)]

    def close(self) -> None:
        """Flush what is buffered and release the writer lock (the store can be reopened for appending)."""
        try:
            self.flush()
        finally:
            self.release()

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.release()


def _umask() -> int:
    """This process's umask (read from /proc: setting it to read it back would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def check_new_store_dir(path: str) -> None:
    """Refuse to create a store where something else lives: ``path`` may be absent or an empty directory."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise StoreError(f"{path}: exists and is not a directory; nothing was written (choose a new path)")
    entries = sorted(os.listdir(path))
    if MANIFEST in entries:
        raise StoreError(f"{path}: a store already exists (open_for_append to resume)")
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise StoreError(
            f"{path}: exists and is not a RolloutStore (it holds {shown}); nothing was written: choose a new "
            "path or empty it"
        )


def _create_arrays(spec: dict, full: dict) -> dict[str, ts.TensorStore]:
    """The empty arrays of a new store, then its first (empty) commit."""
    k, kb = full["topk"], full["behavior_topk"]
    arrays = {
        name: open_array(
            spec, name, create_meta=array_metadata(name, dtype, fill, full["layout"], array_width(name, k, kb))
        )
        for name, (dtype, fill) in array_names(k, kb, full["topk_tail"]).items()
    }
    for name in OFFSET_ARRAYS:
        arrays[name] = arrays[name].resize(exclusive_max=[1], resize_metadata_only=True).result()
        arrays[name][0:1].write(np.zeros(1, np.int64)).result()
    write_manifest(spec, full)
    return arrays


def _publish(tmp: str, final: str, replace: bool = False) -> None:
    """Rename the finished new store into place; an empty directory there is replaced, anything else kept
    (``replace``: the old store at ``final``, whose lock the caller holds, is moved aside and deleted)."""
    if replace:
        parent, name = os.path.split(final)
        trash = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
        os.rename(final, os.path.join(trash, name))
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError as e:
        raise StoreError(
            f"{final}: appeared while this store was being created ({e.strerror}); another writer? nothing of it "
            "was changed"
        ) from None


__all__ = ["RolloutWriter"]
