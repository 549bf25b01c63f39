"""update: AdamW vs torch, schedules, gradient accumulation == big batch, 8-device mesh == 1 device, SFT learns."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers.models import tiny_arch

from lopd_jax import losses, update
from lopd_jax.data.batch import Batch
from lopd_jax.models import qwen3
from lopd_jax.parallel import sharding

CFG = qwen3.Qwen3Config(**tiny_arch(head_dim=16))
T = 16
# Sequence lengths per row: rows hold different numbers of sequences, so micro-batches of a split batch hold
# different sequence (and token) counts and a plain mean over micro-batches would be wrong.
ROWS = [[15], [5, 4, 6], [8, 7], [16], [3, 3, 3, 3], [10], [6, 9], [12, 4]]


def make_batch(rows=ROWS, seed=0) -> Batch:
    """Packed batch: each sequence has a 2-token prompt; teacher log-probs random in (-6, -0.5)."""
    rng = np.random.default_rng(seed)
    B = len(rows)
    f = {k: np.zeros((B, T), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    mask, teacher = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
    for r, lengths in enumerate(rows):
        t0 = 0
        for seg, n in enumerate(lengths, start=1):
            sl = slice(t0, t0 + n)
            f["inputs"][r, sl] = rng.integers(0, CFG.vocab_size, n)
            f["targets"][r, sl] = rng.integers(0, CFG.vocab_size, n)
            f["positions"][r, sl], f["segment_ids"][r, sl] = np.arange(n), seg
            mask[r, sl] = np.arange(n) >= 1
            t0 += n
    teacher = np.where(mask > 0, rng.uniform(-6, -0.5, (B, T)), 0).astype(np.float32)
    return Batch(**f, loss_mask=mask, teacher_logprobs=teacher, behavior_logprobs=teacher * 0)


@functools.cache
def init_params():
    return qwen3.init_params(CFG, jax.random.key(0))


def fresh_state(optimizer, params=None) -> update.TrainState:
    # A new copy each time: the step donates its input state.
    params = jax.tree.map(jnp.array, init_params() if params is None else params)
    return update.init_train_state(params, optimizer, jax.random.key(1))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------- optimizer


def test_adamw_with_clipping_matches_torch():
    """3 steps of our optimizer == torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW (decoupled decay)."""
    ocfg = update.OptimizerConfig(lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    grads = [{k: (s * rng.normal(size=v.shape)).astype(np.float32) for k, v in p0.items()} for s in (3.0, 0.1, 2.0)]

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.AdamW(tp.values(), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(tp.values(), 1.0)
        topt.step()

    opt = update.make_optimizer(ocfg)
    params = jax.tree.map(jnp.asarray, p0)
    state = opt.init(params)
    for g in grads:
        upd, state = opt.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, upd)
    for k in p0:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules_follow_their_formulas():
    lr, W, S = 1e-3, 10, 110
    wc = update.make_schedule(update.OptimizerConfig(lr=lr, schedule="warmup_cosine", warmup_steps=W, total_steps=S))
    for s in (0, 5, 10, 60, 110):
        want = lr * s / W if s < W else lr * 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W)))
        assert float(wc(s)) == pytest.approx(want, rel=1e-5, abs=1e-12)
    const = update.make_schedule(update.OptimizerConfig())
    assert float(const(0)) == float(const(1000)) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="total_steps"):
        update.OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="optimizer.schedule"):
        update.OptimizerConfig(schedule="linear")


# ---------------------------------------------------------------------------------------------- the step


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 rows == one batch of 8 under sample_mean, whose denominator (sequences) differs
    between micro-batches (rows i and i + 4: 5, 4, 4 and 3 sequences). SGD(lr=1) makes the param delta the
    gradient itself (Adam would hide a wrong scale behind its per-element normalisation).

    An identity, so it is asserted in float64 (x64, params and compute dtype float64): both sides sum the same
    terms in another order, and in fp32 that reordering alone moves the result by ~1e-5 relative, by an amount
    that differs between Intel and AMD CPUs. In float64 it is ~1e-14 (measured 1.1e-14), so 1e-10 leaves a margin
    of 10^4 while a wrong weighting of the micro-batches (e.g. a plain mean: 25% off here) still fails by 10^9.
    """
    k = 4
    with jax.enable_x64(True):
        cfg64 = dataclasses.replace(CFG, dtype="float64", param_dtype="float64")
        loss_fn = functools.partial(losses.opd_loss, cfg=cfg64, loss_cfg=losses.LossConfig())
        b32 = make_batch()
        batch = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, b32)
        p0 = qwen3.init_params(cfg64, jax.random.key(0))
        assert p0["layers"]["q"].dtype == jnp.float64
        sgd = optax.sgd(1.0)

        def fresh():
            return update.init_train_state(jax.tree.map(jnp.array, p0), sgd, jax.random.key(1))

        big, big_m = update.make_update_step(loss_fn, sgd)(fresh(), batch)
        acc, acc_m = update.make_update_step(loss_fn, sgd, grad_accum=k)(fresh(), batch)
        delta = lambda s: jax.tree.map(lambda a, b: a - b, s.params, p0)  # noqa: E731
        errs = jax.tree.map(rel_err, delta(acc), delta(big))
        assert jax.tree.leaves(delta(big))[0].dtype == jnp.float64
    assert max(jax.tree.leaves(errs)) < 1e-10, errs
    assert rel_err(acc_m["train/loss"], big_m["train/loss"]) < 1e-10
    assert rel_err(acc_m["train/grad_norm"], big_m["train/grad_norm"]) < 1e-10
    assert float(acc_m["data/sequences"]) == float(big_m["data/sequences"]) == sum(map(len, ROWS))
    assert float(acc_m["data/tokens"]) == float(big_m["data/tokens"]) == float(np.sum(batch.loss_mask))
    assert float(big_m["train/grad_norm"]) > 0


@pytest.mark.slow
def test_step_on_8_device_mesh_equals_one_device():
    """fsdp=4 x tensor=2, with grad_accum=2, vs a single device without accumulation: same params after 3 steps."""
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    loss_fn = functools.partial(losses.opd_loss, cfg=CFG, loss_cfg=losses.LossConfig())
    opt = update.make_optimizer(update.OptimizerConfig(lr=1e-3))
    batch = make_batch()

    single = fresh_state(opt)
    step1 = update.make_update_step(loss_fn, opt)
    p_sh = qwen3.param_shardings(CFG, mesh)
    sharded = fresh_state(opt, jax.device_put(init_params(), p_sh))
    st_sh = update.state_shardings(sharded, mesh, cfg=CFG)
    b_sh = sharding.batch_sharding(mesh)
    step8 = update.make_update_step(loss_fn, opt, grad_accum=2, mesh=mesh, state_shardings=st_sh, batch_sharding=b_sh)
    sharded = jax.device_put(sharded, st_sh)
    batch8 = jax.device_put(batch, b_sh)
    for _ in range(3):
        single, m1 = step1(single, batch)
        sharded, m8 = step8(sharded, batch8)
        assert rel_err(m8["train/loss"], m1["train/loss"]) < 1e-5

    q = sharded.params["layers"]["q"]
    assert q.sharding.spec == p_sh["layers"]["q"].spec and not q.sharding.is_fully_replicated
    mu = sharded.opt_state[1].inner_state[0].mu["layers"]["q"]  # Adam's first moment follows the params
    assert mu.sharding.spec == q.sharding.spec
    assert int(sharded.step) == 3
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), single.params, init_params())
    assert min(jax.tree.leaves(moved)) > 1e-4  # every leaf was updated (Adam steps ~ lr)
    # Compare each leaf's total update: the reduction order differs (shards, micro-batches), and Adam divides
    # every element by its own gradient scale, which turns fp32 rounding on near-zero gradient elements into
    # ~1e-5 relative differences (measured: <= 1.6e-5). A wrong shard or normalisation is O(1).
    delta = lambda s: jax.tree.map(lambda a, b: a - b, s.params, init_params())  # noqa: E731
    errs = jax.tree.map(rel_err, delta(sharded), delta(single))
    assert max(jax.tree.leaves(errs)) < 1e-4, errs


def test_sft_steps_drive_the_loss_down_and_donate_state():
    loss_fn = functools.partial(losses.sft_loss, cfg=CFG, loss_cfg=losses.LossConfig())
    opt = update.make_optimizer(update.OptimizerConfig(lr=1e-2))
    step = update.make_update_step(loss_fn, opt)
    state, batch = fresh_state(opt), make_batch()
    history = []
    for i in range(6):
        old = state
        state, m = step(state, batch)
        assert old.params["embed"].is_deleted()  # donated: no second copy of params/opt state
        assert int(state.step) == i + 1
        assert float(m["train/lr"]) == pytest.approx(1e-2)
        history.append(float(m["train/loss"]))
    print("sft loss per step:", [round(x, 4) for x in history])
    assert history[0] == pytest.approx(math.log(CFG.vocab_size), abs=0.05)  # random init ~ uniform
    assert all(b < a for a, b in zip(history, history[1:]))
    assert history[-1] < history[0] - 1.0


def test_bf16_moments_are_stored_in_bf16_and_follow_the_fp32_optimizer():
    """moments_dtype=bfloat16 keeps mu/nu in bf16 between steps (half the memory) while the lr stays fp32; the
    params then track the fp32-moment optimizer to bf16 rounding of the moments (rel ~1e-2 of one update)."""
    cfg32 = update.OptimizerConfig(lr=1e-2, weight_decay=0.1)
    cfg16 = update.OptimizerConfig(lr=1e-2, weight_decay=0.1, moments_dtype="bfloat16")
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)}
    opt32, opt16 = update.make_optimizer(cfg32), update.make_optimizer(cfg16)
    s32, s16 = opt32.init(params), opt16.init(params)
    p32 = p16 = params
    for i in range(5):
        g = {"w": jnp.asarray(np.random.default_rng(i + 1).normal(size=(64, 32)), jnp.float32)}
        u32, s32 = opt32.update(g, s32, p32)
        u16, s16 = opt16.update(g, s16, p16)
        p32, p16 = optax.apply_updates(p32, u32), optax.apply_updates(p16, u16)
    dtypes = {x.dtype for x in jax.tree.leaves(s16) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(s16) if not x.ndim and jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)
    }
    moved = float(jnp.max(jnp.abs(p32["w"] - params["w"])))
    diff = float(jnp.max(jnp.abs(p16["w"] - p32["w"])))
    assert 0 < diff < 0.02 * moved
    with pytest.raises(ValueError, match="moments_dtype"):
        update.OptimizerConfig(moments_dtype="float16")
