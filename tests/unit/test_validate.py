"""The store validator: a good store passes; each kind of damage is caught and named (function and CLI)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from lopd_jax.store import RolloutStore, StoreError
from precompute.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUT = dict(chunk_tokens=64, chunk_samples=16, shard_chunks=4)
FP = "sha256:" + "ab" * 32


def build(path, n=30, teacher=30, topk=2, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, r = int(rng.integers(1, 20)), int(rng.integers(1, 30))
        rows.append(
            dict(
                tokens=rng.integers(0, 300, p + r),
                prompt_length=p,
                finish_reason="stop",
                behavior_logprobs=-rng.exponential(size=r),
                prompt_index=i,
                answer="1",
            )
        )
    with RolloutStore.create(path, {"policy": FP, "vocab_size": 300}, topk=topk, **LAYOUT) as w:
        w.append(rows)
        w.flush()
        resp = [len(s["tokens"]) - s["prompt_length"] for s in rows[:teacher]]
        ids = [rng.integers(0, 300, (r, topk)) for r in resp]
        lps = [-np.sort(rng.exponential(size=(r, topk)), axis=1) for r in resp]
        w.write_teacher(0, [-rng.exponential(size=r) for r in resp], topk=(ids, lps) if topk else None)
        w.update_manifest(teacher=FP)
    return rows


def array(path, name):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}).result()


def cli(path, *flags):
    cmd = [sys.executable, "-m", "precompute.validate", str(path), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_good_store_passes(tmp_path):
    rows = build(tmp_path / "s")
    s = validate(tmp_path / "s", require_teacher=True)
    assert s["samples"] == 30 and s["tokens"] == sum(len(r["tokens"]) for r in rows)
    assert s["response_tokens"] == sum(len(r["tokens"]) - r["prompt_length"] for r in rows)
    assert s["bytes"] > 0
    assert validate("file://" + str(tmp_path / "s"))["samples"] == 30


def test_partial_teacher_needs_flag(tmp_path):
    build(tmp_path / "s", teacher=12)
    assert validate(tmp_path / "s")["teacher_committed"] == 12  # a half-scored store is valid, but
    with pytest.raises(StoreError, match="teacher log-probs cover 12 of 30 samples"):
        validate(tmp_path / "s", require_teacher=True)


def test_truncated_array(tmp_path):
    build(tmp_path / "s")
    n_tok = validate(tmp_path / "s")["tokens"]
    array(tmp_path / "s", "behavior_logprobs").resize(exclusive_max=[n_tok - 1], resize_metadata_only=True).result()
    with pytest.raises(StoreError, match="array 'behavior_logprobs' is truncated"):
        validate(tmp_path / "s")


def test_lost_shard_file(tmp_path):
    build(tmp_path / "s")
    os.remove(tmp_path / "s" / "tokens" / "c" / "1")  # tokens 256..511: the fill value -1 shows through
    with pytest.raises(StoreError, match="token id < 0 \\(missing chunk\\?\\)"):
        validate(tmp_path / "s")


def test_offsets_length_mismatch(tmp_path):
    build(tmp_path / "s")
    offsets = array(tmp_path / "s", "sample_offsets")
    offsets[30].write(offsets[30].read().result() - 3).result()  # last offset no longer == committed_tokens
    with pytest.raises(StoreError, match="sample_offsets\\[-1\\] = .* != committed_tokens"):
        validate(tmp_path / "s")
    offsets[30].write(offsets[30].read().result() + 3).result()
    prompt_lengths = array(tmp_path / "s", "prompt_lengths")
    prompt_lengths[4].write(10_000).result()
    with pytest.raises(StoreError, match="sample 4: offsets inconsistent with its prompt"):
        validate(tmp_path / "s")


def test_nan_teacher_logprob_on_response_token(tmp_path):
    rows = build(tmp_path / "s")
    store = RolloutStore.open(tmp_path / "s")
    pos = int(store.offsets[7]) + rows[7]["prompt_length"] + 1  # second response token of sample 7
    array(tmp_path / "s", "teacher_logprobs")[pos].write(np.nan).result()
    with pytest.raises(StoreError, match="sample 7: teacher_logprobs is NaN at response token"):
        validate(tmp_path / "s")
    r = cli(tmp_path / "s")
    assert r.returncode == 1 and "sample 7: teacher_logprobs is NaN at response token" in r.stderr


@pytest.mark.slow
def test_cli_missing_manifest_and_ok(tmp_path):
    build(tmp_path / "s", n=5, teacher=5, topk=0)
    ok = cli(tmp_path / "s", "--require-teacher")
    assert ok.returncode == 0 and ok.stdout.startswith("OK") and "5 samples" in ok.stdout
    os.remove(tmp_path / "s" / "manifest.json")
    r = cli(tmp_path / "s")
    assert r.returncode == 1 and f"{tmp_path / 's'}: no manifest.json" in r.stderr


def test_store_without_behaviour_policy(tmp_path):
    rows = [dict(tokens=[1, 2, 3, 4], prompt_length=2, finish_reason="stop", behavior_logprobs=None, prompt_index=0)]
    with RolloutStore.create(tmp_path / "s", {"behavior_logprobs": "none"}, **LAYOUT) as w:
        w.append(rows)
    assert np.all(np.isnan(RolloutStore.open(tmp_path / "s").sample(0)["behavior_logprobs"]))
    assert validate(tmp_path / "s")["samples"] == 1
    with RolloutStore.create(tmp_path / "t", {}, **LAYOUT) as w:  # the manifest does not say so: an error
        w.append(rows)
    with pytest.raises(StoreError, match="sample 0: behavior_logprobs is NaN at response token 2"):
        validate(tmp_path / "t")
