"""vLLM adapter: conversions of vLLM-shaped outputs (namedtuples mirroring vllm.outputs / vllm.logprobs), checked
against torch.log_softmax of known logits; request plumbing checked with a stand-in ``vllm`` module."""

import subprocess
import sys
import types
from collections import namedtuple

import numpy as np
import pytest
import torch

from precompute.engines import vllm_engine as ve

# Shaped like vLLM's documented classes (field names and order).
Logprob = namedtuple("Logprob", "logprob rank decoded_token")
CompletionOutput = namedtuple(
    "CompletionOutput", "index text token_ids cumulative_logprob logprobs finish_reason stop_reason"
)
RequestOutput = namedtuple("RequestOutput", "request_id prompt prompt_token_ids prompt_logprobs outputs finished")

V = 50


def vllm_entry(lp_row: torch.Tensor, actual: int, k: int, rng) -> dict:
    """One position's dict as vLLM builds it: the actual token (its true rank) plus the top-k (ranks 1..k),
    in a shuffled insertion order so the conversion must sort by rank itself."""
    entry = {actual: Logprob(float(lp_row[actual]), int((lp_row > lp_row[actual]).sum()) + 1, None)}
    if k:
        vals, ids = torch.topk(lp_row, k)
        for r, (v, t) in enumerate(zip(vals.tolist(), ids.tolist())):
            entry[t] = Logprob(v, r + 1, None)
    items = list(entry.items())
    rng.shuffle(items)
    return dict(items)


def logits_and_tokens(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    lp = torch.log_softmax(logits, -1)
    tokens = torch.randint(0, V, (T,), generator=g)
    tokens[3] = int(lp[2].argmax())  # some actual tokens inside the top-k (then the dict has only k entries)
    tokens[5] = int(lp[4].argsort(descending=True)[1])
    return lp, tokens.tolist()


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_to_rows_matches_log_softmax(k):
    T, rng = 12, np.random.default_rng(0)
    lp, tokens = logits_and_tokens(T)  # lp[j - 1] is the distribution that predicts tokens[j]
    prompt_logprobs = [None] + [vllm_entry(lp[j - 1], tokens[j], k, rng) for j in range(1, T)]
    assert len(prompt_logprobs[3]) == max(k, 1) and len(prompt_logprobs[1]) in (k, k + 1)
    rows = ve.prompt_logprobs_to_rows(tokens, prompt_logprobs, k)
    want = lp[torch.arange(T - 1), torch.tensor(tokens[1:])].numpy()
    assert np.isnan(rows["logprobs"][0])
    np.testing.assert_array_equal(rows["logprobs"][1:], want.astype(np.float32))
    assert rows["topk_ids"].shape == (T, k) and rows["topk_logprobs"].dtype == np.float32
    if k:
        vals, ids = torch.topk(lp[:-1], k)
        np.testing.assert_array_equal(rows["topk_ids"][1:], ids.numpy())
        np.testing.assert_array_equal(rows["topk_logprobs"][1:], vals.numpy().astype(np.float32))
        assert np.all(rows["topk_ids"][0] == -1) and np.all(np.isnan(rows["topk_logprobs"][0]))


def test_prompt_logprobs_shape_errors():
    lp, tokens = logits_and_tokens(8)
    tokens, rng = tokens[:4], np.random.default_rng(0)
    good = [None] + [vllm_entry(lp[j - 1], tokens[j], 0, rng) for j in range(1, 4)]
    with pytest.raises(ValueError, match="list of 4 entries starting with None"):
        ve.prompt_logprobs_to_rows(tokens, good[1:], 0)
    bad = list(good)
    bad[2] = {tokens[2] + 1 if tokens[2] + 1 < V else 0: Logprob(-1.0, 1, None)}
    with pytest.raises(ValueError, match=f"prompt_logprobs\\[2\\] lacks the actual token {tokens[2]}"):
        ve.prompt_logprobs_to_rows(tokens, bad, 0)


def completion(ids, lp, finish="stop", index=0, k=0, rng=None):
    rng = rng or np.random.default_rng(0)
    logprobs = [vllm_entry(lp[j], t, k, rng) for j, t in enumerate(ids)]
    return CompletionOutput(
        index, "", ids, float(sum(e[t].logprob for e, t in zip(logprobs, ids))), logprobs, finish, None
    )


def test_completion_to_row():
    lp, tokens = logits_and_tokens(8, seed=1)
    ids = tokens[:5] + [7]  # ends on stop token 7
    row = ve.completion_to_row(completion(ids, lp, k=2), [1, 2, 3], prompt_index=4, answer="x", stop_token_ids=[7])
    np.testing.assert_array_equal(row["tokens"], [1, 2, 3, *ids])
    assert row["tokens"].dtype == np.int32 and row["prompt_length"] == 3 and row["prompt_index"] == 4
    assert row["finish_reason"] == "stop" and row["answer"] == "x"
    want = lp[torch.arange(6), torch.tensor(ids)].numpy().astype(np.float32)
    np.testing.assert_array_equal(row["behavior_logprobs"], want)
    cut = ve.completion_to_row(completion(tokens[:6], lp, finish="length"), [1], 0, stop_token_ids=[7])
    assert cut["finish_reason"] == "length" and len(cut["behavior_logprobs"]) == 6
    with pytest.raises(ValueError, match="last token \\[5\\] is not a stop token \\[7\\]"):
        ve.completion_to_row(completion([4, 5], lp), [1], 0, stop_token_ids=[7])
    with pytest.raises(ValueError, match="finish_reason 'abort'"):
        ve.completion_to_row(completion([4, 7], lp, finish="abort"), [1], 0)
    with pytest.raises(ValueError, match="one logprobs dict per generated token"):
        ve.completion_to_row(completion([4, 7], lp)._replace(logprobs=None), [1], 0)


class FakeLLM:
    """Answers generate() like vLLM for a bigram 'model': log p(next | prev) = table[prev]."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        params = params if isinstance(params, list) else [params] * len(prompts)
        return [self._one(i, p["prompt_token_ids"], sp) for i, (p, sp) in enumerate(zip(prompts, params))]

    def _one(self, i, ids, sp):
        rng = np.random.default_rng(sp.kwargs.get("seed", 0))
        if sp.kwargs.get("prompt_logprobs") is not None:
            k = sp.kwargs["prompt_logprobs"]
            pl = [None] + [vllm_entry(self.table[ids[j - 1]], ids[j], k, rng) for j in range(1, len(ids))]
            return RequestOutput(str(i), None, ids, pl, [], True)
        outs = []
        for c in range(sp.kwargs["n"]):
            gen = [int(t) for t in rng.integers(0, V, sp.kwargs["max_tokens"])]
            prev = [ids[-1], *gen[:-1]]
            logprobs = [vllm_entry(self.table[p], t, 0, rng) for p, t in zip(prev, gen)]
            outs.append(CompletionOutput(c, "", gen, None, logprobs, "length", None))
        return RequestOutput(str(i), None, ids, None, outs[::-1], True)  # out of order: adapter sorts by index


@pytest.fixture
def fake_vllm(monkeypatch):
    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    mod = types.SimpleNamespace(
        SamplingParams=SamplingParams,
        TokensPrompt=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids},
        LLM=lambda **kw: ("LLM", kw),
        __version__="0.0-fake",
    )
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def test_generate_rollouts_requests_and_rows(fake_vllm):
    table = torch.log_softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1)
    llm = FakeLLM(table)
    prompts, idx = [[1, 2, 3], [4, 5]], [10, 11]
    rows = ve.generate_rollouts(
        llm,
        prompts,
        idx,
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        max_tokens=4,
        seed=5,
        stop_token_ids=[7],
        answers=["a", None],
    )
    (requests, params) = llm.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == prompts
    kw = params[0].kwargs
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"]) == (2, 0.7, 0.9, 20, 4)
    assert kw["logprobs"] == 0 and kw["stop_token_ids"] == [7] and kw["detokenize"] is False
    assert [p.kwargs["seed"] for p in params] == [ve.request_seed(5, 10), ve.request_seed(5, 11)]
    assert ve.request_seed(5, 10) != ve.request_seed(6, 10)
    assert [r["prompt_index"] for r in rows] == [10, 10, 11, 11] and [r["answer"] for r in rows] == [
        "a",
        "a",
        None,
        None,
    ]
    for r in rows:
        p, gen = r["prompt_length"], r["tokens"][r["prompt_length"] :]
        prev = r["tokens"][p - 1 : -1]
        want = table[torch.tensor(prev), torch.tensor(gen)].numpy().astype(np.float32)
        np.testing.assert_array_equal(r["behavior_logprobs"], want)


def test_score_sequences_requests(fake_vllm):
    table = torch.log_softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64), -1)
    llm = FakeLLM(table)
    seqs = [[1, 2, 3, 4], [5, 6]]
    rows = ve.score_sequences(llm, seqs, k=2)
    kw = llm.calls[0][1].kwargs
    assert kw == {"max_tokens": 1, "prompt_logprobs": 2, "detokenize": False}
    for s, r in zip(seqs, rows):
        want = table[torch.tensor(s[:-1]), torch.tensor(s[1:])].numpy().astype(np.float32)
        np.testing.assert_array_equal(r["logprobs"][1:], want)
        np.testing.assert_array_equal(r["topk_ids"][1:], torch.topk(table[torch.tensor(s[:-1])], 2).indices.numpy())


def test_make_llm_passes_flags_and_vllm_is_imported_lazily(fake_vllm):
    opts = ve.VllmOptions(tensor_parallel_size=4, max_num_batched_tokens=8192, dtype="bfloat16", seed=3)
    _, kw = ve.make_llm("/models/t", opts)
    assert kw["tensor_parallel_size"] == 4 and kw["max_num_batched_tokens"] == 8192 and kw["dtype"] == "bfloat16"
    assert kw["seed"] == 3 and kw["trust_remote_code"] is False and "max_model_len" not in kw
    assert ve.engine_info(opts)["version"] == "0.0-fake"
    code = "import sys, precompute.engines.vllm_engine; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ve.__file__.rsplit("/precompute/", 1)[0])
