"""Validate a RolloutStore: ``python -m precompute.validate STORE [--require-teacher]``.

Checks the manifest (schema, counts, fingerprint fields), every array (present, dtype, rank, long enough for what
the manifest commits), the per-sample metadata (offsets, prompt lengths, finish reasons, prompt indices, answers)
and the per-token data of every committed sample: token ids >= 0 (a lost chunk reads as -1), behaviour and
teacher log-probs NaN on prompt tokens and finite and <= 0 on response tokens, top-k ids valid and log-probs
sorted. The first problem raises ``StoreError`` naming the store, the array and the sample; the CLI prints it
and exits 1. ``validate(path)`` is what the trainer calls before it trains.

A sharded dataset directory (``--num-shards``) is validated as one: its shards must make one dataset (all present,
one count, the same policy, tokenizer, sampling, prompt file and teacher: ``lopd_jax.store.dataset``), every shard
must hold all the samples its precompute planned, and each shard store is checked as above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from lopd_jax.store import dataset as store_dataset
from lopd_jax.store.layout import (
    LOGPROB_MAX,
    StoreError,
    behavior_topk,
    check_lengths,
    check_manifest,
    check_metadata,
    child_spec,
    kvstore_spec,
    manifest_array_names,
    open_arrays,
    read_checked,
    read_manifest,
    read_sample_metadata,
    required_lengths,
    topk_bytes_per_token,
    unfinished,
)

FINGERPRINT_FIELDS = ("policy", "teacher", "sft_teacher", "tokenizer", "chat_template")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
BLOCK_TOKENS = 1 << 22  # tokens checked per read: bounded memory on any store size


def validate(path: str | os.PathLike | dict, require_teacher: bool = False) -> dict:
    """Check the whole store (or every shard of a dataset); returns a summary dict, raises StoreError at the first
    problem."""
    if store_dataset.is_dataset(path) and read_manifest_or_none(path) is None:
        return validate_dataset(path, require_teacher)
    spec = kvstore_spec(path)
    where = spec["path"].rstrip("/") if spec["driver"] == "file" else str(path)
    m = read_manifest(spec)
    check_manifest(m, where)
    if m["committed"] == 0:  # e.g. every prompt was skipped: nothing to train on, whatever the arrays say
        raise StoreError(f"{where}: the store has no committed samples (empty); its writer committed nothing")
    if (problem := unfinished(m, where)) is not None:  # a killed run's store is consistent, but not the data set
        raise StoreError(problem)
    _check_fields(m, where, require_teacher)
    arrays = open_arrays(spec, m)
    n = m["committed"]
    meta = read_sample_metadata(spec, arrays, m)
    offsets = meta["sample_offsets"]
    answer_bytes = _check_answer_offsets(meta["answer_offsets"], where)
    check_lengths(spec, arrays, required_lengths(m, answer_bytes, int(offsets[m["teacher_committed"]])))
    check_metadata(where, offsets, meta["prompt_lengths"], meta["finish_reason"], m["committed_tokens"])
    bad = np.flatnonzero(meta["prompt_index"] < 0)
    if bad.size:
        raise StoreError(f"{where}: sample {int(bad[0])}: prompt_index {int(meta['prompt_index'][bad[0]])} < 0")
    ao = meta["answer_offsets"]
    _check_answers(read_checked(where, "answers", arrays["answers"], 0, n, lambda i, j: (ao[i], ao[j])), ao, where)
    for a, b in _blocks(offsets):
        _check_token_block(arrays, m, offsets, meta["prompt_lengths"], a, b, where)
    lengths = np.diff(offsets)
    return {
        "samples": n,
        "tokens": m["committed_tokens"],
        "response_tokens": int(np.sum(lengths - meta["prompt_lengths"])),
        "teacher_committed": m["teacher_committed"],
        "topk": m["topk"],
        "behavior_topk": behavior_topk(m),
        "finish_length": int(np.sum(meta["finish_reason"] == 1)),
        "bytes": _local_bytes(spec),
        **_topk_cost(spec, m),
    }


def _topk_cost(spec: dict, m: dict) -> dict:
    """Per top-k set of the store, its cost: bytes per token uncompressed (``topk_bytes_per_token``) and on disk
    (zstd; local stores, else None), both summed over the set's arrays."""
    sets = {"teacher_topk": (m["topk"], "teacher"), "behavior_topk": (behavior_topk(m), "behavior")}
    out = {}
    for name, (k, source) in sets.items():
        if not k:
            continue
        arrays = [
            a for a in manifest_array_names(m) if (source == "behavior") == ("behavior_topk" in a) and "topk" in a
        ]
        disk = [_local_bytes(child_spec(spec, a)) for a in arrays]
        on_disk = None if None in disk else sum(disk) / max(1, m["committed_tokens"])
        out[f"{name}_cost"] = {
            "k": k,
            "bytes_per_token": topk_bytes_per_token(k, source),
            "disk_bytes_per_token": on_disk,
        }
    return out


def read_manifest_or_none(path) -> dict | None:
    try:
        return read_manifest(path)
    except StoreError:
        return None


def validate_dataset(path: str | os.PathLike | dict, require_teacher: bool = False) -> dict:
    """Validate a dataset of shard stores: one dataset, complete, every shard valid; the summaries summed."""
    ds = store_dataset.RolloutDataset.open(path)
    if (problem := ds.incomplete()) is not None:
        raise StoreError(problem)
    total: dict = {}
    for name in ds.names:
        one = validate(child_spec(ds.spec, name), require_teacher)
        for k, v in one.items():
            if k in ("topk", "behavior_topk") or k.endswith("_cost"):  # widths, not counts (disk: the last shard's)
                total[k] = v
            else:
                total[k] = None if v is None or total.get(k, 0) is None else total.get(k, 0) + v
    total["shards"] = ds.count
    return total


def _check_fields(m: dict, where: str, require_teacher: bool) -> None:
    for key in FINGERPRINT_FIELDS:
        v = m.get(key)
        if v is not None and not (isinstance(v, str) and _FINGERPRINT.match(v)):
            raise StoreError(f"{where}: manifest field {key!r} is not a sha256 fingerprint: {v!r}")
    if require_teacher:
        if m.get("teacher") is None:
            raise StoreError(f"{where}: no teacher fingerprint in the manifest (run precompute.teacher_logprobs)")
        if m["teacher_committed"] != m["committed"]:
            raise StoreError(
                f"{where}: teacher log-probs cover {m['teacher_committed']} of {m['committed']} samples "
                "(rerun precompute.teacher_logprobs to finish)"
            )


def _check_answer_offsets(offsets: np.ndarray, where: str) -> int:
    if offsets.size == 0 or offsets[0] != 0:
        raise StoreError(f"{where}: answer_offsets[0] is {offsets[:1].tolist()}, expected 0")
    bad = np.flatnonzero(np.diff(offsets) < 1)  # every answer is JSON, at least "1" byte long
    if bad.size:
        raise StoreError(f"{where}: sample {int(bad[0])}: answer_offsets not increasing")
    return int(offsets[-1])


def _check_answers(data: np.ndarray, offsets: np.ndarray, where: str) -> None:
    raw = data.tobytes()
    for i in range(len(offsets) - 1):
        try:
            json.loads(raw[offsets[i] : offsets[i + 1]].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise StoreError(f"{where}: sample {i}: answer is not valid UTF-8 JSON") from None


def _blocks(offsets: np.ndarray):
    """Sample ranges [a, b) of about BLOCK_TOKENS tokens each (at least one sample)."""
    a, n = 0, len(offsets) - 1
    while a < n:
        b = max(a + 1, int(np.searchsorted(offsets, offsets[a] + BLOCK_TOKENS, side="right")) - 1)
        yield a, min(b, n)
        a = min(b, n)


def _check_token_block(arrays, m, offsets, prompt_lengths, a: int, b: int, where: str) -> None:
    lo, hi = int(offsets[a]), int(offsets[b])
    sample = np.repeat(np.arange(a, b), np.diff(offsets[a : b + 1]))
    pos = np.arange(lo, hi) - offsets[sample]
    prompt = pos < prompt_lengths[sample]

    def fail(mask: np.ndarray, what: str) -> None:
        if mask.any():
            t = int(np.flatnonzero(mask)[0])
            kind = "prompt" if prompt[t] else "response"
            raise StoreError(f"{where}: sample {int(sample[t])}: {what} at {kind} token {int(pos[t])}")

    def read(name: str, end: int = b) -> np.ndarray:
        return read_checked(where, name, arrays[name], a, end, lambda i, j: (offsets[i], offsets[j]))

    tokens = read("tokens")
    fail(tokens < 0, "token id < 0 (missing chunk?)")
    if "vocab_size" in m:
        fail(tokens >= m["vocab_size"], f"token id >= vocab_size {m['vocab_size']}")
    if behavior_topk(m):
        _check_behavior_topk(arrays, m, read, prompt, fail)
    behavior = read("behavior_logprobs")
    if m.get("behavior_logprobs") == "none":  # imported SFT data (precompute.import_jsonl): no behaviour policy
        fail(~np.isnan(behavior), "behavior_logprobs is not NaN (the manifest says behavior_logprobs: none)")
    else:
        _check_logprobs(behavior, prompt, "behavior_logprobs", fail)
    tc = min(b, m["teacher_committed"])
    if tc <= a:
        return
    t_hi = int(offsets[tc])
    p = prompt[: t_hi - lo]
    _check_logprobs(read("teacher_logprobs", tc), p, "teacher_logprobs", fail)
    if m["topk"]:
        ids, lp = read("teacher_topk_ids", tc), read("teacher_topk_logprobs", tc)
        fail(~p & (ids < 0).any(-1), "teacher_topk_ids < 0")
        fail(~p & ~np.isfinite(lp).all(-1), "teacher_topk_logprobs not finite")
        fail(~p & (np.diff(lp, axis=-1) > 0).any(-1), "teacher_topk_logprobs not sorted by rank")
        if m.get("topk_tail"):
            _check_buckets(lp, read("teacher_topk_tail", tc), p, "teacher_topk", fail)
    if behavior_topk(m):
        lp_t = read("teacher_behavior_topk_logprobs", tc)
        fail(~p & ~np.isfinite(lp_t).all(-1), "teacher_behavior_topk_logprobs not finite")
        fail(~p & (lp_t > LOGPROB_MAX).any(-1), "teacher_behavior_topk_logprobs > 0")
        fail(p & ~np.isnan(lp_t).all(-1), "teacher_behavior_topk_logprobs is not NaN")
        _check_buckets(lp_t, read("teacher_behavior_topk_tail", tc), p, "teacher_behavior_topk", fail)


def _check_behavior_topk(arrays, m, read, prompt, fail) -> None:
    """The rollout policy's top-k rows: ids distinct in [0, vocab) ranked by log-prob on response tokens, -1 / NaN
    on prompt tokens."""
    ids, lp = read("behavior_topk_ids"), read("behavior_topk_logprobs")
    fail(~prompt & (ids < 0).any(-1), "behavior_topk_ids < 0")
    if "vocab_size" in m:
        fail(~prompt & (ids >= m["vocab_size"]).any(-1), f"behavior_topk_ids >= vocab_size {m['vocab_size']}")
    fail(~prompt & (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any(-1), "behavior_topk_ids not distinct")
    fail(prompt & (ids != -1).any(-1), "behavior_topk_ids is not -1")
    fail(~prompt & ~np.isfinite(lp).all(-1), "behavior_topk_logprobs not finite")
    fail(~prompt & (lp > LOGPROB_MAX).any(-1), "behavior_topk_logprobs > 0")
    fail(~prompt & (np.diff(lp, axis=-1) > 0).any(-1), "behavior_topk_logprobs not sorted by rank")


def _check_buckets(lp: np.ndarray, tail: np.ndarray, prompt: np.ndarray, name: str, fail) -> None:
    """A teacher's scores of K ids and its tail: the tail is NaN on prompt tokens, never NaN / > 0 on response
    tokens (-inf: an empty bucket), and the K + 1 buckets hold all the mass (|log total| <= 1e-3)."""
    fail(~prompt & np.isnan(tail), f"{name}_tail is NaN")
    fail(~prompt & (tail > LOGPROB_MAX), f"{name}_tail > 0")
    fail(prompt & ~np.isnan(tail), f"{name}_tail is not NaN")
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.exp(lp.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
    fail(~prompt & ~(np.abs(np.log(total)) <= 1e-3), f"{name} buckets do not sum to 1 (log total not within 1e-3)")


def _check_logprobs(lp: np.ndarray, prompt: np.ndarray, name: str, fail) -> None:
    fail(~prompt & np.isnan(lp), f"{name} is NaN")
    fail(~prompt & ~np.isfinite(lp), f"{name} is not finite")
    fail(~prompt & (lp > LOGPROB_MAX), f"{name} > 0")
    fail(prompt & ~np.isnan(lp), f"{name} is not NaN")


def _local_bytes(spec: dict) -> int | None:
    """Bytes on disk of a local store (None for other kvstores)."""
    if spec["driver"] != "file":
        return None
    root = spec["path"]
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute.validate", description=__doc__.splitlines()[0])
    parser.add_argument("store", help="store path or TensorStore kvstore URL")
    parser.add_argument("--require-teacher", action="store_true", help="every sample must have teacher log-probs")
    args = parser.parse_args(argv)
    try:
        s = validate(args.store, require_teacher=args.require_teacher)
    except StoreError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    per_token = f", {s['bytes'] / max(1, s['tokens']):.2f} bytes/token on disk" if s["bytes"] is not None else ""
    shards = f" in {s['shards']} shards" if "shards" in s else ""
    for name in ("behavior_topk", "teacher_topk"):
        if (c := s.get(f"{name}_cost")) is not None:
            disk = "" if c["disk_bytes_per_token"] is None else f", {c['disk_bytes_per_token']:.2f} on disk"
            per_resp = c["bytes_per_token"] * s["tokens"] / max(1, s["response_tokens"])
            per_token += (
                f"; {name} K={c['k']}: {c['bytes_per_token']} bytes/token ({per_resp:.0f} per response token){disk}"
            )
    print(
        f"OK {args.store}: {s['samples']} samples{shards}, {s['tokens']} tokens ({s['response_tokens']} response), "
        f"teacher {s['teacher_committed']}/{s['samples']}, top-k {s['topk']}, "
        f"{s['finish_length']} cut at max length{per_token}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
