"""RolloutStore: exact round trips, commit visibility, crash-and-resume equality, clear errors."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorstore as ts
from helpers.store import LAYOUT, append_rows, make_samples

from lopd_jax.store import RolloutStore, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_teacher(w, samples, start, topk):
    chunk = samples[start:]
    tk = ([s["topk_ids"] for s in chunk], [s["topk_lp"] for s in chunk]) if topk else None
    w.write_teacher(start, [s["teacher"] for s in chunk], topk=tk)


def check_sample(got, want, topk=0, scored=True):
    p = want["prompt_length"]
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert got["tokens"].dtype == np.int32
    assert (got["prompt_length"], got["finish_reason"], got["prompt_index"]) == (
        p,
        want["finish_reason"],
        want["prompt_index"],
    )
    assert got["answer"] == want["answer"]
    assert np.all(np.isnan(got["behavior_logprobs"][:p]))
    np.testing.assert_array_equal(got["behavior_logprobs"][p:], want["behavior_logprobs"])
    assert np.all(np.isnan(got["teacher_logprobs"][:p]))
    if scored:
        np.testing.assert_array_equal(got["teacher_logprobs"][p:], want["teacher"])
    else:
        assert np.all(np.isnan(got["teacher_logprobs"]))
    if topk and scored:
        np.testing.assert_array_equal(got["teacher_topk_ids"][p:], want["topk_ids"])
        np.testing.assert_array_equal(got["teacher_topk_logprobs"][p:], want["topk_lp"])
        assert np.all(got["teacher_topk_ids"][:p] == -1)


def all_arrays(path):
    """Every array's full contents (up to its shape) and the committed counts, for store equality."""
    store = RolloutStore.open(path)
    arrays = {k: a.read().result() for k, a in store.arrays.items()}
    m = store.manifest
    return arrays, (m["committed"], m["committed_tokens"], m["teacher_committed"])


def assert_same_store(a, b):
    (arr_a, counts_a), (arr_b, counts_b) = all_arrays(a), all_arrays(b)
    assert counts_a == counts_b
    assert arr_a.keys() == arr_b.keys()
    for k in arr_a:
        np.testing.assert_array_equal(arr_a[k], arr_b[k], err_msg=k)


@pytest.mark.parametrize("topk", [0, 3])
def test_round_trip_exact(tmp_path, topk):
    samples = make_samples(70, topk=topk)
    w = RolloutStore.create(tmp_path / "s", {"policy": "sha256:p"}, topk=topk, flush_tokens=300, **LAYOUT)
    w.append(append_rows(samples[:40]))
    w.append(append_rows(samples[40:]))
    write_teacher(w, samples[:50], 0, topk)
    w.update_manifest(teacher="sha256:t")
    w.close()

    store = RolloutStore.open(tmp_path / "s")
    assert len(store) == 70 and store.teacher_committed == 50
    assert store.num_tokens == sum(len(s["tokens"]) for s in samples)
    np.testing.assert_array_equal(store.lengths, [len(s["tokens"]) for s in samples])
    assert store.manifest["policy"] == "sha256:p" and store.manifest["teacher"] == "sha256:t"
    for i in (0, 1, 49, 50, 69):
        check_sample(store.sample(i), samples[i], topk, scored=i < 50)
    order = np.random.default_rng(1).permutation(70)
    for i, got in zip(order, store.samples(order)):  # random order: the per-range read path
        check_sample(got, samples[i], topk, scored=i < 50)
    for i, got in enumerate(store.samples(range(70))):  # sequential: the single-span read path
        check_sample(got, samples[i], topk, scored=i < 50)


@pytest.mark.parametrize("url", ["memory://rt/", "file://{tmp}/u"])
def test_kvstore_urls(tmp_path, url):
    url = url.format(tmp=tmp_path)
    samples = make_samples(12)
    with RolloutStore.create(url, {}, **LAYOUT) as w:
        w.append(append_rows(samples))
    store = RolloutStore.open(url)
    assert len(store) == 12
    for i, got in enumerate(store.samples(range(12))):
        check_sample(got, samples[i], scored=False)


def test_readers_see_only_committed(tmp_path):
    samples = make_samples(30)
    w = RolloutStore.create(tmp_path / "s", {}, flush_tokens=10**9, **LAYOUT)
    w.append(append_rows(samples[:10]))
    w.flush()
    w.append(append_rows(samples[10:]))
    w._write_samples()  # data of samples 10.. reaches the arrays (a writer killed right before its commit)
    assert w._cols["tokens"].arr.shape[0] > RolloutStore.open(tmp_path / "s").num_tokens
    store = RolloutStore.open(tmp_path / "s")
    assert len(store) == 10
    assert store.num_tokens == sum(len(s["tokens"]) for s in samples[:10])
    with pytest.raises(IndexError, match="sample 10 out of range"):
        store.sample(10)
    check_sample(store.sample(9), samples[9], scored=False)
    del w  # the crashed writer dies, and its writer lock with it
    w = RolloutStore.open_for_append(tmp_path / "s")  # the crashed writer's successor
    w.append(append_rows(samples[10:]))
    w.flush()
    assert len(store) == 10  # a reader's view is fixed until it refreshes
    store.refresh()
    assert len(store) == 30
    check_sample(store.sample(29), samples[29], scored=False)


def test_pickle_keeps_the_committed_view(tmp_path):
    samples = make_samples(20)
    w = RolloutStore.create(tmp_path / "s", {}, flush_tokens=10**9, **LAYOUT)
    w.append(append_rows(samples[:8]))
    w.flush()
    store = RolloutStore.open(tmp_path / "s")
    w.append(append_rows(samples[8:]))
    w.flush()
    copy = pickle.loads(pickle.dumps(store))  # what a Grain worker process receives
    assert len(copy) == 8
    check_sample(copy.sample(7), samples[7], scored=False)


def test_crash_and_resume_equals_uninterrupted(tmp_path):
    samples, topk = make_samples(80, seed=3, topk=2), 2
    with RolloutStore.create(tmp_path / "a", {}, topk=topk, flush_tokens=250, **LAYOUT) as w:
        w.append(append_rows(samples))
        write_teacher(w, samples, 0, topk)

    # Crashed run: commits a few flushes, then dies with data written past its last commit.
    w = RolloutStore.create(tmp_path / "b", {}, topk=topk, flush_tokens=10**9, **LAYOUT)
    w.append(append_rows(samples[:37]))
    w.flush()
    w.append(append_rows(make_samples(24, seed=99)))  # different data, written but never committed
    [f.result() for f in w._write_samples()]
    del w
    w = RolloutStore.open_for_append(tmp_path / "b", flush_tokens=10**9)
    assert w.committed == 37
    w.append(append_rows(samples[37:]))
    w.flush()
    write_teacher(w, samples[:45], 0, topk)
    w.flush()
    wrong = [{**s, "teacher": s["teacher"] - 1.0, "topk_ids": s["topk_ids"] + 1} for s in samples[:70]]
    write_teacher(w, wrong, 45, topk)
    [f.result() for f in w._write_teacher_rows()]  # teacher pass killed before its commit
    del w
    w = RolloutStore.open_for_append(tmp_path / "b", flush_tokens=250)
    assert w.teacher_committed == 45
    write_teacher(w, samples, w.teacher_end, topk)
    w.close()
    assert_same_store(tmp_path / "a", tmp_path / "b")


_KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))  # tests/helpers
from helpers.store import LAYOUT, append_rows, make_samples
from lopd_jax.store import RolloutStore
samples = append_rows(make_samples(400, seed=5))
w = RolloutStore.open_for_append({path!r}, flush_tokens=200)
for i in range(w.committed, 400):
    w.append([samples[i]])
    time.sleep(0.002)
w.close()
"""


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    samples = append_rows(make_samples(400, seed=5))
    with RolloutStore.create(tmp_path / "a", {}, flush_tokens=200, **LAYOUT) as w:
        w.append(samples)
    RolloutStore.create(tmp_path / "b", {}, **LAYOUT).close()
    script = textwrap.dedent(_KILLED_WRITER).format(root=ROOT, path=str(tmp_path / "b"))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
        if manifest["committed"] >= 100:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = RolloutStore.open(tmp_path / "b").manifest["committed"]
    assert 100 <= killed_at < 400, killed_at
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert_same_store(tmp_path / "a", tmp_path / "b")


def test_missing_manifest_and_schema_errors(tmp_path):
    with pytest.raises(StoreError, match=f"{tmp_path / 'nothing'}: no manifest.json"):
        RolloutStore.open(tmp_path / "nothing")
    RolloutStore.create(tmp_path / "s", {}, **LAYOUT).close()
    with pytest.raises(StoreError, match="already exists"):
        RolloutStore.create(tmp_path / "s", {}, **LAYOUT)
    with RolloutStore.create(tmp_path / "o", {}, **LAYOUT) as w:
        w.append(append_rows(make_samples(5)))
    with RolloutStore.create(tmp_path / "o", {"run": 2}, overwrite=True, **LAYOUT) as w:
        w.append(append_rows(make_samples(2, seed=4)))
    replaced = RolloutStore.open(tmp_path / "o")
    assert len(replaced) == 2 and replaced.manifest["run"] == 2
    check_sample(replaced.sample(1), make_samples(2, seed=4)[1], scored=False)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**m, "schema_version": 99}))
    with pytest.raises(StoreError, match="schema_version 99"):
        RolloutStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="reserved"):
        RolloutStore.create(tmp_path / "t", {"committed": 5}, **LAYOUT)


def test_reader_refuses_truncated_array_and_bad_offsets(tmp_path):
    with RolloutStore.create(tmp_path / "s", {}, **LAYOUT) as w:
        w.append(append_rows(make_samples(20)))
    store = RolloutStore.open(tmp_path / "s")
    n_tok = store.num_tokens
    tokens = store.arrays["tokens"]
    tokens.resize(exclusive_max=[n_tok - 5], resize_metadata_only=True).result()
    with pytest.raises(StoreError, match=f"{tmp_path / 's'}: array 'tokens' is truncated: {n_tok - 5} entries"):
        RolloutStore.open(tmp_path / "s")
    tokens.resize(exclusive_max=[n_tok], resize_metadata_only=True).result()
    finish = store.arrays["finish_reason"]
    finish.resize(exclusive_max=[19], resize_metadata_only=True).result()
    with pytest.raises(StoreError, match="array 'finish_reason' is truncated: 19 entries, the manifest commits 20"):
        RolloutStore.open(tmp_path / "s")
    finish.resize(exclusive_max=[20], resize_metadata_only=True).result()
    offsets = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s/sample_offsets")}})
    offsets = offsets.result()
    offsets[7].write(offsets[6].read().result()).result()  # sample 6 now has no tokens
    with pytest.raises(StoreError, match="sample 6: offsets inconsistent"):
        RolloutStore.open(tmp_path / "s")


def test_bad_input_is_named(tmp_path):
    w = RolloutStore.create(tmp_path / "s", {}, **LAYOUT)
    good = append_rows(make_samples(3))
    with pytest.raises(StoreError, match="appended sample 1: prompt_length 9"):
        w.append([good[0], {**good[1], "prompt_length": 9, "tokens": np.arange(9)}])
    bad_lp = np.array(good[0]["behavior_logprobs"])
    bad_lp[-1] = np.nan
    with pytest.raises(StoreError, match="sample 0: behavior_logprobs is not finite at token"):
        RolloutStore.create(tmp_path / "t", {}, **LAYOUT).append([{**good[0], "behavior_logprobs": bad_lp}])
    w = RolloutStore.create(tmp_path / "u", {}, **LAYOUT)
    w.append(good)
    w.flush()
    with pytest.raises(StoreError, match="expected start 0"):
        w.write_teacher(1, [np.zeros(3)])
    with pytest.raises(StoreError, match="teacher row of sample 0: teacher_logprobs has 2 entries"):
        w.write_teacher(0, [np.zeros(2)])
