"""losses: torch-parity of the OPD / SFT objectives (values and gradients), chunked log-probs, compiled memory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.losses import V, assert_tree_close, pack, rel_err, torch_opd_loss, torch_seq_logprobs

from lopd_jax import losses
from lopd_jax.models import qwen3

D, F, L, N, K, H = 32, 64, 2, 4, 2, 16
HF_KW = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=N,
    num_key_value_heads=K,
    head_dim=H,
    tie_word_embeddings=False,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
)
CFG = qwen3.Qwen3Config(**HF_KW)
# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_KW, attn_implementation="eager"))
    with torch.no_grad():  # larger-than-init weights so every parameter matters in the gradient
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.float().eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def torch_to_params(model, where: str) -> dict:
    """Our param tree from the torch weights, through the HF checkpoint format (qwen3.load_hf)."""
    model.save_pretrained(where)
    cfg, params = qwen3.load_hf(where)
    assert all(getattr(cfg, k) == getattr(CFG, k) for k in HF_KW)  # the JAX side runs CFG: same architecture
    return params


def torch_grads_to_params(model, where: str) -> dict:
    """The torch .grad tensors in our layout, mapped exactly like the weights."""
    clone = transformers.Qwen3ForCausalLM(model.config)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
            q.copy_(p.grad)
    return torch_to_params(clone, where)


# ---------------------------------------------------------------------------------------------- references


# ---------------------------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize(
    "normalization,old_given",
    [("sample_mean", False), ("sample_mean", True), ("token_mean", False)],
)
def test_opd_loss_grad_matches_torch(hf_model, hf_dir, sequences, normalization, old_given):
    hf_model.zero_grad()
    t_loss, t_clip = torch_opd_loss(hf_model, sequences, normalization, old_given)
    t_loss.backward()
    want = torch_grads_to_params(hf_model, hf_dir + "/grads")

    params = torch_to_params(hf_model, hf_dir + "/weights")
    batch = pack(sequences)
    cur = [lp.detach().numpy() for lp in torch_seq_logprobs(hf_model, sequences)]
    old = pack(sequences, [c + s["old_offset"] for c, s in zip(cur, sequences)]) if old_given else None
    loss_cfg = losses.LossConfig(normalization=normalization, logprob_chunk_size=5)  # 5 does not divide T = 16

    fn = jax.jit(jax.value_and_grad(losses.opd_loss, has_aux=True), static_argnames=("cfg", "loss_cfg"))
    (loss, metrics), grads = fn(params, batch, cfg=CFG, loss_cfg=loss_cfg, old_logprobs=old)

    assert rel_err(loss, t_loss.item()) <= 1e-5
    assert_tree_close(grads, want, 1e-4)
    assert float(metrics["opd/clip_frac"]) == pytest.approx(t_clip, abs=1e-6)
    if old_given:
        assert t_clip > 0.1  # the clipped branch is really exercised
    else:
        assert t_clip == 0.0
    n_resp = sum(float((np.arange(1, len(s["tokens"])) >= s["prompt"]).sum()) for s in sequences)
    assert float(metrics["data/tokens"]) == n_resp
    assert float(metrics["data/sequences"]) == len(sequences)


_sft = jax.jit(losses.sft_loss, static_argnames=("cfg", "loss_cfg"))
_opd = jax.jit(losses.opd_loss, static_argnames=("cfg", "loss_cfg"))


def test_sft_loss_and_metrics_match_torch(hf_model, hf_dir, sequences):
    params, batch = torch_to_params(hf_model, hf_dir + "/weights"), pack(sequences)
    lps = [lp.detach().numpy() for lp in torch_seq_logprobs(hf_model, sequences)]
    masks = [(np.arange(1, len(s["tokens"])) >= s["prompt"]).astype(np.float64) for s in sequences]
    # sample_mean: mean NLL per sequence, averaged over sequences; token_mean: one mean over all tokens
    want_sample = np.mean([-(lp * m).sum() / m.sum() for lp, m in zip(lps, masks)])
    want_token = -sum((lp * m).sum() for lp, m in zip(lps, masks)) / sum(m.sum() for m in masks)
    for norm, want in (("sample_mean", want_sample), ("token_mean", want_token)):
        loss, _ = _sft(params, batch, cfg=CFG, loss_cfg=losses.LossConfig(normalization=norm))
        assert rel_err(loss, want) <= 1e-5, norm

    # Diagnostics against numpy on the same tokens: behaviour = current + noise.
    behavior = pack(sequences, [lp + s["behavior_noise"] for lp, s in zip(lps, sequences)])
    batch = dataclasses.replace(batch, behavior_logprobs=jnp.asarray(behavior))
    _, m = _opd(params, batch, cfg=CFG, loss_cfg=losses.LossConfig(compute_entropy=True))
    log_w = np.concatenate([-s["behavior_noise"][mk > 0] for s, mk in zip(sequences, masks)])
    adv = np.concatenate([(s["teacher"] - lp)[mk > 0] for s, lp, mk in zip(sequences, lps, masks)])
    w = np.exp(log_w)
    np.testing.assert_allclose(float(m["opd/kl_behavior_k1"]), np.mean(-log_w), rtol=1e-4)
    np.testing.assert_allclose(float(m["opd/kl_behavior_k3"]), np.mean(w - 1 - log_w), rtol=1e-3)
    np.testing.assert_allclose(float(m["opd/kl_behavior_rev_k1"]), np.mean(w * log_w), rtol=1e-4)
    np.testing.assert_allclose(float(m["opd/iw_max"]), w.max(), rtol=1e-5)
    np.testing.assert_allclose(float(m["opd/iw_std"]), w.std(), rtol=1e-4)
    np.testing.assert_allclose(float(m["opd/adv_mean"]), adv.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["opd/adv_std"]), adv.std(), rtol=1e-4)
    np.testing.assert_allclose(float(m["opd/teacher_student_gap"]), adv.mean(), rtol=1e-5)
    assert 0.0 < float(m["opd/entropy"]) < np.log(V)


def test_tis_weights_the_surrogate(hf_model, hf_dir, sequences):
    """With a cap, each token's surrogate is multiplied by min(exp(old - behaviour), C) (here ratio = 1)."""
    params, batch = torch_to_params(hf_model, hf_dir + "/weights"), pack(sequences)
    behavior = batch.loss_mask * -5.0  # far below the policy: raw weights exp(old + 5) are large, so the cap binds
    batch = dataclasses.replace(batch, behavior_logprobs=jnp.asarray(behavior))
    cfg_tis = losses.LossConfig(normalization="token_mean", tis_cap=2.0)
    lps = [lp.detach().numpy() for lp in torch_seq_logprobs(hf_model, sequences)]
    masks = [(np.arange(1, len(s["tokens"])) >= s["prompt"]) for s in sequences]
    wts = [np.minimum(np.exp(lp + 5.0), 2.0) for lp in lps]
    want = sum((-(s["teacher"] - lp) * w)[mk].sum() for s, lp, w, mk in zip(sequences, lps, wts, masks))
    want /= sum(mk.sum() for mk in masks)
    loss, _ = _opd(params, batch, cfg=CFG, loss_cfg=cfg_tis)
    assert rel_err(loss, want) <= 1e-5


def test_old_policy_behavior_clips_against_the_rollout_policy(hf_model, hf_dir, sequences):
    """old_policy="behavior": ratio pi/pi_b and advantage log p_T - log pi_b, so the clip binds away from pi_b."""
    params, batch = torch_to_params(hf_model, hf_dir + "/weights"), pack(sequences)
    lps = [lp.detach().numpy() for lp in torch_seq_logprobs(hf_model, sequences)]
    # noise std 0.4: some ratios leave [0.8, 1.2]
    behavior = [lp + 4.0 * s["behavior_noise"] for lp, s in zip(lps, sequences)]
    batch = dataclasses.replace(batch, behavior_logprobs=jnp.asarray(pack(sequences, behavior)))
    masks = [(np.arange(1, len(s["tokens"])) >= s["prompt"]) for s in sequences]
    want, n_clipped = 0.0, 0
    for s, lp, b, mk in zip(sequences, lps, behavior, masks):
        r, a = np.exp(lp - b)[mk], (s["teacher"] - b)[mk]
        unclipped, clipped = -r * a, -np.clip(r, 0.8, 1.2) * a
        want += np.maximum(unclipped, clipped).mean() / len(sequences)
        n_clipped += int((clipped > unclipped).sum())
    loss, m = _opd(params, batch, cfg=CFG, loss_cfg=losses.LossConfig(old_policy="behavior"))
    assert n_clipped > 0  # the noise moves ratios outside [0.8, 1.2], so the test exercises the clip
    assert rel_err(loss, want) <= 1e-5
    assert float(m["opd/clip_frac"]) > 0
    # "current" ignores the behaviour column: the loss is the ratio-1 surrogate, -mean(A) with A = teacher - current
    loss_cur, m_cur = _opd(params, batch, cfg=CFG, loss_cfg=losses.LossConfig())
    want_cur = np.mean([-(s["teacher"] - lp)[mk].mean() for s, lp, mk in zip(sequences, lps, masks)])
    assert rel_err(loss_cur, want_cur) <= 1e-5 and float(m_cur["opd/clip_frac"]) == 0.0
    with pytest.raises(ValueError, match="old_policy"):
        losses.LossConfig(old_policy="rollout")


# ---------------------------------------------------------------------------------------------- token_logprobs


def _logprob_inputs(tied: bool):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied, vocab_size=64)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    w = {"embed": jax.random.normal(k1, (64, D))} if tied else {"lm_head": jax.random.normal(k1, (D, 64))}
    hidden = jax.random.normal(k2, (2, 13, D))
    targets = jax.random.randint(k3, (2, 13), 0, 64)
    return cfg, w, hidden, targets


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_logprobs_equal_unchunked(tied):
    cfg, w, hidden, targets = _logprob_inputs(tied)
    cot = jax.random.normal(jax.random.key(4), (2, 13))  # random cotangent: weights every token differently

    def objective(w, h, chunk):
        lp, ent = losses.token_logprobs(w, h, targets, cfg=cfg, chunk_size=chunk, return_entropy=True)
        return jnp.sum(lp * cot) + 0.3 * jnp.sum(ent * cot), (lp, ent)

    grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    ref_g, (ref_lp, ref_ent) = grad(w, hidden, 0)
    # The unchunked path against the textbook formula.
    logits = hidden @ qwen3.lm_head_weight(w, cfg)
    np.testing.assert_allclose(
        ref_lp, jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0], atol=1e-5
    )
    logp64 = np.asarray(logits, np.float64) - np.log(np.exp(np.asarray(logits, np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(ref_ent, -np.sum(np.exp(logp64) * logp64, -1), rtol=1e-5, atol=1e-6)
    for chunk in (1, 4, 5) if not tied else (5,):  # 4 and 5 do not divide T = 13
        g, (lp, ent) = grad(w, hidden, chunk)
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ent, ref_ent, rtol=1e-6, atol=1e-6)
        assert_tree_close(g, ref_g, 1e-6)


def test_token_logprobs_rejects_bad_targets():
    cfg, w, hidden, targets = _logprob_inputs(False)
    with pytest.raises(ValueError, match="targets shape"):
        losses.token_logprobs(w, hidden, targets[:, :5], cfg=cfg)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_logprob_grad_memory_below_one_fp32_logit_buffer(dtype):
    """XLA's memory analysis of value_and_grad for hidden [1, 4096, 1024], V = 151,936 (nothing is allocated)."""
    Tl, Dl, Vl = 4096, 1024, 151_936
    cfg = dataclasses.replace(CFG, hidden_size=Dl, vocab_size=Vl, dtype=dtype)
    limit = Tl * Vl * 4  # one [4096, 151936] fp32 buffer: 2.49 GB

    def temp_bytes(chunk):
        f = lambda w, h, t: jnp.sum(losses.token_logprobs(w, h, t, cfg=cfg, chunk_size=chunk))  # noqa: E731
        args = (
            {"lm_head": jax.ShapeDtypeStruct((Dl, Vl), jnp.float32)},
            jax.ShapeDtypeStruct((1, Tl, Dl), jnp.float32),
            jax.ShapeDtypeStruct((1, Tl), jnp.int32),
        )
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(None)  # the default chunk size
    print(f"{dtype}: temp {chunked / 1e9:.3f} GB (limit {limit / 1e9:.3f} GB)")
    assert chunked < limit
    assert temp_bytes(0) > limit  # the unchunked computation would exceed it: the check can tell them apart


def test_loss_config_validation():
    with pytest.raises(ValueError, match="normalization"):
        losses.LossConfig(normalization="seq_mean")
    with pytest.raises(ValueError, match="tis_cap"):
        losses.LossConfig(tis_cap=0.0)
