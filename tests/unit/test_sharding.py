"""Mesh construction, the logical-axis rule table, and the sharded forward on 8 fake CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import tiny_arch
from jax.sharding import PartitionSpec as P

from lopd_jax.models import qwen3
from lopd_jax.parallel import sharding

DENSE = qwen3.Qwen3Config(**tiny_arch(vocab_size=256, head_dim=16))
MOE = qwen3.Qwen3Config(
    **tiny_arch(vocab_size=256, head_dim=16),
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    mlp_only_layers=(0,),
)


def test_mesh_axes_and_fill():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=-1, expert=1))
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4, "expert": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "cfg",
    [
        sharding.MeshConfig(data=3, fsdp=-1),
        sharding.MeshConfig(fsdp=-1, tensor=-1),
        sharding.MeshConfig(data=2, fsdp=2, tensor=1, expert=1),
    ],
)
def test_mesh_bad_sizes_raise(cfg):
    with pytest.raises(ValueError, match="MeshConfig"):
        sharding.make_mesh(cfg)


def test_param_spec_snapshot_dense_tensor4():
    """Every param's PartitionSpec on fsdp=2 x tensor=4; kv_heads=2 is not divisible by 4 -> replicated."""
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
    specs = sharding.partition_specs(qwen3.param_specs(DENSE), mesh)
    expected = {
        "embed": P("tensor", "fsdp"),
        "layers": {
            "attn_norm": P(None, None),
            "q": P(None, "fsdp", "tensor", None),
            "k": P(None, "fsdp", None, None),
            "v": P(None, "fsdp", None, None),
            "o": P(None, "tensor", None, "fsdp"),
            "q_norm": P(None, None),
            "k_norm": P(None, None),
            "mlp_norm": P(None, None),
        },
        "mlp": {"gate": P(None, "fsdp", "tensor"), "up": P(None, "fsdp", "tensor"), "down": P(None, "tensor", "fsdp")},
        "final_norm": P(None),
        "lm_head": P("fsdp", "tensor"),
    }
    assert specs == expected


def test_param_spec_snapshot_moe_expert4():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4))
    specs = sharding.partition_specs(qwen3.param_specs(MOE), mesh)
    assert specs["moe"] == {
        "router": P(None, "fsdp", None),
        "gate": P(None, "expert", "fsdp", "tensor"),
        "up": P(None, "expert", "fsdp", "tensor"),
        "down": P(None, "expert", "tensor", "fsdp"),
    }
    assert specs["mlp"]["gate"] == P(None, "fsdp", "tensor")  # layer 0 is dense (mlp_only_layers)
    shard = qwen3.param_shardings(MOE, mesh)
    assert jax.tree.structure(shard) == jax.tree.structure(specs)


def test_colliding_rules_raise():
    rules = dict(sharding.DEFAULT_RULES, mlp="fsdp")  # embed and mlp both -> fsdp
    with pytest.raises(sharding.ShardingRuleError, match="'embed' and 'mlp'.*'fsdp'"):
        sharding.logical_to_spec(("layers", "embed", "mlp"), rules)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
    with pytest.raises(sharding.ShardingRuleError):
        qwen3.param_shardings(DENSE, mesh, rules)
    tuple_rules = dict(sharding.DEFAULT_RULES, heads=("tensor", "fsdp"))  # collides with embed via the tuple
    with pytest.raises(sharding.ShardingRuleError, match="fsdp"):
        sharding.logical_to_spec(("embed", "heads"), tuple_rules)


def test_unknown_names_raise():
    with pytest.raises(sharding.ShardingRuleError, match="'nope'"):
        sharding.logical_to_spec(("nope",))
    with pytest.raises(sharding.ShardingRuleError, match="'model'"):
        sharding.logical_to_spec(("embed",), dict(sharding.DEFAULT_RULES, embed="model"))


def test_indivisible_dims_stay_unsharded():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    assert sharding.logical_to_spec(("batch", None), shape=(8, 3), mesh=mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", None), shape=(2, 3), mesh=mesh) == P("data", None)  # prefix kept
    assert sharding.logical_to_spec(("batch", None), shape=(3, 3), mesh=mesh) == P(None, None)
    assert sharding.batch_shard_count(mesh) == 8


def test_mesh_config_rule_overrides():
    cfg = sharding.MeshConfig(tensor=8, fsdp=1, rules=(("embed", None), ("batch", ["data"])))
    rules = cfg.logical_rules()
    assert rules["embed"] is None and rules["batch"] == ("data",) and rules["heads"] == "tensor"


def _forward_available() -> bool:
    return hasattr(qwen3, "forward")


def _init(cfg):
    """Random params straight from the spec table with numpy (eager NNX init costs ~20 s on 8 fake devices)."""
    rng = np.random.default_rng(0)

    def make(spec):
        return (
            np.ones(spec.shape, np.float32)
            if spec.init == "ones"
            else rng.normal(0, 0.2, spec.shape).astype(np.float32)
        )

    return jax.tree.map(make, qwen3.param_specs(cfg), is_leaf=sharding.is_param_spec)


@pytest.mark.slow
@pytest.mark.skipif(not _forward_available(), reason="qwen3.forward / init_params not written yet")
@pytest.mark.parametrize(
    "cfg,mesh_cfg",
    [(DENSE, sharding.MeshConfig(fsdp=2, tensor=4)), (MOE, sharding.MeshConfig(fsdp=2, expert=4))],
    ids=["dense-fsdp2-tensor4", "moe-fsdp2-expert4"],
)
def test_sharded_forward_equals_single_device(cfg, mesh_cfg):
    params = jax.device_put(_init(cfg), jax.devices()[0])
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, cfg.vocab_size)
    ref = np.asarray(jax.jit(lambda p, t: qwen3.forward(p, t, cfg=cfg))(params, tokens))

    mesh = sharding.make_mesh(mesh_cfg)
    sharded = sharding.shard_params(params, qwen3.param_shardings(cfg, mesh))
    # The params really are split: every >1-D weight of the dense/attention/expert blocks is sharded.
    assert sharding.is_sharded(sharded["layers"]["q"]) and sharding.is_sharded(sharded["embed"])
    if cfg.num_experts:
        assert sharded["moe"]["gate"].sharding.spec[1] == "expert" and sharding.is_sharded(sharded["moe"]["gate"])
        assert sharded["moe"]["gate"].addressable_shards[0].data.shape[1] == cfg.num_experts // 4
    toks = jax.device_put(tokens, sharding.batch_sharding(mesh))
    out = jax.jit(lambda p, t: qwen3.forward(p, t, cfg=cfg))(sharded, toks)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(out))) > 1e-3  # a non-trivial output


def test_cache_specs_drive_init_cache_and_the_samplers_cache_sharding():
    """The KV cache is declared once (qwen3.cache_specs): init_cache allocates it and the sampler shards it."""
    from lopd_jax.inference import sampling

    specs = qwen3.cache_specs(DENSE, 4, 24)
    cache = qwen3.init_cache(DENSE, 4, 24)
    want = (DENSE.num_hidden_layers, 4, DENSE.num_key_value_heads, 24, DENSE.head_dim)
    assert cache["k"].shape == cache["v"].shape == specs["k"].shape == want
    assert cache["k"].dtype == jnp.dtype(DENSE.dtype) and cache["lengths"].dtype == jnp.int32
    assert jax.tree.structure(cache) == jax.tree.structure(specs, is_leaf=sharding.is_param_spec)
    assert not np.asarray(cache["k"]).any() and qwen3.init_cache(DENSE, 4, 24, "bfloat16")["v"].dtype == jnp.bfloat16
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    got = sampling._cache_sharding(DENSE, mesh, 4, 24, sharding.DEFAULT_RULES)
    assert got.spec == P(None, ("data", "fsdp"), "tensor", None, None)


def test_abstract_arrays_carry_shape_dtype_and_sharding():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
    cfg = dataclasses.replace(DENSE, param_dtype="bfloat16")
    abstract = sharding.abstract_arrays(qwen3.param_specs(cfg), mesh)
    assert abstract["layers"]["q"].shape == qwen3.param_specs(cfg)["layers"]["q"].shape
    assert abstract["layers"]["q"].dtype == jnp.bfloat16
    assert abstract["embed"].sharding.spec == P("tensor", "fsdp")
    assert sharding.abstract_arrays(qwen3.param_specs(cfg))["embed"].sharding is None


def test_param_spec_rank_must_match_its_axes():
    with pytest.raises(ValueError, match="differ in rank"):
        sharding.ParamSpec((2, 3), ("embed",))
    assert sharding.is_param_spec(sharding.ParamSpec((2,), ("embed",))) and not sharding.is_param_spec((2,))
