"""The Grain pipeline: shifted alignment, packing coverage, determinism, process sharding, truncation, resume."""

import collections

import numpy as np
import pytest

from lopd_jax.data.loader import Batch, DataConfig, DataError, make_iterator, shift_sample


class FakeStore:
    """In-memory stand-in with the RolloutStore reader API (len, sample(i), samples, manifest)."""

    def __init__(self, samples):
        self._samples = samples
        self.manifest = {"num_samples": len(samples)}
        self.read = set()  # indices asked for

    def __len__(self):
        return len(self._samples)

    def sample(self, i):
        self.read.add(i)
        return dict(self._samples[i])

    def samples(self, indices):
        return [self.sample(i) for i in indices]


def make_samples(n, *, seed=0, max_prompt=6, max_resp=20):
    """Sample i: tokens 1000*i + j (identifiable), teacher log-prob -(i*100 + j) (exact in fp32), NaN on prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(1, max_prompt + 1)), int(rng.integers(1, max_resp + 1))
        j = np.arange(p + r)
        teacher = -(i * 100.0 + j).astype(np.float32)
        behavior = teacher - 0.5
        teacher[:p] = np.nan
        behavior[:p] = np.nan
        out.append(
            {
                "tokens": (1000 * i + j).astype(np.int32),
                "prompt_length": p,
                "finish_reason": "stop",
                "teacher_logprobs": teacher,
                "behavior_logprobs": behavior,
            }
        )
    return out


def cfg(**kw):
    base = dict(store="fake", batch_size=4, seq_len=32, num_epochs=1, seed=3, read_threads=2)
    return DataConfig(**(base | kw))


def batches(store, c, process_index=0, process_count=1, limit=None):
    it = make_iterator(c, process_index, process_count, store=store)
    out = []
    for b in it:
        out.append(b)
        if limit and len(out) == limit:
            break
    return out, it


def segments(batch: Batch):
    """Yields (row, seg_id, slice) for every packed segment."""
    for r in range(batch.inputs.shape[0]):
        seg = np.asarray(batch.segment_ids[r])
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
            yield r, int(s), slice(idx[0], idx[-1] + 1)


def test_shift_sample_alignment():
    tokens = np.array([10, 11, 12, 13, 14, 15], np.int32)
    t = np.array([np.nan, np.nan, np.nan, -1, -2, -3], np.float32)
    s = {"tokens": tokens, "prompt_length": 3, "teacher_logprobs": t, "behavior_logprobs": t - 1, "index": 0}
    x = shift_sample(s, seq_len=16, require_teacher=True)
    np.testing.assert_array_equal(x["inputs"], [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(x["targets"], [11, 12, 13, 14, 15])
    np.testing.assert_array_equal(x["loss_mask"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(x["teacher_logprobs"], [0, 0, -1, -2, -3])
    np.testing.assert_array_equal(x["behavior_logprobs"], [0, 0, -2, -3, -4])
    np.testing.assert_array_equal(x["dropped"], [0, 0, 0, 0, 0])


def test_epoch_packs_every_response_token_once_with_its_logprob_and_position():
    samples = make_samples(40)
    got, it = batches(FakeStore(samples), cfg())
    seen = collections.Counter()
    for b in got:
        assert all(np.asarray(f).shape == (4, 32) for f in vars(b).values() if f is not None)  # top-k fields: None
        assert b.topk_ids is None  # no topk_* objective: the optional top-k fields stay empty
        for r, s, sl in segments(b):
            inputs, targets = b.inputs[r, sl], b.targets[r, sl]
            i = int(inputs[0]) // 1000  # the sample this segment came from
            smp = samples[i]
            n, p = len(inputs), smp["prompt_length"]
            assert s >= 1
            np.testing.assert_array_equal(inputs, smp["tokens"][:n])
            np.testing.assert_array_equal(targets, smp["tokens"][1 : n + 1])
            np.testing.assert_array_equal(b.positions[r, sl], np.arange(n))
            mask = b.loss_mask[r, sl] > 0
            j = np.arange(1, n + 1)  # store index of each target
            np.testing.assert_array_equal(mask, j >= p)
            np.testing.assert_array_equal(b.teacher_logprobs[r, sl][mask], -(i * 100.0 + j[mask]))
            np.testing.assert_array_equal(b.behavior_logprobs[r, sl][mask], -(i * 100.0 + j[mask]) - 0.5)
            assert not b.teacher_logprobs[r, sl][~mask].any()
            seen.update((i, int(t)) for t in j[mask])
        pad = np.asarray(b.segment_ids) == 0
        assert not np.asarray(b.loss_mask)[pad].any() and not np.asarray(b.inputs)[pad].any()
    want = collections.Counter(
        (i, j) for i, s in enumerate(samples) for j in range(s["prompt_length"], len(s["tokens"]))
    )
    assert seen == want  # every response token exactly once
    m = it.metrics
    assert m["data/samples"] == 40 and m["data/truncated_samples"] == 0 and m["data/batches"] == len(got)
    assert m["data/response_tokens"] == sum(want.values())
    # first-fit packs several samples per row: far fewer rows than samples
    assert len(got) * 4 < 40


def test_order_is_deterministic_by_seed_and_reshuffled_per_epoch():
    store = FakeStore(make_samples(24))

    def order(seed, epochs=1):
        got, _ = batches(store, cfg(seed=seed, pack=False, num_epochs=epochs))
        return [int(b.inputs[r, 0]) // 1000 for b in got for r in range(4) if b.segment_ids[r, 0] > 0]

    a = order(3, epochs=2)
    assert a == order(3, epochs=2)
    assert sorted(a[:24]) == sorted(a[24:]) == list(range(24))
    assert a[:24] != a[24:], "each epoch must get its own permutation"
    assert a[:24] != order(4)[:24]
    assert a[:24] != list(range(24))


def test_two_processes_see_disjoint_slices_covering_the_store():
    ids = []
    for p in range(2):
        store = FakeStore(make_samples(31))
        got, _ = batches(store, cfg(batch_size=4, pack=False), p, 2)
        assert store.read == set(range(p, 31, 2))  # each process reads only its own slice
        assert all(b.inputs.shape == (2, 32) for b in got)  # each process holds its half of the rows
        ids.append({int(b.inputs[r, 0]) // 1000 for b in got for r in range(2) if b.segment_ids[r, 0] > 0})
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(range(31))


def long_sample(i, n, p=4):
    j = np.arange(n)
    t = -(i * 100.0 + j).astype(np.float32)
    t[:p] = np.nan
    return {
        "tokens": (1000 * i + j).astype(np.int32),
        "prompt_length": p,
        "teacher_logprobs": t,
        "behavior_logprobs": t,
    }


def test_truncation_to_max_response_len_and_seq_len_is_counted():
    # sample 0: 26 response tokens, fits T = 32; sample 1: 60 tokens, longer than T; the rest short
    samples = [long_sample(0, 30), long_sample(1, 60)] + make_samples(6, max_prompt=4, max_resp=8)[2:]
    got, it = batches(FakeStore(samples), cfg(max_response_len=40))
    kept = {}
    for b in got:
        for r, _, sl in segments(b):
            kept[int(b.inputs[r, sl][0]) // 1000] = int(b.loss_mask[r, sl].sum())
    assert kept[0] == 26 and kept[1] == 32 - 3  # T slots minus the 3 prompt-input slots
    assert it.metrics["data/truncated_samples"] == 1 and it.metrics["data/dropped_tokens"] == 60 - 33

    got, it = batches(FakeStore(samples), cfg(max_response_len=10))
    resp = [len(s["tokens"]) - s["prompt_length"] for s in samples]
    m = it.metrics
    assert m["data/truncated_samples"] == sum(r > 10 for r in resp) == 2
    assert m["data/dropped_tokens"] == sum(max(r - 10, 0) for r in resp)
    assert m["data/response_tokens"] == sum(min(r, 10) for r in resp)


def test_missing_teacher_logprob_names_the_sample():
    samples = make_samples(8)
    samples[5]["teacher_logprobs"][-1] = np.nan
    with pytest.raises(DataError, match="store sample 5"):
        batches(FakeStore(samples), cfg(require_teacher=True))
    batches(FakeStore(samples), cfg(require_teacher=False))  # SFT does not need teacher columns


def test_iterator_state_resumes_to_the_same_batches():
    store = FakeStore(make_samples(50))
    c = cfg(num_epochs=None, batch_size=2)
    it = make_iterator(c, 0, 1, store=store)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(5)]
    it2 = make_iterator(c, 0, 1, store=store)
    it2.set_state(state)
    got = [next(it2) for _ in range(5)]
    for a, b in zip(want, got):
        for f in vars(a):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert it2.metrics == it.metrics


def test_bad_settings_fail_clearly():
    with pytest.raises(DataError, match="not divisible by 3"):
        make_iterator(cfg(batch_size=4), 0, 3, store=FakeStore(make_samples(4)))
    with pytest.raises(DataError, match="data.seq_len"):
        make_iterator(cfg(seq_len=0), 0, 1, store=FakeStore(make_samples(4)))


def test_real_rollout_store_gives_the_same_batches_as_the_in_memory_one(tmp_path):
    from lopd_jax.store import RolloutStore

    samples = make_samples(25)
    with RolloutStore.create(tmp_path / "store", manifest={"policy": "test"}, chunk_tokens=64) as w:
        w.append([dict(s, prompt_index=i) for i, s in enumerate(samples)])
        w.flush()
        w.write_teacher(0, [s["teacher_logprobs"] for s in samples])
    c = cfg(store=str(tmp_path / "store"), require_teacher=True)
    it = make_iterator(c, 0, 1)  # opens the store itself
    got = list(it)
    want, _ = batches(FakeStore(samples), c)
    assert len(got) == len(want) > 1
    for a, b in zip(got, want):
        for f in vars(a):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
