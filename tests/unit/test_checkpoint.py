"""Orbax round trip of a sharded TrainState-like pytree plus the Grain iterator state; keep-last-K; resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from lopd_jax.data.loader import DataConfig, make_iterator
from lopd_jax.training.checkpoint import CheckpointConfig, Checkpointer


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


class ListStore:
    """In-memory RolloutStore stand-in: len / sample(i)."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self._s = []
        for i in range(n):
            L, p = int(rng.integers(4, 20)), 2
            lp = np.full(L, -0.5, np.float32)
            lp[:p] = np.nan
            self._s.append(
                {
                    "tokens": np.arange(L, dtype=np.int32) + 100 * i,
                    "prompt_length": p,
                    "teacher_logprobs": lp,
                    "behavior_logprobs": lp,
                }
            )

    def __len__(self):
        return len(self._s)

    def sample(self, i):
        return self._s[i]


def make_state(seed):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shard = {"w": NamedSharding(mesh, PartitionSpec("fsdp", "data")), "b": NamedSharding(mesh, PartitionSpec())}
    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, (16, 8)), "b": jnp.arange(8.0) + seed}
    params = jax.tree.map(jax.device_put, params, shard)
    opt = optax.adamw(1e-2)
    opt_state = jax.jit(opt.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments
    return State(jnp.int32(seed), params, opt_state, jax.random.key(seed + 1))


def data_iter():
    cfg = DataConfig(store="mem", batch_size=2, seq_len=24, seed=1, read_threads=1)
    return make_iterator(cfg, 0, 1, store=ListStore(30))


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.mark.slow
def test_round_trip_sharded_state_and_data_iterator(tmp_path):
    state, it = make_state(5), data_iter()
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=5, keep=2)) as ck:
        assert not ck.save(3, state, it)  # not a save step
        assert ck.save(5, state, it)
    want = [next(it) for _ in range(4)]

    other, it2 = make_state(9), data_iter()
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=5, keep=2)) as ck:
        restored, step = ck.restore_latest(abstract(other), it2)
    assert step == 5
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        else:
            assert b.sharding.is_equivalent_to(a.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(restored.params["w"].addressable_shards) == 8
    got = [next(it2) for _ in range(4)]  # the data iterator continues exactly where the saved one stood
    for a, b in zip(want, got):
        for f in vars(a):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_keeps_last_k_and_restores_newest(tmp_path):
    it = data_iter()
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep=2, async_save=False)) as ck:
        assert ck.restore_latest(abstract(make_state(0)), it) is None
        for step in (1, 2, 3):
            next(it)
            ck.save(step, make_state(step), it)
        assert not ck.save(3, make_state(3), it, force=True)  # already saved: a final forced save is a no-op
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
    with Checkpointer(tmp_path, CheckpointConfig(keep=2)) as ck:
        restored, step = ck.restore_latest(abstract(make_state(0)))
    assert step == 3 and int(restored.step) == 3
    np.testing.assert_array_equal(restored.params["b"], np.arange(8.0) + 3)


def test_restore_without_data_state_is_an_error(tmp_path):
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ck:
        ck.save(1, make_state(1))
    with Checkpointer(tmp_path, CheckpointConfig()) as ck, pytest.raises(ValueError, match="no data-iterator state"):
        ck.restore_latest(abstract(make_state(0)), data_iter())
