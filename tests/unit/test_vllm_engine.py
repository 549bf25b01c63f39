"""vLLM adapter: conversions of vLLM-shaped outputs (namedtuples mirroring vllm.outputs / vllm.logprobs), checked
against torch.log_softmax of known logits; request plumbing, the version check and the recorded options checked with
a stand-in ``vllm`` module that behaves like the versions it claims to be (see FakeLLM)."""

import json
import subprocess
import sys
import types
from collections import namedtuple

import numpy as np
import pytest
import torch
import transformers

from lopd_jax.demo import synthetic
from lopd_jax.store import RolloutStore
from precompute import rollouts, teacher_logprobs
from precompute.common import PrecomputeError
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
    """``vllm.LLM`` of a bigram 'model' (log p(next | prev) = table[prev]) that behaves like the vLLM ``version`` it
    claims to be where the adapter depends on it (each checked in that version's source, see vllm_engine):
    ``dtype="auto"`` resolves to the checkpoint's bfloat16; ``hf_overrides`` head_dtype reaches the head from 0.26
    on (before, model_config.head_dtype is the model dtype); prompt_logprobs above max_logprobs (default 20) and a
    prompt as long as max_model_len are rejected; generation stops at stop_token_ids, and 0.11.0 labels a stop token
    that is exactly the max_tokens-th "length"."""

    def __init__(self, table, version="0.33.0", eos_at_last=False, **kwargs):
        self.table, self.version, self.eos_at_last, self.kwargs, self.calls = table, version, eos_at_last, kwargs, []
        dtype = getattr(torch, {"auto": "bfloat16"}.get(kwargs.get("dtype", "auto"), kwargs.get("dtype", "auto")))
        head = (kwargs.get("hf_overrides") or {}).get("head_dtype")
        applies = head is not None and ve._parse_version(version) >= (0, 26)
        model_config = types.SimpleNamespace(
            dtype=dtype, head_dtype=getattr(torch, head) if applies else dtype,
            max_model_len=kwargs.get("max_model_len", 256), max_logprobs=kwargs.get("max_logprobs", 20),
            logprobs_mode=kwargs.get("logprobs_mode", "raw_logprobs"), seed=kwargs.get("seed", 0),
        )  # fmt: skip
        ns = types.SimpleNamespace
        vllm_config = ns(
            model_config=model_config,
            cache_config=ns(gpu_memory_utilization=kwargs.get("gpu_memory_utilization", 0.9),
                            enable_prefix_caching=kwargs.get("enable_prefix_caching", True)),
            parallel_config=ns(tensor_parallel_size=kwargs.get("tensor_parallel_size", 1)),
            scheduler_config=ns(max_num_batched_tokens=kwargs.get("max_num_batched_tokens") or 8192),
        )  # fmt: skip
        self.llm_engine = ns(model_config=model_config, vllm_config=vllm_config)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        params = params if isinstance(params, list) else [params] * len(prompts)
        return [self._one(i, p["prompt_token_ids"], sp) for i, (p, sp) in enumerate(zip(prompts, params))]

    def _one(self, i, ids, sp):
        mc = self.llm_engine.model_config
        if len(ids) >= mc.max_model_len:  # 0.33 input_processor: prompt + 1 output token must fit
            raise ValueError(f"The decoder prompt (length {len(ids)}) plus ... is longer than {mc.max_model_len}")
        rng, V = np.random.default_rng(sp.kwargs.get("seed", 0)), len(self.table)
        if sp.kwargs.get("prompt_logprobs") is not None:
            k = sp.kwargs["prompt_logprobs"]
            if k > mc.max_logprobs:
                raise ValueError(
                    f"Requested prompt logprobs of {k}, which is greater than max allowed: {mc.max_logprobs}"
                )
            pl = [None] + [vllm_entry(self.table[ids[j - 1] % V], ids[j], k, rng) for j in range(1, len(ids))]
            return RequestOutput(str(i), None, ids, pl, [], True)
        outs = [self._completion(c, ids, sp, rng) for c in range(sp.kwargs["n"])]
        return RequestOutput(str(i), None, ids, None, outs[::-1], True)  # out of order: adapter sorts by index

    def _completion(self, c, ids, sp, rng):
        mc = self.llm_engine.model_config
        V, max_tokens, stops = len(self.table), sp.kwargs["max_tokens"], sp.kwargs.get("stop_token_ids") or []
        gen = [int(t) for t in rng.integers(0, V, max_tokens)]
        if self.eos_at_last:
            gen = [t for t in gen[:-1] if t not in stops] + [stops[0]]
        cut = next((j for j, t in enumerate(gen) if t in stops), None)
        finish = "length" if cut is None else "stop"
        if cut is not None:
            gen = gen[: cut + 1]
            if len(gen) == max_tokens and self.version == "0.11.0":  # check_stop tests the length cap first
                finish = "length"
        prev = [ids[-1], *gen[:-1]]
        k = sp.kwargs.get("logprobs") or 0  # the sampled token plus the top-k of the raw distribution (V1)
        if k > mc.max_logprobs:
            raise ValueError(f"Requested sample logprobs of {k}, which is greater than max allowed: {mc.max_logprobs}")
        logprobs = [vllm_entry(self.table[p % V], t, k, rng) for p, t in zip(prev, gen)]
        return CompletionOutput(c, "", gen, None, logprobs, finish, None)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module in sys.modules: ``LLM(**kw)`` builds a FakeLLM of ``mod.__version__`` over a 128-token
    bigram table and appends it to ``mod.instances``."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    table = torch.log_softmax(
        torch.randn(128, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64), -1
    )
    mod = types.SimpleNamespace(
        SamplingParams=SamplingParams,
        TokensPrompt=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids},
        __version__="0.33.0",
        instances=[],
    )
    mod.LLM = lambda **kw: mod.instances.append(FakeLLM(table, mod.__version__, **kw)) or mod.instances[-1]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.delenv("VLLM_USE_V1", raising=False)
    return mod


def test_generate_rollouts_requests_and_rows(fake_vllm):
    table = torch.log_softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1)
    llm = FakeLLM(table)
    prompts, idx = [[1, 2, 3], [4, 5]], [10, 11]
    rows = ve.generate_rollouts(
        llm, prompts, idx, n=2, temperature=0.7, top_p=0.9, top_k=20, max_tokens=4, seed=5, stop_token_ids=[7],
        answers=["a", None],
    )  # fmt: skip
    (requests, params) = llm.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == prompts
    kw = params[0].kwargs
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"]) == (2, 0.7, 0.9, 20, 4)
    assert kw["logprobs"] == 0 and kw["stop_token_ids"] == [7] and kw["detokenize"] is False
    assert [p.kwargs["seed"] for p in params] == [ve.request_seed(5, 10), ve.request_seed(5, 11)]
    assert ve.request_seed(5, 10) != ve.request_seed(6, 10)
    assert [r["prompt_index"] for r in rows] == [10, 10, 11, 11]
    assert [r["answer"] for r in rows] == ["a", "a", None, None]
    for r in rows:
        p, gen = r["prompt_length"], r["tokens"][r["prompt_length"] :]
        prev = r["tokens"][p - 1 : -1]
        want = table[torch.tensor(prev), torch.tensor(gen)].numpy().astype(np.float32)
        np.testing.assert_array_equal(r["behavior_logprobs"], want)


@pytest.mark.parametrize("version", ["0.11.0", "0.12.0"])
def test_a_stop_token_at_max_tokens_is_labelled_stop_on_every_version(fake_vllm, version):
    table = torch.log_softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64), -1)
    llm = FakeLLM(table, version, eos_at_last=True)
    rows = ve.generate_rollouts(llm, [[1, 2]], [0], n=3, max_tokens=5, stop_token_ids=[7, 9])
    said = {c.finish_reason for c in llm.generate([{"prompt_token_ids": [1, 2]}], llm.calls[0][1])[0].outputs}
    assert said == ({"length"} if version == "0.11.0" else {"stop"})  # the fake reproduces 0.11.0's label
    assert [r["finish_reason"] for r in rows] == ["stop"] * 3 and all(len(r["tokens"]) == 7 for r in rows)
    assert all(r["tokens"][-1] == 7 for r in rows)
    llm.eos_at_last = False  # no stop token sampled in 5 draws from 50 for these seeds: "length" stays
    cut = ve.generate_rollouts(llm, [[1, 2]], [1], n=1, max_tokens=5, stop_token_ids=[48])
    assert cut[0]["finish_reason"] == "length" and cut[0]["tokens"][-1] != 48


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
    kw = ve.make_llm("/models/t", opts).kwargs
    assert kw["tensor_parallel_size"] == 4 and kw["max_num_batched_tokens"] == 8192 and kw["dtype"] == "bfloat16"
    assert kw["seed"] == 3 and kw["trust_remote_code"] is False and kw["tokenizer"] == "/models/t"
    assert not {"max_model_len", "max_logprobs", "enable_prefix_caching", "hf_overrides"} & set(kw)
    code = "import sys, precompute.engines.vllm_engine; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ve.__file__.rsplit("/precompute/", 1)[0])


# ------------------------------------------------------------------------------------------------ version check

ACCEPTED = ["0.11.0", "0.11.1rc2.dev5+g12ab34", "0.20.2", "0.33.0+cu130"]
REFUSED = ["0.8.5.post1", "0.10.2", "0.34.0", "1.0.0", "nightly"]


@pytest.mark.parametrize("version", ACCEPTED + REFUSED)
def test_check_version_accepts_exactly_the_checked_range(version):
    if version in ACCEPTED:
        ve.check_version(version, {})
        return
    with pytest.raises(PrecomputeError, match=f"{version}.*>=0.11,<0.34"):
        ve.check_version(version, {})


def test_check_version_refuses_v0_and_an_fp32_head_vllm_would_not_apply():
    with pytest.raises(PrecomputeError, match="VLLM_USE_V1=0 asks vllm 0.11.0 for the V0 engine"):
        ve.check_version("0.11.0", {"VLLM_USE_V1": "0"})
    ve.check_version("0.11.0", {"VLLM_USE_V1": "1"})
    with pytest.raises(PrecomputeError, match="vllm 0.25.1 cannot compute .* head in fp32 \\(needs vllm >= 0.26\\)"):
        ve.check_version("0.25.1", {}, head_dtype="float32", dtype="bfloat16")
    ve.check_version("0.25.1", {}, head_dtype="float32", dtype="float32")  # the whole model in fp32: head too
    ve.check_version("0.26.0", {}, head_dtype="float32", dtype="auto")


def tiny_model_dir(path):
    """A random 1-layer Qwen3 with the synthetic char tokenizer (eos 2): what the CLIs read besides the engine."""
    cfg = transformers.Qwen3Config(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=256, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    synthetic.build_tokenizer(path)
    return path


@pytest.mark.parametrize(("version", "env"), [("0.10.2", {}), ("0.11.0", {"VLLM_USE_V1": "0"})])
def test_clis_refuse_an_unchecked_vllm_before_writing(fake_vllm, tmp_path, capsys, monkeypatch, version, env):
    fake_vllm.__version__ = version
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    argv = [
        "--policy",
        str(tmp_path / "m"),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "r"),
        "--engine",
        "vllm",
    ]
    assert rollouts.main(argv) == 2
    argv = ["--teacher", str(tmp_path / "m"), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o")]
    assert teacher_logprobs.main([*argv, "--engine", "vllm"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") and f"vllm {version}" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"] and not fake_vllm.instances


# ------------------------------------------------------------------------------------------------ scoring options


def test_scoring_raises_max_logprobs_turns_prefix_caching_off_and_fits_the_longest_sample(fake_vllm, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 16}))
    seq = list(range(16))  # exactly the model's max_position_embeddings
    loose = ve.make_llm(str(tmp_path), ve.VllmOptions(max_model_len=16))
    with pytest.raises(ValueError, match="greater than max allowed: 20"):
        ve.score_sequences(loose, [seq[:4]], k=21)  # what vLLM does without max_logprobs
    with pytest.raises(ValueError, match="length 16"):
        ve.score_sequences(loose, [seq], k=2)  # ... and with max_model_len = the longest sample
    opts = ve.scoring_options(str(tmp_path), 16, 21, dtype="bfloat16")
    assert (opts.max_model_len, opts.max_logprobs, opts.enable_prefix_caching) == (17, 21, False)
    llm = ve.make_llm(str(tmp_path), opts)
    assert llm.kwargs["max_logprobs"] == 21 and llm.kwargs["enable_prefix_caching"] is False
    rows = ve.score_sequences(llm, [seq], k=21)
    assert rows[0]["topk_ids"].shape == (16, 21) and np.isfinite(rows[0]["logprobs"][1:]).all()
    short = ve.scoring_options(str(tmp_path), 8, 20)
    assert (short.max_model_len, short.max_logprobs) == (16, None)  # the model's own is larger; default suffices
    assert ve.scoring_options(str(tmp_path / "none"), 8, 0).max_model_len == 9  # no config.json: longest + 1


# ------------------------------------------------------------------------------------------------ recorded options


def test_engine_info_records_what_vllm_ran_with_not_what_was_asked(fake_vllm):
    fake_vllm.__version__ = "0.26.0"
    opts = ve.VllmOptions(dtype="auto", gpu_memory_utilization=0.6, head_dtype="float32", seed=4)
    llm = ve.make_llm("/m", opts)
    assert llm.kwargs["hf_overrides"] == {"head_dtype": "float32"} and llm.kwargs["gpu_memory_utilization"] == 0.6
    info = ve.engine_info(llm, opts)
    assert (info["name"], info["version"], info["dtype"], info["head_dtype"]) == (
        "vllm",
        "0.26.0",
        "bfloat16",
        "float32",
    )
    assert info["gpu_memory_utilization"] == 0.6 and info["enable_prefix_caching"] is True and info["seed"] == 4
    assert (info["max_logprobs"], info["logprobs_mode"], info["max_model_len"]) == (20, "raw_logprobs", 256)
    assert info["requested"]["dtype"] == "auto" and info["requested"]["head_dtype"] == "float32"
    assert "hf_overrides" not in ve.make_llm("/m", ve.VllmOptions(dtype="float32", head_dtype="float32")).kwargs


def test_make_llm_refuses_an_engine_that_did_not_apply_the_fp32_head(fake_vllm, monkeypatch):
    monkeypatch.setattr(ve, "HEAD_DTYPE_VERSION", (0, 25))  # the check passes 0.25, whose engine ignores the override
    fake_vllm.__version__ = "0.25.1"
    with pytest.raises(PrecomputeError, match="vllm 0.25.1 ran the head in bfloat16, not float32"):
        ve.make_llm("/m", ve.VllmOptions(head_dtype="float32"))


# ------------------------------------------------------------------------------------------------ the CLIs on fake vLLM


def test_rollouts_feed_vllm_one_window_and_match_smaller_windows(fake_vllm, tmp_path):
    model = tiny_model_dir(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add: {i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(10)))
    common = ["--policy", str(model), "--prompts", str(prompts), "--engine", "vllm", "--n", "2", "--seed", "3"]
    common += ["--max-new-tokens", "6", "--temperature", "0.8", "--gpu-memory-utilization", "0.5"]
    assert rollouts.main([*common, "--out", str(tmp_path / "all")]) == 0
    (llm,) = fake_vllm.instances
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 10  # every prompt in one generate call
    assert [sp.kwargs["seed"] for sp in llm.calls[0][1]] == [ve.request_seed(3, i) for i in range(10)]
    m = RolloutStore.open(tmp_path / "all").manifest
    assert m["rollout_args"]["batch_size"] == 2048 and m["rollout_args"]["dtype"] == "auto"
    assert (m["engine"]["dtype"], m["engine"]["gpu_memory_utilization"]) == ("bfloat16", 0.5)
    assert llm.kwargs["max_model_len"] == 1024 + 6 and llm.kwargs["dtype"] == "auto"
    assert rollouts.main([*common, "--out", str(tmp_path / "w4"), "--batch-size", "4"]) == 0
    assert [len(c[0]) for c in fake_vllm.instances[1].calls] == [4, 4, 2]  # one call and one commit per window
    a, b = RolloutStore.open(tmp_path / "all"), RolloutStore.open(tmp_path / "w4")
    assert len(a) == len(b) == 20
    for x, y in zip(a.samples(range(20)), b.samples(range(20))):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["behavior_logprobs"], y["behavior_logprobs"])
        assert x["finish_reason"] == y["finish_reason"]
    assert {s["finish_reason"] for s in a.samples(range(20))} == {"stop", "length"}

    argv = ["--teacher", str(model), "--store", str(tmp_path / "all"), "--out", str(tmp_path / "scored")]
    assert teacher_logprobs.main([*argv, "--engine", "vllm", "--top-k", "24", "--head-fp32"]) == 0
    (scorer,) = fake_vllm.instances[2:]
    assert scorer.kwargs["max_logprobs"] == 24 and scorer.kwargs["enable_prefix_caching"] is False
    assert scorer.kwargs["max_model_len"] == 256 and scorer.kwargs["hf_overrides"] == {"head_dtype": "float32"}
    m = RolloutStore.open(tmp_path / "scored").manifest
    assert m["teacher_engine"]["head_dtype"] == "float32" and m["teacher_engine"]["dtype"] == "bfloat16"
    assert m["teacher_engine"]["max_logprobs"] == 24 and m["teacher_engine"]["enable_prefix_caching"] is False
    assert m["teacher_args"] == {"engine": "vllm", "dtype": "auto", "top_k": 24, "head_fp32": True}


# ------------------------------------------------------------------------------------------------ behaviour top-k


def test_completion_to_row_records_the_top_k_by_rank():
    """logprobs=K dicts (the sampled token with its own rank + ranks 1..K, shuffled) -> the K top-ranked ids and
    log-probs of each token's distribution, whether the sampled token is among them or not."""
    lp, tokens = logits_and_tokens(8, seed=1)
    ids = tokens[:6]
    ids[1], ids[4] = int(lp[1].argmax()), int(lp[4].argsort(descending=True)[2])  # sampled inside the top-3
    row = ve.completion_to_row(completion(ids, lp, finish="length", k=3), [1, 2], 0, record_topk=3)
    vals, top = torch.topk(lp[:6], 3)
    np.testing.assert_array_equal(row["behavior_topk_ids"], top.numpy())
    np.testing.assert_array_equal(row["behavior_topk_logprobs"], vals.numpy().astype(np.float32))
    inside = [int(t) in top[j].tolist() for j, t in enumerate(ids)]
    assert any(inside) and not all(inside)  # both kinds of dict (K and K + 1 entries) occur
    with pytest.raises(ValueError, match="expected ranks 1..4"):  # a dict without the top-4
        ve.completion_to_row(completion(ids, lp, finish="length", k=3), [1, 2], 0, record_topk=4)


def test_topk_record_accepts_only_the_raw_distribution():
    assert ve.topk_record({"logprobs_mode": "raw_logprobs"}, 8)["distribution"] == "raw_logprobs"
    with pytest.raises(PrecomputeError, match="processed_logprobs"):
        ve.topk_record({"logprobs_mode": "processed_logprobs"}, 8)


def test_vllm_rollouts_record_top_k_and_scoring_them_needs_jax(fake_vllm, tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add: {i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(3)))
    argv = ["--policy", str(model), "--prompts", str(prompts), "--engine", "vllm", "--max-new-tokens", "5"]
    assert rollouts.main([*argv, "--out", str(tmp_path / "r"), "--record-topk", "24"]) == 0
    (llm,) = fake_vllm.instances
    assert llm.calls[0][1][0].kwargs["logprobs"] == 24 and llm.kwargs["max_logprobs"] == 24  # above vLLM's 20
    store = RolloutStore.open(tmp_path / "r")
    assert store.behavior_topk == 24
    assert store.manifest["engine"]["behavior_topk"] == ve.topk_record({"logprobs_mode": "raw_logprobs"}, 24)
    for s in store.samples(range(len(store))):
        p = s["prompt_length"]
        prev = torch.tensor(s["tokens"][p - 1 : -1]) % len(llm.table)
        vals, ids = torch.topk(llm.table[prev], 24)
        np.testing.assert_array_equal(s["behavior_topk_ids"][p:], ids.numpy())
        np.testing.assert_array_equal(s["behavior_topk_logprobs"][p:], vals.numpy().astype(np.float32))
    out = tmp_path / "scored"
    targs = ["--teacher", str(model), "--store", str(tmp_path / "r"), "--out", str(out), "--engine", "vllm"]
    capsys.readouterr()  # the rollouts' progress output
    assert teacher_logprobs.main(targs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine jax" in err[0] and not out.exists() and len(fake_vllm.instances) == 1
