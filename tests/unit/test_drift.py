"""Drift estimators: importance-weight ESS and the behaviour KL estimators against float64 references, and the
direct KL(pi_student || pi_ref) estimate against the exact KL of a tiny model enumerated over every response."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from helpers.models import tiny_arch

from lopd_jax import losses
from lopd_jax.models import qwen3
from lopd_jax.training import drift


def _np_reference(logp, behavior, mask):
    """The estimators written out in float64 from their definitions (w = pi / pi_b on tokens sampled from pi_b)."""
    on = mask > 0
    lw = (logp.astype(np.float64) - behavior.astype(np.float64))[on]
    w = np.exp(lw)
    return {
        "opd/kl_behavior_k1": np.mean(-lw),
        "opd/kl_behavior_k3": np.mean(w - 1 - lw),
        "opd/kl_behavior_rev_k1": np.mean(w * lw),
        "opd/kl_behavior_rev_k3": np.mean(1 - w + w * lw),
        "opd/iw_mean": np.mean(w),
        "opd/iw_max": np.max(w),
        "opd/iw_ess": np.sum(w) ** 2 / (len(w) * np.sum(w**2)),
    }


def test_behavior_estimators_and_ess_match_float64_reference():
    rng = np.random.default_rng(0)
    logp = rng.normal(-2.0, 0.7, (3, 6)).astype(np.float32)
    behavior = (logp + rng.normal(0.0, 0.4, (3, 6))).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    got = jax.device_get(losses.behavior_kl_metrics(logp, behavior, mask))
    want = _np_reference(logp, behavior, mask)
    for key, value in want.items():
        # fp32 inputs are exact; each of the <= 18 terms carries a relative rounding of ~1 ulp (6e-8): 1e-5 is 100x
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_ess_limits():
    mask = np.ones((2, 4), np.float32)
    assert float(losses.importance_ess(np.zeros((2, 4), np.float32), mask)) == pytest.approx(1.0, abs=1e-6)
    one_heavy = np.full((2, 4), -60.0, np.float32)
    one_heavy[1, 2] = 50.0  # w = e^50: w^2 overflows fp32, the log-space form does not
    assert float(losses.importance_ess(one_heavy, mask)) == pytest.approx(1 / 8, rel=1e-5)
    assert float(losses.importance_ess(one_heavy, np.zeros_like(mask))) == 1.0


def test_sequence_kl_terms_float64():
    lp_s = np.array([[-1.0, -0.5, 0.0], [-2.0, -0.1, -0.3]])
    lp_r = np.array([[-1.5, -0.2, 0.0], [-1.0, -0.4, -9.0]])
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    k1, k3 = drift.sequence_kl_terms(lp_s, lp_r, mask)
    np.testing.assert_allclose(k1, [0.5 - 0.3, 0.3 + 8.7])
    r = np.exp([-0.5, 0.3, -0.3, -8.7])
    np.testing.assert_allclose(k3, [r[0] - 1 + 0.5 + r[1] - 1 - 0.3, r[2] - 1 + 0.3 + r[3] - 1 + 8.7])


@pytest.mark.slow
def test_direct_ref_kl_matches_exact_enumeration():
    """KL(pi_s || pi_ref) over every response of 3 tokens from a 6-token vocabulary (216 sequences), exactly, vs
    the estimate from 2000 student samples: within 4.5 standard errors (the estimate is a mean of i.i.d. terms)."""
    cfg = qwen3.Qwen3Config(**tiny_arch(vocab_size=6, tie_word_embeddings=False))
    ref = qwen3.init_params(cfg, jax.random.key(0))
    student = jax.tree.map(
        lambda x, k: x + 0.1 * jax.random.normal(k, x.shape, x.dtype),
        ref,
        jax.tree.unflatten(
            jax.tree.structure(ref), list(jax.random.split(jax.random.key(1), len(jax.tree.leaves(ref))))
        ),
    )
    prompt, L = [1, 4], 3
    est = drift.RefKL(
        ref_params=ref,
        model_cfg=cfg,
        prompts=[prompt],
        samples=2000,
        max_new_tokens=L,
        stop_ids=(),
        seed=0,
        mesh=None,
        batch_size=1000,
        seq_len=len(prompt) + L,
    )
    k1, k3, toks = est.terms(student, step=7)
    assert len(k1) == 2000 and np.all(toks == L)

    from lopd_jax.inference.sampling import SampleOutput
    from lopd_jax.training.online_opd import samples_to_batch

    seqs = [np.array(s, np.int32) for s in itertools.product(range(cfg.vocab_size), repeat=L)]
    outs = [SampleOutput(s, np.zeros(L, np.float32), "length") for s in seqs]
    batch, _ = samples_to_batch([prompt] * len(seqs), outs, seq_len=len(prompt) + L)
    on = batch.loss_mask > 0
    lp_s = np.where(on, np.asarray(est.score(student, batch), np.float64), 0).sum(1)
    lp_r = np.where(on, np.asarray(est.score(ref, batch), np.float64), 0).sum(1)
    assert np.exp(lp_s).sum() == pytest.approx(1.0, abs=1e-5)  # the enumeration covers every response
    exact = float(np.sum(np.exp(lp_s) * (lp_s - lp_r)))
    assert exact > 0.01  # a KL the test can tell from 0
    for terms in (k1, k3):
        stderr = terms.std(ddof=1) / np.sqrt(len(terms))
        assert abs(terms.mean() - exact) < 4.5 * stderr, (terms.mean(), exact, stderr)
    summary = drift.ref_kl_summary(k1, k3, toks)
    assert summary["drift/kl_ref_k3"] == pytest.approx(k3.mean())
