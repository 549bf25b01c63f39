"""The JAX sampler against transformers (greedy tokens, log-probs), the top-k / top-p masks, and seeding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

from lopd_jax.inference import sampling
from lopd_jax.models import qwen3
from lopd_jax.parallel import sharding

# initializer_range 0.3 makes the next-token distribution peaked, so greedy argmaxes are far from ties.
HF_KW = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rope_theta=10_000.0, initializer_range=0.3, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip
PROMPTS = [[3, 17, 92], [5, 9, 44, 101, 7, 63, 2], [120, 1, 1, 8, 30, 77, 45, 46, 99, 14, 60, 3]]
MAX_NEW = 10
BATCH = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(HFQwen3Config(**HF_KW)).eval()
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    hf.save_pretrained(path)
    cfg, params = qwen3.load_hf(path)
    return hf, cfg, params


def hf_greedy(hf, prompt, eos):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def hf_logprobs(hf, prompt, generated):
    """log_softmax of transformers' logits gathered at each generated token, and the top-2 margins."""
    seq = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        logits = hf(seq).logits[0, len(prompt) - 1 : -1].double()
    lp = torch.log_softmax(logits, -1)
    top2 = torch.topk(logits, 2, -1).values
    return lp[torch.arange(len(generated)), torch.tensor(generated)].numpy(), (top2[:, 0] - top2[:, 1]).numpy()


@pytest.fixture(scope="module")
def greedy_reference(model):
    """transformers' greedy continuations, stopping at a token greedy decoding of prompt 0 emits at step 4."""
    hf, _, _ = model
    free = hf_greedy(hf, PROMPTS[0], eos=None)
    stop = next(t for t in free[4:] if t not in free[:4])
    return stop, [hf_greedy(hf, p, eos=stop) for p in PROMPTS]


def test_greedy_matches_transformers(model, greedy_reference):
    hf, cfg, params = model
    stop, expected = greedy_reference
    scfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=(stop,))
    outs = sampling.generate(params, cfg, PROMPTS, scfg, jax.random.key(0), batch_size=BATCH)
    for prompt, ref, out in zip(PROMPTS, expected, outs):
        assert out.token_ids.tolist() == ref
        assert out.finish_reason == ("stop" if ref[-1] == stop else "length")
        assert out.finish_reason == "stop" or len(ref) == MAX_NEW
        ref_lp, margin = hf_logprobs(hf, prompt, ref)
        assert margin.min() > 1e-3  # no near-ties: a token-for-token match is meaningful
        np.testing.assert_allclose(out.logprobs, ref_lp, atol=1e-4, rtol=0)
    assert outs[0].finish_reason == "stop" and outs[0].token_ids[-1] == stop  # stop token kept in the output


def test_sampled_logprobs_are_raw_policy_logprobs_and_seeded(model):
    hf, cfg, params = model
    scfg = sampling.SamplingConfig(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=MAX_NEW, ignore_eos=True)
    a = sampling.generate(params, cfg, PROMPTS, scfg, jax.random.key(1), batch_size=BATCH)
    again = sampling.generate(params, cfg, PROMPTS, scfg, jax.random.key(1), batch_size=BATCH)
    other = sampling.generate(params, cfg, PROMPTS, scfg, jax.random.key(2), batch_size=BATCH)
    for prompt, x, y in zip(PROMPTS, a, again):
        assert x.token_ids.tolist() == y.token_ids.tolist() and x.finish_reason == "length"
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
        ref_lp, _ = hf_logprobs(hf, prompt, x.token_ids.tolist())  # temperature-1, untruncated model log-probs
        np.testing.assert_allclose(x.logprobs, ref_lp, atol=1e-4, rtol=0)
    assert [x.token_ids.tolist() for x in a] != [x.token_ids.tolist() for x in other]
    # Without a key the config's seed is used; a prompt's sample does not depend on its batch-mates.
    seeded = sampling.generate(params, cfg, PROMPTS, dataclasses.replace(scfg, seed=1), batch_size=BATCH)
    assert [x.token_ids.tolist() for x in seeded] == [x.token_ids.tolist() for x in a]


def test_sharded_generation_equals_single_device(model, greedy_reference):
    _, cfg, params = model
    stop, expected = greedy_reference
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    scfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=(stop,))
    outs = sampling.generate(params, cfg, PROMPTS, scfg, jax.random.key(0), mesh=mesh, batch_size=BATCH)
    assert [o.token_ids.tolist() for o in outs] == expected


def test_top_k_top_p_masks_on_a_hand_built_distribution():
    probs = np.array([[0.05, 0.5, 0.1, 0.2, 0.15]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(sampling.apply_top_k(logits, 2)) == [False, True, False, True, False]
    assert kept(sampling.apply_top_k(logits, 0)) == [True] * 5
    # Smallest set of most likely tokens reaching p: 0.5 (< 0.6) + 0.2 = 0.7 >= 0.6 -> {1, 3}.
    assert kept(sampling.apply_top_p(logits, 0.6)) == [False, True, False, True, False]
    # 0.5 + 0.2 + 0.15 = 0.85 >= 0.75 -> {1, 3, 4}; p = 0.4 keeps only the top token.
    assert kept(sampling.apply_top_p(logits, 0.75)) == [False, True, False, True, True]
    assert kept(sampling.apply_top_p(logits, 0.4)) == [False, True, False, False, False]
    # top-p runs on the temperature-scaled, top-k-masked distribution: T=0.5 -> p^2 renormalised:
    # 0.25/0.34 = 0.735 >= 0.7 -> only the top token survives (at T=1 it would need {1, 3}).
    assert kept(sampling.process_logits(logits, 0.5, top_k=0, top_p=0.7)) == [False, True, False, False, False]
    assert kept(sampling.process_logits(logits, 1.0, top_k=0, top_p=0.65)) == [False, True, False, True, False]


def test_sample_frequencies_follow_the_processed_distribution():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
    n = 20000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 5))
    keys = jax.random.split(jax.random.key(0), n)
    st = sampling._Static(temperature=0.5, top_p=0.9, top_k=3, max_new_tokens=1, stop_ids=())
    tokens, logprobs = jax.jit(sampling.sample_tokens, static_argnums=2)(logits, keys, st)
    # top-3 {1, 3, 4} at T=0.5: p^2 = .25, .04, .0225 -> .7937, .1270, .0714; top-p .9 drops token 4 (.0714 <= 1 - .9).
    target = np.array([0.0, 0.25, 0.0, 0.04, 0.0]) / 0.29
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    np.testing.assert_allclose(freq, target, atol=4 * np.sqrt(0.25 / n))
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[np.asarray(tokens)], atol=1e-6)  # raw


def test_bad_prompts_and_config_raise(model):
    _, cfg, params = model
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.generate(params, cfg, [[1], []], sampling.SamplingConfig(temperature=0))
    with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
        sampling.generate(params, cfg, [[1, 128]], sampling.SamplingConfig(temperature=0))
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
    assert sampling.prompt_bucket(3) == 16 and sampling.prompt_bucket(17) == 32 and sampling.prompt_bucket(64) == 64
