"""Behaviour top-k and teacher scores of it, end to end on tiny random Qwen3s (JAX engine), against transformers.

``precompute.rollouts --record-topk K`` must store the raw policy's top-K at every response token (whatever the
sampling temperature / top-p), ``precompute.teacher_logprobs`` log p_T at those ids and the tail log(1 - mass) per
token, computed in float64 from transformers' logits here; ``--top-k`` adds the teacher's own tail. vLLM is refused
on such a store before anything is written.
"""

import numpy as np
import pytest
import torch
from helpers.precompute import build_model, run_rollouts

from lopd_jax.store import RolloutStore
from precompute import teacher_logprobs
from precompute.engines import vllm_engine
from precompute.validate import validate

K = 5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("topk")
    policy, teacher = root / "policy", root / "teacher"
    models = {"policy_model": build_model(policy, 0, eos_bias=0.17), "teacher_model": build_model(teacher, 1)}
    rows = [{"prompt": f"Add: {i}+{i * 7}", "answer": str(8 * i)} for i in range(3)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"root": root, "policy": policy, "teacher": teacher, "prompts": prompts, **models}
    sampled = ("--temperature", "0.7", "--top-p", "0.9", "--n", "2", "--batch-size", "2")
    assert run_rollouts(env, "rollouts", *sampled, "--record-topk", str(K)) == 0
    argv = ["--teacher", str(teacher), "--store", str(root / "rollouts"), "--out", str(root / "scored")]
    assert teacher_logprobs.main(argv + ["--top-k", "3"]) == 0
    return env


def _logp64(model, tokens: np.ndarray) -> np.ndarray:
    """[L - 1, V] float64 log-softmax of transformers' logits: row j is the distribution of token j + 1."""
    with torch.no_grad():
        logits = model.double()(torch.tensor(tokens[None], dtype=torch.long)).logits[0, :-1]
    model.float()
    return torch.log_softmax(logits, -1).numpy()


def _tail64(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log(1 - sum of p at ids) per row, as the float64 logsumexp of the rows' other entries."""
    keep = np.ones(logp.shape, bool)
    np.put_along_axis(keep, ids, False, axis=-1)
    rest = np.where(keep, logp, -np.inf)
    m = rest.max(-1, keepdims=True)
    return (m + np.log(np.exp(rest - m).sum(-1, keepdims=True)))[:, 0]


def test_rollouts_record_the_raw_policy_top_k(env):
    store = RolloutStore(env["root"] / "rollouts")
    assert store.behavior_topk == K and store.manifest["sampling"]["record_topk"] == K
    assert store.manifest["engine"]["behavior_topk"]["distribution"] == "raw_logprobs"
    for i in range(len(store)):
        s = store.sample(i)
        p = s["prompt_length"]
        ids, lps = s["behavior_topk_ids"], s["behavior_topk_logprobs"]
        assert (ids[:p] == -1).all() and np.isnan(lps[:p]).all()
        ref = _logp64(env["policy_model"], s["tokens"])[p - 1 :]  # temperature 1, no top-p: the raw model
        ref_ids = np.argsort(-ref, axis=-1)[:, :K]
        np.testing.assert_array_equal(ids[p:], ref_ids)  # peaked random model: no near-ties in the top 5
        np.testing.assert_allclose(lps[p:], np.take_along_axis(ref, ref_ids, -1), atol=2e-5)
        # the sampled token's recorded log-prob is the same distribution's
        np.testing.assert_allclose(s["behavior_logprobs"][p:], ref[np.arange(len(ref)), s["tokens"][p:]], atol=2e-5)


def test_teacher_scores_the_behaviour_top_k_and_both_tails(env):
    store = RolloutStore(env["root"] / "scored")
    m = store.manifest
    assert store.behavior_topk == K and store.topk == 3 and m["topk_tail"]
    assert m["teacher_topk_scores"]["behavior_topk"]["k"] == K and m["teacher_topk_scores"]["teacher_topk"]["k"] == 3
    for i in range(len(store)):
        s = store.sample(i)
        p = s["prompt_length"]
        ref = _logp64(env["teacher_model"], s["tokens"])[p - 1 :]
        ids = s["behavior_topk_ids"][p:]
        got = s["teacher_behavior_topk_logprobs"][p:]
        np.testing.assert_allclose(got, np.take_along_axis(ref, ids, -1), atol=2e-5)
        tail = s["teacher_behavior_topk_tail"][p:]
        np.testing.assert_allclose(tail, _tail64(ref, ids), atol=2e-5)
        np.testing.assert_allclose(s["teacher_topk_tail"][p:], _tail64(ref, s["teacher_topk_ids"][p:]), atol=2e-5)
        assert np.isnan(s["teacher_behavior_topk_tail"][:p]).all()
        # the K + 1 buckets hold all the mass
        total = np.exp(got.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
    summary = validate(str(env["root"] / "scored"))
    assert summary["behavior_topk"] == K


def test_tail_of_a_tiny_mass_is_exact_where_one_minus_sum_is_not():
    """A tail of 1e-30 (all but 1e-30 of the mass on the ids): the log-space tail is exact, 1 - sum would be 0."""
    import jax.numpy as jnp

    from lopd_jax import losses

    logits = np.array([[0.0, 0.0, -69.0776]], np.float32)  # p(2) = e^-69.08 / (2 + ...) ~ 5e-31
    lp, tail = losses.bucket_logprobs(jnp.asarray(logits), jnp.asarray([[0, 1]], jnp.int32))
    ref = -69.0776 - np.log(2.0)
    np.testing.assert_allclose(float(tail[0]), ref, rtol=1e-6)
    assert np.isfinite(lp).all()
    # all ids: an empty tail bucket is -inf, never NaN; no ids: the tail holds everything (log 1 = 0)
    _, full = losses.bucket_logprobs(jnp.asarray(logits), jnp.asarray([[0, 1, 2]], jnp.int32))
    _, none = losses.bucket_logprobs(jnp.asarray(logits), jnp.asarray([[-1, -1]], jnp.int32))
    assert float(full[0]) == -np.inf and float(none[0]) == 0.0


def test_vllm_is_refused_on_a_store_that_needs_arbitrary_ids(env, capsys):
    out = env["root"] / "vllm_out"
    argv = ["--teacher", str(env["teacher"]), "--store", str(env["root"] / "rollouts"), "--out", str(out)]
    assert teacher_logprobs.main(argv + ["--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine jax" in err[0] and "behavior_topk 5" in err[0]
    assert not out.exists()


def test_vllm_tail_from_top_k_logprobs():
    lps = np.log(np.array([[0.5, 0.25], [0.6, 0.4 - 1e-12], [np.nan, np.nan]]))
    tail = vllm_engine.topk_tail(lps)
    np.testing.assert_allclose(tail[0], np.log(0.25), rtol=1e-6)
    assert tail[1] < -20 or tail[1] == -np.inf  # below fp32 resolution of the top-k: -inf, not NaN
    assert np.isnan(tail[2])


# ------------------------------------------------------------------------------------------------ training


def _train_cfg(env, tmp_path, objective: str, k: int, store: str = "scored", **loss):
    import yaml

    cfg = {
        "mode": "lightning_opd",
        "allow_teacher_inconsistency": True,  # the tiny policy is no SFT student of this teacher
        "model": {"init": str(env["policy"])},
        "data": {"store": str(env["root"] / store), "seed": 1, "pack": False},
        "train": {"steps": 2, "batch_size": 8, "seq_len": 64, "seed": 0},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "loss": {"objective": objective, "topk": k, "normalization": "token_mean", "old_policy": "current", **loss},
        "checkpoint": {"every_steps": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "plots": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("objective,k", [("topk_reverse_kl", K), ("topk_forward_kl", 3)])
def test_topk_objectives_train_from_the_store_and_log_the_kl_as_the_loss(env, tmp_path, objective, k):
    from lopd_jax import train
    from lopd_jax.training.metrics import read_metrics

    assert train.main(["--config", str(_train_cfg(env, tmp_path, objective, k))]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2
    for r in records:
        assert r["train/loss"] == pytest.approx(r["topk/kl"], rel=1e-6) and r["topk/kl"] > 0
        assert 0 < r["topk/student_tail"] < 1 and 0 < r["topk/teacher_tail"] < 1


@pytest.mark.parametrize(
    "objective,k,store,want",
    [
        ("topk_reverse_kl", K, "rollouts_plain", ["no behavior_topk_ids column", "--record-topk 5", "--engine jax"]),
        ("topk_forward_kl", 3, "rollouts_plain", ["has no teacher_topk_ids column", "--top-k 3", "--engine jax"]),
        ("topk_reverse_kl", 4, "scored", ["behavior_topk 5", "loss.topk is 4"]),
        ("topk_forward_kl", 4, "scored", ["topk 3", "loss.topk is 4"]),
        ("topk_reverse_kl", 500, "scored", ["loss.topk 500 > the model's vocabulary (128"]),
        ("topk_reverse_kl", 0, "scored", ["loss.topk must be >= 1"]),
    ],
)
def test_topk_objective_bad_input_is_one_line_before_any_step(env, tmp_path, capsys, objective, k, store, want):
    from lopd_jax import train

    if store == "rollouts_plain" and not (env["root"] / store).exists():
        assert run_rollouts(env, "plain_rollouts", "--n", "1", "--temperature", "0") == 0
        argv = ["--teacher", str(env["teacher"]), "--store", str(env["root"] / "plain_rollouts")]
        assert teacher_logprobs.main(argv + ["--out", str(env["root"] / store)]) == 0
        capsys.readouterr()  # the tools' progress output
    rc = train.main(["--config", str(_train_cfg(env, tmp_path, objective, k, store))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert all(w in err[0] for w in want), err[0]
    if store == "rollouts_plain":
        assert str(env["root"] / store) in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
