"""RolloutStore: the on-disk contract between precompute/ and the trainer (DESIGN.md "RolloutStore").

Layout: one directory (a local path, a ``file://`` / ``memory://`` / ``gs://`` ... TensorStore kvstore URL, or a
kvstore JSON spec) holding zarr3 arrays written with TensorStore and a JSON manifest::

    manifest.json               the manifest; its counts are the commit point
    tokens/            int32    [num_tokens]        prompt + response ids of every sample, concatenated
    behavior_logprobs/ float32  [num_tokens]        log pi_behavior(tokens[j] | tokens[:j]); NaN on prompt tokens
    teacher_logprobs/  float32  [teacher tokens]    log p_T(tokens[j] | tokens[:j]); NaN on prompt tokens
    teacher_topk_ids/  int32    [teacher tokens, k] (only when topk > 0) top-k ids of p_T(. | tokens[:j]), by rank
    teacher_topk_logprobs/ f32  [teacher tokens, k] (only when topk > 0) their log-probs
    sample_offsets/    int64    [N + 1]             sample i is tokens[offsets[i]:offsets[i + 1]]
    prompt_lengths/    int32    [N]                 the first prompt_lengths[i] tokens of sample i are the prompt
    finish_reason/     uint8    [N]                 0 = "stop" (ends with the stop token), 1 = "length"
    prompt_index/      int32    [N]                 line of the prompt in the prompt set
    answer_offsets/    int64    [N + 1]             answer i is json.loads(answers[answer_offsets[i]:...[i + 1]])
    answers/           uint8    [answer bytes]      UTF-8 JSON of each reference answer (``null`` when none)

Arrays are chunked (``chunk_tokens`` per inner chunk) inside shards of ``shard_chunks`` chunks (zarr3
``sharding_indexed`` codec, zstd inside), so a random read touches one small chunk and the file count stays low.
Teacher arrays are only as long as the teacher pass has got: samples at or past ``teacher_committed`` read as NaN.

Commit protocol: a flush resizes and writes every array (data first), waits for it, and only then replaces
``manifest.json`` atomically (temp file + rename for local paths, a single kvstore put otherwise). The manifest's
``committed`` / ``committed_tokens`` / ``teacher_committed`` are the only truth: readers never look past them, and a
killed writer reopened with ``RolloutStore.open_for_append`` continues at the last commit and overwrites whatever
was written after it, so the finished store equals an uninterrupted run's array for array.

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

The writer lives in ``lopd_jax.store_writer``. Reader API: see ``RolloutStore`` (``open``, ``len``, ``sample``,
``samples``, ``manifest``, ``lengths``, ``refresh``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

if TYPE_CHECKING:
    from lopd_jax.store_dataset import RolloutDataset
    from lopd_jax.store_writer import RolloutWriter

FORMAT = "lopd_jax.rollout_store"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FINISH_REASONS = ("stop", "length")
RESERVED_KEYS = ("format", "schema_version", "committed", "committed_tokens", "teacher_committed", "topk", "layout")

# name -> (dtype, length kind, fill value). Fill values are invalid data so a lost chunk never reads as plausible.
_TOKEN_ARRAYS = {"tokens": ("int32", -1), "behavior_logprobs": ("float32", "NaN")}
_TEACHER_ARRAYS = {"teacher_logprobs": ("float32", "NaN")}
_TOPK_ARRAYS = {"teacher_topk_ids": ("int32", -1), "teacher_topk_logprobs": ("float32", "NaN")}
_SAMPLE_ARRAYS = {"prompt_lengths": ("int32", -1), "finish_reason": ("uint8", 255), "prompt_index": ("int32", -1)}
_OFFSET_ARRAYS = {"sample_offsets": ("int64", -1), "answer_offsets": ("int64", -1)}
_BYTE_ARRAYS = {"answers": ("uint8", 0)}

_CONTEXT: ts.Context | None = None


class StoreError(ValueError):
    """A store that is missing, malformed or inconsistent; the message names the path and array/sample."""


def _context() -> ts.Context:
    """One process-wide TensorStore context: ``memory://`` stores and the chunk cache are shared through it."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})
    return _CONTEXT


def kvstore_spec(path: str | os.PathLike | dict) -> dict:
    """A kvstore JSON spec (with a trailing-slash directory path) for a local path, URL or spec."""
    if isinstance(path, dict):
        spec = dict(path)
    elif "://" in str(path):
        spec = ts.KvStore.Spec(str(path)).to_json()
    else:
        spec = {"driver": "file", "path": os.path.abspath(os.fspath(path))}
    p = spec.get("path", "")
    spec["path"] = p if (p == "" or p.endswith("/")) else p + "/"
    return spec


def _local_dir(spec: dict) -> str | None:
    return spec["path"] if spec["driver"] == "file" else None


def _describe(spec: dict) -> str:
    return ts.KvStore.Spec(spec).url if spec["driver"] != "file" else spec["path"].rstrip("/")


def _kvstore(spec: dict) -> ts.KvStore:
    return ts.KvStore.open(spec, context=_context()).result()


def _sub(spec: dict, name: str) -> dict:
    return {**spec, "path": spec["path"] + name + "/"}


# ------------------------------------------------------------------------------------------------ manifest I/O


def read_manifest(path: str | os.PathLike | dict) -> dict:
    """The manifest of the store at ``path``; StoreError naming the path when it is missing or not JSON."""
    spec = kvstore_spec(path)
    res = _kvstore(spec).read(MANIFEST).result()
    if res.state != "value":
        raise StoreError(f"{_describe(spec)}: no {MANIFEST} (not a RolloutStore, or its writer never committed)")
    try:
        manifest = json.loads(bytes(res.value).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{_describe(spec)}/{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{_describe(spec)}/{MANIFEST}: expected a JSON object")
    return manifest


def _write_manifest(spec: dict, manifest: dict) -> None:
    """Atomically replace the manifest: the commit point of every flush."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
    local = _local_dir(spec)
    if local is None:
        _kvstore(spec).write(MANIFEST, data).result()  # a single-key put is atomic on every kvstore driver
        return
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=local)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(local, MANIFEST))


def check_manifest(manifest: dict, where: str) -> None:
    """Schema checks of the reserved manifest fields; StoreError naming ``where`` and the field."""
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{where}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema_version {manifest.get('schema_version')!r} != {SCHEMA_VERSION} (this lopd_jax)"
        )
    for key in ("committed", "committed_tokens", "teacher_committed", "topk"):
        v = manifest.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise StoreError(f"{where}: manifest field {key!r} must be a non-negative int, got {v!r}")
    if manifest["teacher_committed"] > manifest["committed"]:
        raise StoreError(
            f"{where}: teacher_committed {manifest['teacher_committed']} > committed {manifest['committed']}"
        )
    if not isinstance(manifest.get("layout"), dict):
        raise StoreError(f"{where}: manifest field 'layout' missing")


# ------------------------------------------------------------------------------------------------ arrays


def _array_names(topk: int) -> dict[str, tuple[str, Any]]:
    names = {**_TOKEN_ARRAYS, **_TEACHER_ARRAYS, **_SAMPLE_ARRAYS, **_OFFSET_ARRAYS, **_BYTE_ARRAYS}
    return {**names, **_TOPK_ARRAYS} if topk else names


def _array_metadata(name: str, dtype: str, fill: Any, layout: dict, topk: int) -> dict:
    chunk = layout["chunk_samples"] if name in _SAMPLE_ARRAYS or name in _OFFSET_ARRAYS else layout["chunk_tokens"]
    inner, shape = [chunk], [0]
    if name in _TOPK_ARRAYS:  # keep a top-k chunk about as many bytes as a token chunk
        inner, shape = [max(16, chunk // topk), topk], [0, topk]
    outer = [inner[0] * layout["shard_chunks"], *inner[1:]]
    le = {"name": "bytes", "configuration": {"endian": "little"}}
    inner_codecs = [le, {"name": "zstd", "configuration": {"level": layout["zstd_level"]}}]
    shard = {"chunk_shape": inner, "codecs": inner_codecs, "index_codecs": [le, {"name": "crc32c"}]}
    return {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
        "codecs": [{"name": "sharding_indexed", "configuration": shard}],
        "fill_value": fill,
    }


def _open_array(spec: dict, name: str, *, create_meta: dict | None = None) -> ts.TensorStore:
    # Revalidate cached chunks and shard indexes on every read: another process may rewrite a shard (its tail
    # chunk) while this one reads committed data from it.
    arr_spec: dict[str, Any] = {"driver": "zarr3", "kvstore": _sub(spec, name), "recheck_cached_data": True}
    if create_meta is not None:
        arr_spec.update(metadata=create_meta, create=True, delete_existing=True)
    try:
        return ts.open(arr_spec, context=_context()).result()
    except ValueError as e:
        raise StoreError(f"{_describe(spec)}: array {name!r} cannot be opened ({e})") from None


def open_arrays(spec: dict, manifest: dict) -> dict[str, ts.TensorStore]:
    """Open every array the manifest implies, checking dtype and rank; StoreError naming the array."""
    arrays = {}
    for name, (dtype, _) in _array_names(manifest["topk"]).items():
        arr = _open_array(spec, name)
        rank = 2 if name in _TOPK_ARRAYS else 1
        if arr.dtype.name != dtype or arr.rank != rank:
            raise StoreError(
                f"{_describe(spec)}: array {name!r} is {arr.dtype.name}[rank {arr.rank}], expected {dtype}[rank {rank}]"
            )
        if rank == 2 and arr.shape[1] != manifest["topk"]:
            raise StoreError(
                f"{_describe(spec)}: array {name!r} has k={arr.shape[1]}, manifest topk={manifest['topk']}"
            )
        arrays[name] = arr
    return arrays


def required_lengths(manifest: dict, answer_bytes: int, teacher_tokens: int) -> dict[str, int]:
    """Minimum length of each array's first axis implied by the manifest's commits."""
    n, n_tok = manifest["committed"], manifest["committed_tokens"]
    need = {k: n_tok for k in _TOKEN_ARRAYS} | {k: n for k in _SAMPLE_ARRAYS} | {k: n + 1 for k in _OFFSET_ARRAYS}
    need |= {"answers": answer_bytes, "teacher_logprobs": teacher_tokens}
    if manifest["topk"]:
        need |= {k: teacher_tokens for k in _TOPK_ARRAYS}
    return need


def check_lengths(spec: dict, arrays: dict[str, ts.TensorStore], need: dict[str, int]) -> None:
    for name, n in need.items():
        if arrays[name].shape[0] < n:
            raise StoreError(
                f"{_describe(spec)}: array {name!r} is truncated: {arrays[name].shape[0]} entries, "
                f"the manifest commits {n}"
            )


def _reason(e: Exception) -> str:
    """The first line of a TensorStore error (e.g. ``DATA_LOSS: ... Digest mismatch``), for a one-line message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_checked(where: str, name: str, arr: ts.TensorStore, a: int, b: int, bounds=None) -> np.ndarray:
    """``arr`` over the entries of samples [a, b): ``bounds(a, b)`` -> (lo, hi), default (a, b) (per-sample arrays).

    A damaged chunk (truncated or corrupt shard, failed checksum) raises StoreError naming ``where`` (the store),
    the array and the first sample it hits, found by bisection, instead of TensorStore's traceback."""
    bounds = bounds or (lambda i, j: (i, j))
    lo, hi = bounds(a, b)
    try:
        return arr[lo:hi].read().result()
    except ValueError as e:
        while b - a > 1:  # the first bad sample: reads of [a, mid) succeed or fail as a whole
            mid = (a + b) // 2
            try:
                arr[slice(*bounds(a, mid))].read().result()
                a = mid
            except ValueError:
                b = mid
        raise StoreError(f"{where}: array {name!r} is damaged at sample {a} ({_reason(e)})") from None


def read_sample_metadata(spec: dict, arrays: dict[str, ts.TensorStore], manifest: dict) -> dict[str, np.ndarray]:
    """The committed per-sample arrays (offsets [N + 1], others [N]), after checking they are long enough."""
    n = manifest["committed"]
    need = {k: n for k in _SAMPLE_ARRAYS} | {k: n + 1 for k in _OFFSET_ARRAYS}
    check_lengths(spec, arrays, need)
    where, out = _describe(spec), {}
    for k, length in need.items():
        plus = length - n  # offsets arrays: sample i spans entries [i, i + 1]
        out[k] = read_checked(where, k, arrays[k], 0, n, lambda i, j, plus=plus: (i, j + plus))
    return out


def check_metadata(where: str, offsets: np.ndarray, prompt_lengths: np.ndarray, finish: np.ndarray, n_tok: int):
    """Offsets start at 0, each sample has a prompt and >= 1 response token, offsets end at committed_tokens."""
    if offsets.size == 0 or offsets[0] != 0:
        raise StoreError(f"{where}: sample_offsets[0] is {offsets[:1].tolist()}, expected 0")
    lengths = np.diff(offsets)
    bad = np.flatnonzero((prompt_lengths < 1) | (lengths <= prompt_lengths))
    if bad.size:
        i = int(bad[0])
        raise StoreError(
            f"{where}: sample {i}: offsets inconsistent with its prompt: {int(lengths[i])} tokens "
            f"(offsets {int(offsets[i])}..{int(offsets[i + 1])}), prompt_length {int(prompt_lengths[i])}"
        )
    if offsets[-1] != n_tok:
        raise StoreError(f"{where}: sample_offsets[-1] = {int(offsets[-1])} != committed_tokens {n_tok}")
    bad = np.flatnonzero(finish >= len(FINISH_REASONS))
    if bad.size:
        raise StoreError(f"{where}: sample {int(bad[0])}: finish_reason code {int(finish[bad[0]])} is not 0/1")


# ------------------------------------------------------------------------------------------------ reader


class RolloutStore:
    """Read-only view of the committed samples of a store (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike | dict):
        self.spec = kvstore_spec(path)
        self.path = _describe(self.spec)
        self.refresh()

    @classmethod
    def open(cls, path: str | os.PathLike | dict) -> RolloutStore | RolloutDataset:
        """Open a store for reading; StoreError naming the path for a missing manifest or an inconsistent store.

        A dataset directory of shard stores (``precompute`` with ``--num-shards``) opens as a
        ``lopd_jax.store_dataset.RolloutDataset``: the same reader API over all its shards, in shard order."""
        from lopd_jax.store_dataset import RolloutDataset, is_dataset

        spec = kvstore_spec(path)
        if _kvstore(spec).read(MANIFEST).result().state != "value" and is_dataset(spec):
            return RolloutDataset(spec)
        return cls(spec)

    @classmethod
    def create(cls, path, manifest: dict, topk: int = 0, **kwargs) -> RolloutWriter:
        """A writer for a new, empty store at ``path`` (see ``lopd_jax.store_writer.RolloutWriter.create``)."""
        from lopd_jax.store_writer import RolloutWriter

        return RolloutWriter.create(path, manifest, topk=topk, **kwargs)

    @classmethod
    def open_for_append(cls, path, **kwargs) -> RolloutWriter:
        """A writer that continues an existing store where its last commit ended."""
        from lopd_jax.store_writer import RolloutWriter

        return RolloutWriter.open(path, **kwargs)

    def refresh(self) -> None:
        """Re-read the manifest (picks up samples committed since ``open``) and the per-sample metadata."""
        m = read_manifest(self.spec)
        check_manifest(m, self.path)
        self._load(m)

    def _load(self, m: dict) -> None:
        self._manifest, self.topk, self.teacher_committed = m, m["topk"], m["teacher_committed"]
        self.arrays = open_arrays(self.spec, m)
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
        self.spec, self.path = state["spec"], _describe(state["spec"])
        self._load(state["manifest"])

    def __len__(self) -> int:
        return self._manifest["committed"]

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
        answer, and teacher_topk_ids / teacher_topk_logprobs [L, k] when the store has top-k."""
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
            names = [*_TOKEN_ARRAYS, *(["teacher_logprobs", *(_TOPK_ARRAYS if self.topk else ())]
                                       if i < self.teacher_committed else []), "answers"]  # fmt: skip
            for name in names:
                span = bounds.get(name, lambda a, b: (self.offsets[a], self.offsets[b]))
                data = read_checked(self.path, name, self.arrays[name], i, i + 1, span)
                if name == "answers":
                    try:
                        json.loads(data.tobytes().decode("utf-8"))
                    except ValueError:
                        return StoreError(f"{self.path}: sample {i}: answer is not valid UTF-8 JSON")
        return StoreError(f"{self.path}: samples {idx.tolist()[:8]} cannot be read ({_reason(e)})")

    def _samples(self, idx: np.ndarray) -> list[dict[str, Any]]:
        scored = idx[idx < self.teacher_committed]
        tnames = ["teacher_logprobs", *(_TOPK_ARRAYS if self.topk else ())]
        reads = {name: self._read_ranges(name, self.offsets, idx) for name in _TOKEN_ARRAYS}
        reads |= {name: self._read_ranges(name, self.offsets, scored) for name in tnames}
        reads["answers"] = self._read_ranges("answers", self.answer_offsets, idx)
        got = {k: [f.result() for f in v] for k, v in reads.items()}
        teacher = {k: dict(zip(scored.tolist(), got[k])) for k in tnames}
        out = []
        for j, i in enumerate(idx.tolist()):
            s = {k: got[k][j] for k in _TOKEN_ARRAYS}
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
        shape = (length, self.topk) if name in _TOPK_ARRAYS else (length,)
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


__all__ = ["FORMAT", "SCHEMA_VERSION", "FINISH_REASONS", "RolloutStore", "StoreError", "read_checked"]
