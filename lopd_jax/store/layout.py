"""The RolloutStore format: constants, kvstore locations, manifest I/O and checks, array helpers.

The bottom layer of the store (levanter's format/array split): the reader (``lopd_jax.store.reader``), the writer
(``lopd_jax.store.writer``), sharded datasets (``lopd_jax.store.dataset``) and ``precompute.validate`` all import
this module and nothing here imports them, so the format is defined once and every layer checks it the same way.

Layout: one directory (a local path, a ``file://`` / ``memory://`` / ``gs://`` ... TensorStore kvstore URL, or a
kvstore JSON spec) holding zarr3 arrays written with TensorStore and a JSON manifest::

    manifest.json               the manifest; its counts are the commit point
    tokens/            int32    [num_tokens]        prompt + response ids of every sample, concatenated
    behavior_logprobs/ float32  [num_tokens]        log pi_behavior(tokens[j] | tokens[:j]); NaN on prompt tokens
    teacher_logprobs/  float32  [teacher tokens]    log p_T(tokens[j] | tokens[:j]); NaN on prompt tokens
    teacher_topk_ids/  int32    [teacher tokens, k] (only when topk > 0) top-k ids of p_T(. | tokens[:j]), by rank
    teacher_topk_logprobs/ f32  [teacher tokens, k] (only when topk > 0) their log-probs
    teacher_topk_tail/ float32  [teacher tokens]    (topk > 0, stores with ``topk_tail``) log(1 - sum_k p_T(id_k))
    behavior_topk_ids/ int32    [num_tokens, K]     (only when behavior_topk = K > 0) the K most likely ids of the
                                                    raw rollout policy at token j, by rank; -1 on prompt tokens
    behavior_topk_logprobs/ f32 [num_tokens, K]     (behavior_topk > 0) their raw log-probs
    teacher_behavior_topk_logprobs/ f32 [teacher tokens, K]  (behavior_topk > 0) log p_T at behavior_topk_ids
    teacher_behavior_topk_tail/ f32 [teacher tokens] (behavior_topk > 0) log(1 - sum_k p_T(behavior id_k))
    sample_offsets/    int64    [N + 1]             sample i is tokens[offsets[i]:offsets[i + 1]]
    prompt_lengths/    int32    [N]                 the first prompt_lengths[i] tokens of sample i are the prompt
    finish_reason/     uint8    [N]                 0 = "stop" (ends with the stop token), 1 = "length"
    prompt_index/      int32    [N]                 line of the prompt in the prompt set
    answer_offsets/    int64    [N + 1]             answer i is json.loads(answers[answer_offsets[i]:...[i + 1]])
    answers/           uint8    [answer bytes]      UTF-8 JSON of each reference answer (``null`` when none)

A tail is computed in log space from the full logits (the logsumexp of the ids not in the set, less the
logsumexp of all), so it is finite for any finite logits; it is ``-inf`` exactly when the set is the whole
vocabulary (K = V: the tail bucket is empty), never NaN on a response token.

Arrays are chunked (``chunk_tokens`` per inner chunk) inside shards of ``shard_chunks`` chunks (zarr3
``sharding_indexed`` codec, zstd inside), so a random read touches one small chunk and the file count stays low.
Teacher arrays are only as long as the teacher pass has got: samples at or past ``teacher_committed`` read as NaN.

Commit protocol: a flush resizes and writes every array (data first), waits for it, and only then replaces
``manifest.json`` atomically (``write_manifest``: temp file + rename for local paths, a single kvstore put
otherwise). The manifest's ``committed`` / ``committed_tokens`` / ``teacher_committed`` are the only truth: readers
never look past them, and a killed writer reopened with ``RolloutStore.open_for_append`` continues at the last
commit and overwrites whatever was written after it, so the finished store equals an uninterrupted run's array for
array.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import tensorstore as ts

from lopd_jax.atomic import write_atomic

FORMAT = "lopd_jax.rollout_store"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FINISH_REASONS = ("stop", "length")
RESERVED_KEYS = (
    "format",
    "schema_version",
    "committed",
    "committed_tokens",
    "teacher_committed",
    "topk",
    "layout",
    "behavior_topk",
    "topk_tail",
)

# Array name -> (dtype, fill value), grouped by what indexes the array's first axis. Fill values are invalid data so
# a lost chunk never reads as plausible. Read-only: every layer reads these tables, none may change them.
TOKEN_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {"tokens": ("int32", -1), "behavior_logprobs": ("float32", "NaN")}
)
TEACHER_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType({"teacher_logprobs": ("float32", "NaN")})
TOPK_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {"teacher_topk_ids": ("int32", -1), "teacher_topk_logprobs": ("float32", "NaN")}
)
# The rollout policy's top-K per token (``behavior_topk`` = K > 0): written with the samples, one row per token.
BEHAVIOR_TOPK_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {"behavior_topk_ids": ("int32", -1), "behavior_topk_logprobs": ("float32", "NaN")}
)
# The teacher's scores of those K ids and of the rest of the vocabulary (the tail): written with the teacher.
TEACHER_BEHAVIOR_TOPK_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {"teacher_behavior_topk_logprobs": ("float32", "NaN"), "teacher_behavior_topk_tail": ("float32", "NaN")}
)
# The teacher's tail beyond its own top-k (stores created with ``topk_tail``; older top-k stores lack it).
TOPK_TAIL_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType({"teacher_topk_tail": ("float32", "NaN")})
SAMPLE_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {"prompt_lengths": ("int32", -1), "finish_reason": ("uint8", 255), "prompt_index": ("int32", -1)}
)
OFFSET_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {"sample_offsets": ("int64", -1), "answer_offsets": ("int64", -1)}
)
BYTE_ARRAYS: Mapping[str, tuple[str, Any]] = MappingProxyType({"answers": ("uint8", 0)})

_CONTEXT: ts.Context | None = None


# Largest log-probability accepted from a store. A log-prob is <= 0; an engine's fp32 log_softmax of the most likely
# token, x_max - logsumexp(x), can round a few ulps above 0, and an fp32 ulp at |logsumexp| <= 100 is <= 8e-6, so
# rounding stays below 1e-4. 1e-3 keeps that margin tenfold while any
# value that is not a log-prob at all (a probability, a logit, +5.0) is refused.
LOGPROB_MAX = 1e-3  # read by the trainer (lopd_jax.data.batch) and precompute.validate alike


class StoreError(ValueError):
    """A store that is missing, malformed or inconsistent; the message names the path and array/sample."""


def ts_context() -> ts.Context:
    """One process-wide TensorStore context: ``memory://`` stores and the chunk cache are shared through it."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})
    return _CONTEXT


# ------------------------------------------------------------------------------------------------ locations


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


def local_dir(spec: dict) -> str | None:
    """The directory (with a trailing slash) of a local store; None for other kvstores (no locks, no renames)."""
    return spec["path"] if spec["driver"] == "file" else None


def describe(spec: dict) -> str:
    """The store's location as a user wrote it (a path or URL): the prefix of every error message."""
    return ts.KvStore.Spec(spec).url if spec["driver"] != "file" else spec["path"].rstrip("/")


def open_kvstore(spec: dict) -> ts.KvStore:
    """The opened kvstore of ``spec`` (in the process-wide context, so ``memory://`` stores are shared)."""
    return ts.KvStore.open(spec, context=ts_context()).result()


def child_spec(spec: dict, name: str) -> dict:
    """The spec of the directory ``name`` inside ``spec`` (an array of a store, a shard of a dataset)."""
    return {**spec, "path": spec["path"] + name + "/"}


def has_manifest(spec: dict) -> bool:
    """True when a manifest is committed at ``spec`` (a store, as opposed to an empty path or a dataset)."""
    return open_kvstore(spec).read(MANIFEST).result().state == "value"


# ------------------------------------------------------------------------------------------------ manifest I/O


def read_manifest(path: str | os.PathLike | dict) -> dict:
    """The manifest of the store at ``path``; StoreError naming the path when it is missing or not JSON."""
    spec = kvstore_spec(path)
    res = open_kvstore(spec).read(MANIFEST).result()
    if res.state != "value":
        raise StoreError(f"{describe(spec)}: no {MANIFEST} (not a RolloutStore, or its writer never committed)")
    try:
        manifest = json.loads(bytes(res.value).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{describe(spec)}/{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{describe(spec)}/{MANIFEST}: expected a JSON object")
    return manifest


def write_manifest(spec: dict, manifest: dict) -> None:
    """Atomically replace the manifest: the commit point of every flush."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
    local = local_dir(spec)
    if local is None:
        open_kvstore(spec).write(MANIFEST, data).result()  # a single-key put is atomic on every kvstore driver
        return
    write_atomic(os.path.join(local, MANIFEST), data)


def delete_manifest(spec: dict) -> None:
    """Uncommit a non-local store (its arrays become unreachable garbage; a local store is renamed away instead)."""
    open_kvstore(spec).write(MANIFEST, None).result()


def check_manifest(manifest: dict, where: str) -> None:
    """Schema checks of the reserved manifest fields; StoreError naming ``where`` and the field."""
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{where}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema_version {manifest.get('schema_version')!r} != {SCHEMA_VERSION} (this lopd_jax)"
        )
    for key in ("committed", "committed_tokens", "teacher_committed", "topk", "behavior_topk"):
        v = manifest.get(key, 0 if key == "behavior_topk" else None)  # stores made before behavior_topk: 0
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise StoreError(f"{where}: manifest field {key!r} must be a non-negative int, got {v!r}")
    if manifest["teacher_committed"] > manifest["committed"]:
        raise StoreError(
            f"{where}: teacher_committed {manifest['teacher_committed']} > committed {manifest['committed']}"
        )
    if not isinstance(manifest.get("layout"), dict):
        raise StoreError(f"{where}: manifest field 'layout' missing")


def expected_samples(manifest: dict) -> int | None:
    """How many samples the run that writes this store planned, from what its manifest records (None: unknown, e.g.
    a store written through the API): a shard's ``shard.expected``; rollouts' ``prompts.kept`` x ``sampling.n``;
    imported SFT data's ``data.kept``. A store with fewer committed samples is unfinished."""
    shard, kind = manifest.get("shard"), manifest.get("kind")
    if isinstance(shard, dict) and isinstance(shard.get("expected"), int):
        return shard["expected"]
    try:
        if kind == "rollouts":
            return int(manifest["prompts"]["kept"]) * int(manifest["sampling"]["n"])
        if kind == "sft_data":
            return int(manifest["data"]["kept"])
    except (KeyError, TypeError, ValueError):
        return None
    return None


def unfinished(manifest: dict, where: str) -> str | None:
    """Why the store described by ``manifest`` is not a finished input (fewer or more samples committed than its
    run planned, ``expected_samples``), or None."""
    want, n = expected_samples(manifest), manifest.get("committed")
    if want is None or n == want:
        return None
    if n < want:
        return (
            f"{where}: {n} of its {want} samples are committed (its precompute has not finished; rerun the same "
            "command to finish it)"
        )
    return f"{where}: {n} samples committed, but the run that made it planned {want} (two runs wrote it?)"


def check_user_keys(keys, where: str) -> None:
    """User manifest fields may not shadow the store's own (``RESERVED_KEYS``); StoreError naming the keys."""
    clash = sorted(set(keys) & set(RESERVED_KEYS))
    if clash:
        raise StoreError(f"{where}: manifest keys {clash} are reserved for the store")


# ------------------------------------------------------------------------------------------------ arrays


def behavior_topk(manifest: dict) -> int:
    """K of the store's behaviour top-k columns (0: none; stores made before the field existed have none)."""
    return int(manifest.get("behavior_topk", 0))


def array_names(topk: int, behavior_k: int = 0, topk_tail: bool = False) -> dict[str, tuple[str, Any]]:
    """Name -> (dtype, fill) of every array a store with ``topk`` (teacher top-k, with its tail when
    ``topk_tail``) and ``behavior_k`` (behaviour top-k) holds."""
    names = {**TOKEN_ARRAYS, **TEACHER_ARRAYS, **SAMPLE_ARRAYS, **OFFSET_ARRAYS, **BYTE_ARRAYS}
    if topk:
        names |= TOPK_ARRAYS | (TOPK_TAIL_ARRAYS if topk_tail else {})
    if behavior_k:
        names |= BEHAVIOR_TOPK_ARRAYS | TEACHER_BEHAVIOR_TOPK_ARRAYS
    return names


def manifest_array_names(manifest: dict) -> dict[str, tuple[str, Any]]:
    """``array_names`` of the store this manifest describes."""
    return array_names(manifest["topk"], behavior_topk(manifest), bool(manifest.get("topk_tail")))


def array_width(name: str, topk: int, behavior_k: int) -> int:
    """The second dimension of a [entries, k] array (a top-k array); 0 for the 1-D arrays."""
    if name in TOPK_ARRAYS:
        return topk
    if name in BEHAVIOR_TOPK_ARRAYS or name == "teacher_behavior_topk_logprobs":
        return behavior_k
    return 0


def teacher_array(name: str) -> bool:
    """Whether ``name`` is written by the teacher pass (its length follows ``teacher_committed``)."""
    return (
        name in TEACHER_ARRAYS
        or name in TOPK_ARRAYS
        or name in TOPK_TAIL_ARRAYS
        or (name in TEACHER_BEHAVIOR_TOPK_ARRAYS)
    )


def topk_bytes_per_token(k: int, source: str) -> int:
    """Uncompressed store bytes per token of one top-k set: "behavior" (the rollout policy's ids + log-probs, the
    teacher's log-probs of them + its tail: 12 K + 4) or "teacher" (the teacher's own ids + log-probs + tail:
    8 K + 4). Every token of a sample has a row (prompt rows hold -1 / NaN)."""
    if source not in ("behavior", "teacher"):
        raise ValueError(f"topk_bytes_per_token: source {source!r} is not 'behavior' or 'teacher'")
    return (12 if source == "behavior" else 8) * k + 4 if k else 0


def array_metadata(name: str, dtype: str, fill: Any, layout: dict, width: int) -> dict:
    """The zarr3 metadata of a new, empty array ``name`` under the manifest's ``layout`` (chunking, zstd);
    ``width``: k of a [entries, k] array (``array_width``), 0 for a 1-D one."""
    chunk = layout["chunk_samples"] if name in SAMPLE_ARRAYS or name in OFFSET_ARRAYS else layout["chunk_tokens"]
    inner, shape = [chunk], [0]
    if width:  # keep a top-k chunk about as many bytes as a token chunk
        inner, shape = [max(16, chunk // width), width], [0, width]
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


def open_array(spec: dict, name: str, *, create_meta: dict | None = None) -> ts.TensorStore:
    """Open array ``name`` of the store (``create_meta``: create it empty, replacing one there); StoreError."""
    # Revalidate cached chunks and shard indexes on every read: another process may rewrite a shard (its tail
    # chunk) while this one reads committed data from it.
    arr_spec: dict[str, Any] = {"driver": "zarr3", "kvstore": child_spec(spec, name), "recheck_cached_data": True}
    if create_meta is not None:
        arr_spec.update(metadata=create_meta, create=True, delete_existing=True)
    try:
        return ts.open(arr_spec, context=ts_context()).result()
    except ValueError as e:
        raise StoreError(f"{describe(spec)}: array {name!r} cannot be opened ({e})") from None


def open_arrays(spec: dict, manifest: dict) -> dict[str, ts.TensorStore]:
    """Open every array the manifest implies, checking dtype and rank; StoreError naming the array."""
    arrays = {}
    for name, (dtype, _) in manifest_array_names(manifest).items():
        arr = open_array(spec, name)
        width = array_width(name, manifest["topk"], behavior_topk(manifest))
        rank = 2 if width else 1
        if arr.dtype.name != dtype or arr.rank != rank:
            raise StoreError(
                f"{describe(spec)}: array {name!r} is {arr.dtype.name}[rank {arr.rank}], expected {dtype}[rank {rank}]"
            )
        if rank == 2 and arr.shape[1] != width:
            key = "topk" if name in TOPK_ARRAYS else "behavior_topk"
            raise StoreError(f"{describe(spec)}: array {name!r} has k={arr.shape[1]}, manifest {key}={width}")
        arrays[name] = arr
    return arrays


def required_lengths(manifest: dict, answer_bytes: int, teacher_tokens: int) -> dict[str, int]:
    """Minimum length of each array's first axis implied by the manifest's commits."""
    n, n_tok = manifest["committed"], manifest["committed_tokens"]
    need = {k: n_tok for k in TOKEN_ARRAYS} | {k: n for k in SAMPLE_ARRAYS} | {k: n + 1 for k in OFFSET_ARRAYS}
    need |= {"answers": answer_bytes}
    for name in manifest_array_names(manifest):
        if teacher_array(name):
            need[name] = teacher_tokens
        elif name in BEHAVIOR_TOPK_ARRAYS:
            need[name] = n_tok
    return need


def check_lengths(spec: dict, arrays: dict[str, ts.TensorStore], need: dict[str, int]) -> None:
    """StoreError naming the first array shorter than the manifest commits (``need``: ``required_lengths``)."""
    for name, n in need.items():
        if arrays[name].shape[0] < n:
            raise StoreError(
                f"{describe(spec)}: array {name!r} is truncated: {arrays[name].shape[0]} entries, "
                f"the manifest commits {n}"
            )


def error_reason(e: Exception) -> str:
    """The first line of a TensorStore error (e.g. ``DATA_LOSS: ... Digest mismatch``), for a one-line message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_checked(
    where: str, name: str, arr: ts.TensorStore, a: int, b: int, bounds: Callable[[int, int], tuple] | None = None
) -> np.ndarray:
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
        raise StoreError(f"{where}: array {name!r} is damaged at sample {a} ({error_reason(e)})") from None


def read_sample_metadata(spec: dict, arrays: dict[str, ts.TensorStore], manifest: dict) -> dict[str, np.ndarray]:
    """The committed per-sample arrays (offsets [N + 1], others [N]), after checking they are long enough."""
    n = manifest["committed"]
    need = {k: n for k in SAMPLE_ARRAYS} | {k: n + 1 for k in OFFSET_ARRAYS}
    check_lengths(spec, arrays, need)
    where, out = describe(spec), {}
    for k, length in need.items():
        plus = length - n  # offsets arrays: sample i spans entries [i, i + 1]
        out[k] = read_checked(where, k, arrays[k], 0, n, lambda i, j, plus=plus: (i, j + plus))
    return out


def check_metadata(where: str, offsets: np.ndarray, prompt_lengths: np.ndarray, finish: np.ndarray, n_tok: int) -> None:
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
