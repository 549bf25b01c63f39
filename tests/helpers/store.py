"""Rollout-store samples for the store tests (tests/unit/test_store.py and the writer it kills in a subprocess)."""

import numpy as np

# Tiny chunks so a few hundred tokens span many chunks and shards, and flushes land mid-chunk.
LAYOUT = dict(chunk_tokens=64, chunk_samples=16, shard_chunks=4)


def make_samples(n, seed=0, topk=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(1, 30)), int(rng.integers(1, 50))
        s = dict(
            tokens=rng.integers(0, 512, p + r).astype(np.int32),
            prompt_length=p,
            finish_reason="stop" if i % 3 else "length",
            behavior_logprobs=-rng.exponential(size=r).astype(np.float32),
            prompt_index=i // 2,
            answer=[None, "42", "\\frac{1}{2} ü", 7][i % 4],
            teacher=-rng.exponential(size=r).astype(np.float32),
        )
        if topk:
            s["topk_ids"] = rng.integers(0, 512, (r, topk)).astype(np.int32)
            s["topk_lp"] = -np.sort(rng.exponential(size=(r, topk)), axis=1).astype(np.float32)
        out.append(s)
    return out


def append_rows(samples):
    return [{k: v for k, v in s.items() if k not in ("teacher", "topk_ids", "topk_lp")} for s in samples]
