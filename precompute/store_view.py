"""What ``precompute.inspect`` and ``precompute.export`` read out of a store: its committed samples (a store or a
dataset of shards), a note when a writer is still at work, the tokenizer that decodes it, and per-token advantages.

A store under writing is read as of its last commit (readers never look past the manifest's counts, so what they
see is whole); the note names the writer's holder record (``lopd_jax.store.lock``) and the tools print it.

The per-token advantage is the one Lightning OPD's loss starts from: ``A_t = log p_T(y_t) - log pi_b(y_t)``, the
teacher's log-prob of the sampled token minus the behaviour policy's (the student that sampled it: the loss's
``old_policy: behavior``, and its ``current`` pi_old at the first step). NaN on prompt tokens, on samples the
teacher has not scored, and in data without a behaviour policy (imported SFT answers).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import numpy as np

from lopd_jax.data import prompts
from lopd_jax.store import RolloutStore, provenance
from lopd_jax.store.dataset import RolloutDataset
from lopd_jax.store.layout import kvstore_spec, local_dir
from lopd_jax.store.lock import LOCK_FILE, describe_holder, pid_alive
from precompute.common import PrecomputeError


def open_store(path: str) -> tuple[RolloutStore | RolloutDataset, list[str]]:
    """The store (or dataset) at ``path`` and notes to print: a live writer's holder, unfinished shards."""
    reader = RolloutStore.open(path)
    notes = []
    stores = reader.stores if isinstance(reader, RolloutDataset) else [reader]
    for store in stores:
        holder = live_writer(store.spec)
        if holder is not None:
            notes.append(f"{store.path}: being written by {describe_holder(holder)}; read as of its last commit")
    if (incomplete := reader.incomplete()) is not None:
        notes.append(incomplete)
    if notes:
        notes.append(f"read: {len(reader)} committed samples, {reader.teacher_committed} scored by the teacher")
    return reader, notes


def live_writer(spec: dict) -> dict | None:
    """The holder record of a local store's writer lock when its holder may still run (this host: its pid is
    alive; another host: cannot tell, so yes); None when unlocked, cleanly released, or not a local store.

    Only the record is read: taking the lock, even shared and for an instant, could fail a writer starting then."""
    local = local_dir(kvstore_spec(spec))
    if local is None:
        return None
    try:
        with open(os.path.join(local, LOCK_FILE), "rb") as f:
            record = json.loads(f.read().decode("utf-8") or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return record if pid_alive(record["pid"]) else None
    return record


def tokenizer_dir(reader: Any, given: str | None) -> str | None:
    """The tokenizer to decode with: ``given``, else the directory the manifest names (policy, tokenizer or
    teacher path) that still exists; None when none does. PrecomputeError when its fingerprint is not the
    store's (the text would be wrong)."""
    m = reader.manifest
    names = [given] if given else [m.get(k) for k in ("policy_path", "tokenizer_path", "teacher_path")]
    for d in names:
        if d and os.path.isdir(d):
            want = m.get("tokenizer")
            if want is not None and provenance.fingerprint_tokenizer(d) != want:
                raise PrecomputeError(
                    f"{d}: its tokenizer ({provenance.fingerprint_tokenizer(d)}) is not the store's ({want}); "
                    "pass the tokenizer the store was made with (--tokenizer)"
                )
            return d
    if given:
        raise PrecomputeError(f"--tokenizer {given}: not a directory")
    return None


def load_tokenizer(reader: Any, given: str | None, required: bool) -> Any:
    """The store's tokenizer (``tokenizer_dir``), or None when none is found and ``required`` is off."""
    d = tokenizer_dir(reader, given)
    if d is None:
        if required:
            raise PrecomputeError(
                f"{reader.path}: no tokenizer found (the manifest's policy_path / tokenizer_path / teacher_path are "
                "gone); pass --tokenizer DIR"
            )
        return None
    return prompts.load_tokenizer(d)


def advantage(sample: dict) -> np.ndarray:
    """float32 [L]: teacher minus behaviour log-prob per token (see the module doc); NaN where either is."""
    return (sample["teacher_logprobs"] - sample["behavior_logprobs"]).astype(np.float32)


def token_texts(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """Each token decoded alone (special tokens kept), for per-token views."""
    return [tokenizer.decode([int(t)], skip_special_tokens=False) for t in ids]


__all__ = ["advantage", "live_writer", "load_tokenizer", "open_store", "token_texts", "tokenizer_dir"]
