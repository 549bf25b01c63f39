"""precompute.engines.jax_engine: teacher scores against transformers, bucketing plan.

JaxEngine.generate (a thin call of lopd_jax.inference.sampling) is checked against transformers' greedy generate end
to end
in tests/integration/test_precompute_cli.py."""

import numpy as np
import pytest
import torch
import transformers
from helpers.models import TINY_TOKENS, tiny_arch

from precompute.engines import jax_engine
from precompute.engines.jax_engine import JaxEngine

VOCAB = 128


def build_tiny_qwen3(path, seed: int = 0, tie: bool = False) -> transformers.Qwen3ForCausalLM:
    """A random 2-layer Qwen3 saved (safetensors) to ``path``; returns the torch model in eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**tiny_arch(**TINY_TOKENS, max_position_embeddings=256, tie_word_embeddings=tie))
    model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger weights than the 0.02 init: peaked distributions, distinct top-k values
        for p in model.parameters():
            p.mul_(4.0) if p.ndim > 1 else None
    model.save_pretrained(path)
    return model


def torch_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    """[L, V] log_softmax of transformers' logits for one sequence, in float64."""
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    model = build_tiny_qwen3(path, seed=0, tie=True)
    return path, model, JaxEngine(str(path))


def test_score_matches_transformers_log_softmax_and_topk(tiny):
    path, model, engine = tiny
    rng = np.random.default_rng(0)
    lengths = [5, 70, 33, 33, 12, 48, 2]  # buckets 32, 96, 48, 48, 32, 48, 32: several shapes and batches
    seqs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]
    k = 4
    scored = engine.score(seqs, topk=k, batch_tokens=96)
    plain = engine.score(seqs, topk=0, batch_tokens=96)
    for seq, s, p in zip(seqs, scored, plain):
        ref = torch_logprobs(model, seq)  # ref[t] = log p(. | seq[:t + 1])
        want = ref[np.arange(len(seq) - 1), seq[1:]]
        assert np.isnan(s.logprobs[0]) and np.isnan(p.logprobs[0])
        np.testing.assert_allclose(s.logprobs[1:], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(p.logprobs[1:], want, atol=1e-4, rtol=0)
        top_ids = np.argsort(-ref[:-1], axis=-1)[:, :k]
        np.testing.assert_array_equal(s.topk_ids[1:], top_ids)
        np.testing.assert_allclose(s.topk_logprobs[1:], np.take_along_axis(ref[:-1], top_ids, -1), atol=1e-4)
        assert (s.topk_ids[0] == -1).all() and np.isnan(s.topk_logprobs[0]).all()


def test_score_refuses_a_single_token_sample(tiny):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        tiny[2].score([np.array([3], np.int32)])


def test_bucket_ladder_and_batch_plan():
    assert [jax_engine.bucket_length(n) for n in (1, 32, 33, 48, 49, 64, 65, 97, 200)] == [
        32, 32, 48, 48, 64, 64, 96, 128, 256,
    ]  # fmt: skip
    lengths = [70, 5, 33, 40, 12, 33, 90, 31]
    plan = jax_engine.plan_batches(lengths, batch_tokens=100, multiple=2)
    seen = sorted(i for _, _, idx in plan for i in idx)
    assert seen == list(range(len(lengths)))  # every sample exactly once
    for rows, bucket, idx in plan:
        assert rows % 2 == 0 and len(idx) <= rows
        assert rows == 2 or len(idx) > rows // 2  # a partial batch shrinks instead of padding with empty rows
        assert all(jax_engine.bucket_length(lengths[i]) == bucket for i in idx)
    # Fewer distinct shapes than samples: the compile count stays small.
    assert len({(r, b) for r, b, _ in plan}) == 3


def test_cpu_caps_the_batch_and_pipelined_batches_keep_sample_order(tiny):
    """On CPU a 16384-token request runs 4096-token batches (activations stay in cache, ~1.2x per token), and the
    pipelined score (batch i + 1 dispatched before batch i is read) returns every sample at its own index."""
    path, model, engine = tiny
    assert engine.max_batch_tokens == jax_engine.CPU_BATCH_TOKENS == 4096
    assert engine.batch_tokens(16384) == 4096 and engine.batch_tokens(96) == 96
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in rng.integers(2, 90, 40)]
    many = engine.score(seqs, batch_tokens=64)  # several batches of several shapes, in flight one ahead
    assert len(jax_engine.plan_batches([len(s) for s in seqs], 64)) > 10
    for seq, s in zip(seqs, many):
        ref = torch_logprobs(model, seq)
        assert s.logprobs.shape == (len(seq),) and s.logprobs.dtype == np.float32 and np.isnan(s.logprobs[0])
        np.testing.assert_allclose(s.logprobs[1:], ref[np.arange(len(seq) - 1), seq[1:]], atol=1e-4, rtol=0)
