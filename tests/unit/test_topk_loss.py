"""The top-k KL objectives against references no one here wrote, and the default objective unchanged.

* K = V (a vocabulary of 24): the bucketed KL has an empty tail, so ``topk_reverse_kl`` / ``topk_forward_kl`` must
  equal the exact full-vocabulary KL(student || teacher) / KL(teacher || student) computed in float64 from
  transformers' logits (its fp32 casts lifted as in test_gradnorm_vs_torch), value and gradient, to 1e-10.
* K < V: the KL over the K ids + the tail bucket, written by hand in float64 torch with the tail as
  log1p(-sum p) (the formula the library avoids), value and gradient, to 1e-10.
* Tails at 0 and 1 (all mass on the ids / none): loss and gradient finite in fp32, the KL >= 0.
* ``sampled_token`` (the default) equals a verbatim copy of the OPD loss as it was before the objectives existed,
  bit for bit (loss, every gradient leaf, every metric).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.models import tiny_arch

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers.reference import as_dtype, float64_reference, hf_named  # noqa: E402

from lopd_jax import losses, update  # noqa: E402
from lopd_jax.data.batch import Batch  # noqa: E402
from lopd_jax.models import qwen3  # noqa: E402

V = 24
CFG = qwen3.Qwen3Config(**tiny_arch(vocab_size=V, hidden_size=32, intermediate_size=64, head_dim=8))
T = 16
# Rows of (input positions n, prompt length p) segments: position t predicts token t + 1, on the loss when
# t + 1 >= p. The rest of a row is padding (segment 0).
ROWS = [[(8, 3), (6, 2)], [(13, 5)], [(5, 5), (9, 1)]]  # (5, 5): a sequence with no response token


def _sequences(k: int, seed: int = 0) -> list[dict]:
    """Per sequence: tokens [n + 1], response mask [n], teacher log-softmax [n, V] (float64, fp32-exact logits),
    bucket ids [n, k] (distinct, random order)."""
    rng = np.random.default_rng(seed)
    out = []
    for row in ROWS:
        for n, p in row:
            z = rng.normal(0, 2.0, (n, V)).astype(np.float32).astype(np.float64)
            logp_t = z - np.log(np.exp(z).sum(-1, keepdims=True))
            ids = np.stack([rng.permutation(V)[:k] for _ in range(n)]).astype(np.int32)
            mask = (np.arange(1, n + 1) >= p).astype(np.float64)
            out.append({"tokens": rng.integers(0, V, n + 1), "mask": mask, "logp_t": logp_t, "ids": ids})
    return out


def _tail64(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    keep = np.ones(logp.shape, bool)
    np.put_along_axis(keep, ids, False, axis=-1)
    with np.errstate(divide="ignore"):
        return np.log(np.where(keep, np.exp(logp), 0.0).sum(-1))  # -inf when the ids cover the vocabulary


def _batch(seqs: list[dict], k: int) -> Batch:
    """The packed float64 Batch with the top-k fields (teacher log-probs at the ids and the tail)."""
    B = len(ROWS)
    f = {n: np.zeros((B, T), np.int32) for n in ("inputs", "targets", "positions", "segment_ids")}
    mask, teacher = np.zeros((B, T)), np.zeros((B, T))
    ids, t_lp, t_tail = np.full((B, T, k), -1, np.int32), np.zeros((B, T, k)), np.zeros((B, T))
    it = iter(seqs)
    for r, row in enumerate(ROWS):
        start = 0
        for s, _ in enumerate(row):
            seq = next(it)
            n = len(seq["mask"])
            sl = slice(start, start + n)
            f["inputs"][r, sl], f["targets"][r, sl] = seq["tokens"][:-1], seq["tokens"][1:]
            f["positions"][r, sl], f["segment_ids"][r, sl] = np.arange(n), s + 1
            on = seq["mask"] > 0
            mask[r, sl] = seq["mask"]
            teacher[r, sl] = np.where(on, seq["logp_t"][np.arange(n), seq["tokens"][1:]], 0.0)
            ids[r, sl] = np.where(on[:, None], seq["ids"], -1)
            t_lp[r, sl] = np.where(on[:, None], np.take_along_axis(seq["logp_t"], seq["ids"], -1), 0.0)
            t_tail[r, sl] = np.where(on, _tail64(seq["logp_t"], seq["ids"]), 0.0)
            start += n
    return Batch(f["inputs"], f["targets"], f["positions"], f["segment_ids"], mask, teacher, teacher, ids, t_lp, t_tail)


def _torch_kl(model, seqs: list[dict], objective: str, normalization: str, bucketed: bool):
    """The reference loss in float64 torch: per token, the full-vocabulary KL (``bucketed`` False) or the KL over
    the ids + a tail bucket with tails log1p(-sum p); normalised per ``normalization``."""
    per_seq = []
    for s in seqs:
        logits = model(input_ids=torch.from_numpy(s["tokens"][None, :-1])).logits[0]
        logq = torch.log_softmax(logits, -1)
        logp = torch.from_numpy(s["logp_t"])
        if bucketed:
            ids = torch.from_numpy(s["ids"]).long()
            q_k, p_k = logq.gather(-1, ids), logp.gather(-1, ids)
            q_tail = torch.log1p(-q_k.exp().sum(-1, keepdim=True))
            p_tail = torch.log1p(-p_k.exp().sum(-1, keepdim=True))
            logq, logp = torch.cat([q_k, q_tail], -1), torch.cat([p_k, p_tail], -1)
        a, b = (logq, logp) if objective == "topk_reverse_kl" else (logp, logq)
        kl = (a.exp() * (a - b)).sum(-1)
        per_seq.append((kl, torch.from_numpy(s["mask"])))
    if normalization == "token_mean":
        return sum((kl * m).sum() for kl, m in per_seq) / sum(m.sum() for _, m in per_seq)
    scored = [(kl, m) for kl, m in per_seq if m.sum() > 0]
    return sum((kl * m).sum() / m.sum() for kl, m in scored) / len(scored)


@pytest.fixture(scope="module")
def model_and_params(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    params = qwen3.init_params(CFG, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)  # peaked: KLs of order 1
    path = qwen3.save_hf(str(tmp_path_factory.mktemp("topk_loss")), CFG, params)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    return float64_reference(model.train()), params


def _trainer_step(params, batch: Batch, cfg, loss_cfg):
    """One step of the trainer's update over ``losses.objective_loss`` with SGD(lr=1): grads = params - new."""
    loss_fn = functools.partial(losses.objective_loss, cfg=cfg, loss_cfg=loss_cfg)
    state = update.init_train_state(jax.tree.map(jnp.array, params), optax.sgd(1.0), jax.random.key(1))
    new, metrics = update.make_update_step(loss_fn, optax.sgd(1.0))(state, batch)
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new.params), metrics


@pytest.mark.parametrize(
    "objective,k,normalization",
    [
        pytest.param("topk_reverse_kl", V, "token_mean", marks=pytest.mark.slow),  # K = V: the exact full KL
        pytest.param("topk_forward_kl", V, "token_mean", marks=pytest.mark.slow),
        ("topk_reverse_kl", 5, "sample_mean"),  # K < V: the bucketed KL by hand
        ("topk_forward_kl", 5, "token_mean"),
    ],
)
def test_topk_objective_equals_the_float64_reference(model_and_params, objective, k, normalization):
    model, params = model_and_params
    seqs = _sequences(k)
    model.zero_grad()
    t_loss = _torch_kl(model, seqs, objective, normalization, bucketed=k < V)
    t_loss.backward()
    t_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    loss_cfg = losses.LossConfig(objective=objective, topk=k, normalization=normalization, logprob_chunk_size=5)
    with jax.enable_x64(True):
        cfg64 = dataclasses.replace(CFG, dtype="float64", param_dtype="float64")
        p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        grads, metrics = _trainer_step(p64, as_dtype(_batch(seqs, k), np.float64), cfg64, loss_cfg)
        loss = float(metrics["train/loss"])
    t_value = float(t_loss.detach())
    assert t_value > 0.05  # a KL far from 0: the comparison is not of two zeros
    assert abs(loss / t_value - 1) < 1e-10, (loss, t_value)
    assert loss == float(metrics["topk/kl"])  # the logged loss IS the KL under the normalisation
    ours = hf_named(grads, CFG)
    errs = {n: np.linalg.norm(ours[n] - t_grads[n]) / np.linalg.norm(t_grads[n]) for n in t_grads}
    assert max(errs.values()) < 1e-10, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
def test_bucket_kl_is_zero_at_equality_and_positive_elsewhere():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (64, V)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(V)[:4] for _ in range(64)]), jnp.int32)
    lq, tq = losses.bucket_logprobs(logits, ids)
    assert float(jnp.max(jnp.abs(losses.bucket_kl(lq, tq, lq, tq)))) == 0.0
    lp, tp = losses.bucket_logprobs(logits + jnp.asarray(rng.normal(0, 1, (64, V)), jnp.float32), ids)
    assert float(jnp.min(losses.bucket_kl(lq, tq, lp, tp))) > 0.0
    assert float(jnp.min(losses.bucket_kl(lp, tp, lq, tq))) > 0.0


@pytest.mark.parametrize("objective", ["topk_reverse_kl", "topk_forward_kl"])
@pytest.mark.parametrize("case", ["student_tail_1", "teacher_tail_0", "k_equals_v"])
def test_tails_at_0_and_1_stay_finite_in_fp32(model_and_params, objective, case):
    """Student tail ~1: the ids get almost none of the student's mass (lm_head rows of the ids pushed to -60).
    Teacher tail 0: all of the teacher's mass on the ids (a tail of e^-200, and an empty tail bucket with K = V)."""
    _, params = model_and_params
    k = V if case == "k_equals_v" else 3
    seqs = _sequences(k, seed=1)
    batch = _batch(seqs, k)
    if case == "teacher_tail_0":
        batch = batch.replace(topk_teacher_tail=np.where(batch.loss_mask > 0, -200.0, 0.0))
    if case == "student_tail_1":  # the same 3 ids everywhere, each with a logit ~60 below the rest
        ids = np.where(batch.loss_mask[..., None] > 0, np.array([0, 1, 2], np.int32), -1)
        batch = batch.replace(topk_ids=ids)
        params = jax.tree.map(lambda x: x, params)
        params["lm_head"] = params["lm_head"].at[:, :3].set(-60.0 * jnp.sign(jnp.mean(params["lm_head"])))
    batch = as_dtype(batch, np.float32)
    loss_cfg = losses.LossConfig(objective=objective, topk=k, normalization="token_mean")
    grads, metrics = _trainer_step(params, batch, CFG, loss_cfg)
    assert np.isfinite(float(metrics["train/loss"])) and float(metrics["topk/kl"]) >= 0.0
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    if case == "k_equals_v":
        assert float(metrics["topk/student_tail"]) == 0.0 and float(metrics["topk/teacher_tail"]) == 0.0


# ------------------------------------------------------------------------------------------------ the default


def _opd_loss_before_objectives(params, batch, *, cfg, loss_cfg, old_logprobs=None):
    """``losses.opd_loss`` verbatim as it was before ``loss.objective`` existed (the reference for bit equality)."""
    P = losses
    logp, ent = P._policy_logprobs(params, batch, cfg, loss_cfg)
    mask = batch.loss_mask.astype(jnp.float32) * (batch.segment_ids > 0)
    if old_logprobs is None and loss_cfg.old_policy == "behavior":
        old_logprobs = jnp.where(mask > 0, batch.behavior_logprobs, 0.0)
    old = jax.lax.stop_gradient(logp if old_logprobs is None else old_logprobs.astype(jnp.float32))
    adv = (batch.teacher_logprobs - old) * mask
    pg, clipped = P.ppo_clip_surrogate(logp, old, adv, loss_cfg.clip_eps_low, loss_cfg.clip_eps_high)
    if loss_cfg.tis_cap is not None:
        pg = pg * jnp.minimum(jnp.exp(old - batch.behavior_logprobs), loss_cfg.tis_cap)
    w, denom, n_seq = P._sequence_weights(batch, loss_cfg.normalization)
    loss = jnp.sum(w * pg) / jnp.maximum(denom, 1.0)
    sg_logp = jax.lax.stop_gradient(logp)
    metrics = {
        "opd/pg_loss": loss,
        "opd/adv_mean": P._masked_mean(adv, mask),
        "opd/adv_std": P._masked_std(adv, mask),
        "opd/teacher_student_gap": P._masked_mean(batch.teacher_logprobs - sg_logp, mask),
        "opd/clip_frac": P._masked_mean(clipped, mask),
        **P.behavior_kl_metrics(sg_logp, batch.behavior_logprobs, mask),
        **P._data_metrics(mask, n_seq, denom),
    }
    if ent is not None:
        metrics["opd/entropy"] = P._masked_mean(jax.lax.stop_gradient(ent), mask)
    return loss, metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_kw",
    [{}, {"old_policy": "behavior", "tis_cap": 2.0, "normalization": "token_mean", "compute_entropy": True}],
)
def test_sampled_token_objective_is_the_previous_opd_loss_bit_for_bit(model_and_params, loss_kw):
    _, params = model_and_params
    seqs = _sequences(1, seed=2)
    batch = as_dtype(_batch(seqs, 1), np.float32)
    rng = np.random.default_rng(5)  # behaviour log-probs off the current policy: the clip and TIS are active
    behavior = np.where(batch.loss_mask > 0, batch.teacher_logprobs + rng.normal(0, 0.3, (len(ROWS), T)), 0.0)
    batch = batch.replace(behavior_logprobs=behavior.astype(np.float32), topk_ids=None)
    batch = batch.replace(topk_teacher_logprobs=None, topk_teacher_tail=None)
    loss_cfg = losses.LossConfig(logprob_chunk_size=5, **loss_kw)
    assert loss_cfg.objective == "sampled_token"  # the default
    new_g, new_m = _trainer_step(params, batch, CFG, loss_cfg)
    old_fn = functools.partial(_opd_loss_before_objectives, cfg=CFG, loss_cfg=loss_cfg)
    state = update.init_train_state(jax.tree.map(jnp.array, params), optax.sgd(1.0), jax.random.key(1))
    old_state, old_m = update.make_update_step(old_fn, optax.sgd(1.0))(state, batch)
    old_g = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, old_state.params)
    assert set(new_m) == set(old_m)
    for name in old_m:
        assert np.array_equal(np.asarray(new_m[name]), np.asarray(old_m[name])), name
    for a, b in zip(jax.tree.leaves(new_g), jax.tree.leaves(old_g)):
        assert np.array_equal(a, b)
    if loss_cfg.old_policy == "behavior":  # against the behaviour log-probs the clipped branch really runs
        assert float(new_m["opd/clip_frac"]) > 0


def test_the_step_lowers_with_the_top_k_batch_and_plan_prints_its_store_cost():
    import types

    from lopd_jax.parallel import sharding
    from lopd_jax.plan import planner as plan
    from lopd_jax.training import step as step_lib

    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    setup = step_lib.StepSetup(CFG, mesh, sharding.DEFAULT_RULES)
    loss_cfg = losses.LossConfig(objective="topk_reverse_kl", topk=4)
    built = step_lib.build(setup, mode="lightning_opd", optimizer=update.OptimizerConfig(), loss=loss_cfg)
    batch = built.abstract_batch(2, 8)
    assert batch.topk_ids.shape == (2, 8, 4) and batch.topk_teacher_tail.shape == (2, 8)
    assert "stablehlo" in built.lower(2, 8).as_text()  # the step traces and lowers with the top-k loss
    cfg = types.SimpleNamespace(loss=loss_cfg, train=types.SimpleNamespace(batch_size=32, seq_len=96))
    (line,) = plan.format_topk_store_cost(cfg)
    assert "52 bytes per token" in line and "3,072 tokens per step" in line  # 12 * 4 + 4 bytes, 32 x 96 tokens
    plain = types.SimpleNamespace(loss=losses.LossConfig(), train=cfg.train)
    assert plan.format_topk_store_cost(plain) == []


@pytest.mark.slow
def test_sampled_token_weight_mixes_the_kl_with_the_sampled_token_loss(model_and_params):
    _, params = model_and_params
    batch = as_dtype(_batch(_sequences(4, seed=3), 4), np.float32)
    kw = dict(objective="topk_forward_kl", topk=4, normalization="token_mean")
    kl, _ = losses.topk_opd_loss(params, batch, cfg=CFG, loss_cfg=losses.LossConfig(**kw))
    pg, _ = losses.opd_loss(params, batch, cfg=CFG, loss_cfg=losses.LossConfig(normalization="token_mean"))
    mixed, m = losses.topk_opd_loss(params, batch, cfg=CFG, loss_cfg=losses.LossConfig(**kw, sampled_token_weight=0.3))
    assert float(mixed) == pytest.approx(0.7 * float(kl) + 0.3 * float(pg), rel=1e-6)
    assert float(m["topk/kl"]) == pytest.approx(float(kl), rel=1e-6) and "opd/pg_loss" in m
    with pytest.raises(ValueError, match="sampled_token_weight must be in"):
        losses.LossConfig(**kw, sampled_token_weight=1.5)
    with pytest.raises(ValueError, match="belong to a topk_"):
        losses.LossConfig(topk=4)
