"""Expert parallelism on 8 fake CPU devices: the trainer's update step with experts split over the expert axis
equals the single-device step, no assignment is dropped under the most skewed routing, and a mesh.expert that does
not divide the expert count is refused before anything compiles.

XLA:CPU runs the dense (worst-case all_to_all) dispatch; ``ragged_all_to_all`` is what GPU and TPU compile (XLA:CPU
does not implement it), and the plan tests compile it for TPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from helpers.models import tiny_arch
from jax.sharding import NamedSharding

from lopd_jax import train, update
from lopd_jax.models import expert_parallel, qwen3
from lopd_jax.parallel import sharding

MOE = qwen3.Qwen3Config(
    **tiny_arch(vocab_size=256, head_dim=16),
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    mlp_only_layers=(0,),
)
MOE64 = dataclasses.replace(MOE, dtype="float64", param_dtype="float64")


def _token_loss(params, tokens, cfg):
    """Next-token cross entropy over a [B, T] batch (the step's loss_fn contract: (loss, metrics))."""
    logits = qwen3.forward(params, tokens[:, :-1], cfg=cfg).astype(
        jnp.float32 if cfg.dtype == "float32" else jnp.float64
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), {}


def _sgd_step(cfg, params, tokens, mesh_cfg=None):
    """(loss, param delta = -gradient, compiled HLO) of one SGD(lr=1) update step, on ``mesh_cfg``'s mesh when
    given (the step runs under the mesh, as the trainer's, so the MoE block takes the expert-parallel path)."""
    loss_fn = functools.partial(_token_loss, cfg=cfg)
    sgd = optax.sgd(1.0)
    state = update.init_train_state(jax.tree.map(jnp.copy, params), sgd, jax.random.key(0))  # the step donates it
    if mesh_cfg is None:
        step = update.make_update_step(loss_fn, sgd)
        new, metrics = step(state, tokens)
        return metrics["train/loss"], jax.tree.map(lambda a, b: a - b, new.params, params), ""
    mesh = sharding.make_mesh(mesh_cfg)
    rules = mesh_cfg.logical_rules()
    param_sh = qwen3.param_shardings(cfg, mesh, rules)
    state_sh = update.state_shardings(state, mesh, param_shardings=param_sh)
    batch_sh = sharding.batch_sharding(mesh, 2, rules)
    step = update.make_update_step(loss_fn, sgd, mesh=mesh, state_shardings=state_sh, batch_sharding=batch_sh)
    state, tokens = jax.device_put(state, state_sh), jax.device_put(tokens, batch_sh)
    assert state.params["moe"]["gate"].addressable_shards[0].data.shape[1] == cfg.num_experts // mesh_cfg.expert
    text = step.lower(state, tokens).compile().as_text()
    new, metrics = step(state, tokens)
    return metrics["train/loss"], jax.tree.map(lambda a, b: a - b, new.params, params), text


@pytest.mark.parametrize(
    "mesh_cfg",
    [sharding.MeshConfig(fsdp=2, expert=4), sharding.MeshConfig(fsdp=1, expert=8)],
    ids=["fsdp2-expert4", "expert8"],
)
def test_expert_parallel_step_equals_single_device(mesh_cfg):
    """Loss and every gradient of the EP step equal the single-device step's.

    An identity of two programs that add the same products in other orders (per-device partial sums, the
    all-reduce of the gradients), so it is asserted in float64: reordering n terms moves a sum by at most
    n * 2^-53 * sum|terms|, with n < 10^3 here, i.e. < 1e-12 of the terms' scale; 1e-10 relative to each leaf's
    largest entry leaves a margin of 10^2, while one dropped or misrouted assignment moves the expert gradients
    by O(1) relative.
    """
    with jax.enable_x64(True):
        params = qwen3.init_params(MOE64, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, MOE64.vocab_size)
        ref_loss, ref_delta, _ = _sgd_step(MOE64, params, tokens)
        loss, delta, text = _sgd_step(MOE64, params, tokens, mesh_cfg)
        assert "all-to-all(" in text  # the expert-parallel dispatch ran (no all-to-all in the FSDP-only step)
        assert abs(float(loss) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss))
        for path, want in jax.tree_util.tree_leaves_with_path(ref_delta):
            got = np.asarray(functools.reduce(lambda t, k: t[k.key], path, delta))
            scale = float(np.max(np.abs(want)))
            assert scale > 0, path
            np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-10 * scale, err_msg=str(path))


def _reference_moe(x_XD, weights_XR, experts_XR, gate, up, down):
    """Each (token, expert) assignment computed on its own with that expert's weights: no grouping, no dispatch."""
    g_XRDF, u_XRDF, d_XRFD = gate[experts_XR], up[experts_XR], down[experts_XR]
    h_XRF = jax.nn.silu(jnp.einsum("XD,XRDF->XRF", x_XD, g_XRDF)) * jnp.einsum("XD,XRDF->XRF", x_XD, u_XRDF)
    return jnp.einsum("XRF,XRFD,XR->XD", h_XRF, d_XRFD, weights_XR)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all`` from all-gathers (XLA:CPU lacks the op), as its docstring defines it: source
    s's rows [input_offsets_s[d], + send_sizes_s[d]) land in device d's output at output_offsets_s[d]."""
    me = jax.lax.axis_index(axis_name)
    ops, starts, sizes, lands = (
        jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)
    )
    rows = jnp.arange(output.shape[0])
    for s in range(ops.shape[0]):
        inside = (rows >= lands[s, me]) & (rows < lands[s, me] + sizes[s, me])
        src = jnp.clip(rows - lands[s, me] + starts[s, me], 0, operand.shape[0] - 1)
        output = jnp.where(inside[:, None], ops[s][src], output)
    return output


@pytest.mark.parametrize("dispatch", ["dense", "ragged"])
@pytest.mark.parametrize("routing", ["one-expert", "one-device", "random"])
def test_no_assignment_is_dropped_under_skewed_routing(routing, dispatch, monkeypatch):
    """Every token of all 8 devices routed to expert 0 (R = 1), or to experts 0 and 1 (R = 2: both on device 0
    of an expert axis of 4, which then receives N * A rows, the whole worst-case buffer): the EP block's output
    and its gradients equal the per-assignment reference for every token, so none was dropped or capped.

    "ragged" runs the GPU / TPU dispatch's offsets and sizes through an emulated ragged all-to-all."""
    if dispatch == "ragged":
        monkeypatch.setattr(expert_parallel, "ragged_all_to_all", _emulated_ragged_all_to_all)
    X, D, F, E = 64, 16, 24, 8
    R = 1 if routing == "one-expert" else 2
    keys = jax.random.split(jax.random.key(2), 7)
    x_XD = jax.random.normal(keys[0], (X, D), jnp.float32)
    gate, up = (jax.random.normal(k, (E, D, F), jnp.float32) / D**0.5 for k in keys[1:3])
    down = jax.random.normal(keys[3], (E, F, D), jnp.float32) / F**0.5
    weights_XR = jax.random.uniform(keys[4], (X, R), jnp.float32, 0.5, 1.0)
    probe_XD = jax.random.normal(keys[6], (X, D), jnp.float32)  # a random linear functional of the output
    if routing == "random":
        experts_XR = jax.random.permutation(keys[5], jnp.tile(jnp.arange(E), (X, 1)), axis=1, independent=True)
        experts_XR = experts_XR[:, :R]
    else:
        experts_XR = jnp.tile(jnp.arange(R, dtype=jnp.int32), (X, 1))
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4))
    layout = sharding.expert_layout(mesh.abstract_mesh, E, X)
    assert layout.num_shards == 4 and layout.expert_axes == ("expert",)
    ffn = functools.partial(qwen3.expert_ffn, cfg=MOE)

    def ep(x, w, e, g, u, d):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return expert_parallel.moe_block(x, w, e, g, u, d, ffn, layout, dispatch)

    def value_and_grads(fn, *args):
        out, vjp = jax.vjp(lambda x, w, g, u, d: fn(x, w, args[2], g, u, d), *args[:2], *args[3:])
        return out, vjp(probe_XD)

    tok, w = NamedSharding(mesh, layout.token_spec), NamedSharding(mesh, layout.weight_spec)
    args = (x_XD, weights_XR, experts_XR, gate, up, down)
    placed = [jax.device_put(a, s) for a, s in zip(args, (tok,) * 3 + (w,) * 3)]
    got, got_grads = jax.jit(functools.partial(value_and_grads, ep))(*placed)
    want, want_grads = jax.jit(functools.partial(value_and_grads, _reference_moe))(*args)
    assert np.all(np.abs(want).max(axis=1) > 1e-2)  # every token has a non-trivial output to lose
    # fp32: each entry is a sum of < 10^3 products computed in another order: <= 10^3 * 2^-24 of the scale.
    for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * float(np.abs(b).max()))


@pytest.fixture(scope="module")
def six_experts_yaml(tmp_path_factory):
    """A tiny Qwen3-MoE with 6 experts: mesh.expert=4 cannot hold whole experts per device."""
    root = tmp_path_factory.mktemp("ep")
    transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
    ).save_pretrained(root / "hf")  # fmt: skip
    path = root / "moe.yaml"
    path.write_text(
        f"mode: sft\nmodel: {{init: {root / 'hf'}}}\ndata: {{store: {root / 'no-store'}}}\n"
        f"train: {{batch_size: 8, seq_len: 16}}\nmesh: {{fsdp: 2, expert: 4}}\nlogging: {{run_dir: {root / 'run'}}}\n"
    )
    return path


@pytest.mark.parametrize("plan", [False, True], ids=["trainer", "plan"])
def test_expert_axis_not_dividing_experts_is_refused(six_experts_yaml, plan, capsys):
    status = train.main(["--config", str(six_experts_yaml), *(["--plan"] if plan else [])])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "mesh.expert" in err and "6 experts" in err
    assert not (six_experts_yaml.parent / "run").exists()  # refused before the run wrote anything


def test_expert_layout_refuses_indivisible_experts_and_tokens():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4)).abstract_mesh
    with pytest.raises(ValueError, match="mesh.expert"):
        sharding.expert_layout(mesh, 6, 64)
    with pytest.raises(ValueError, match="token rows"):
        sharding.expert_layout(mesh, 8, 6)  # 6 rows cannot give each of 4 expert devices its own tokens
    assert sharding.expert_layout(sharding.make_mesh(sharding.MeshConfig(fsdp=-1)).abstract_mesh, 8, 64) is None


def test_expert_parallel_rules_split_tokens_and_dense_weights_over_the_expert_axis():
    rules = sharding.MeshConfig(fsdp=2, expert=4).logical_rules()
    assert rules["batch"] == ("data", "fsdp", "expert") and rules["embed"] == ("fsdp", "expert")
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4))
    specs = sharding.partition_specs(qwen3.param_specs(MOE), mesh, rules)
    assert specs["moe"]["gate"] == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")  # whole experts
    assert specs["layers"]["q"] == jax.sharding.PartitionSpec(None, ("fsdp", "expert"), "tensor", None)
    assert sharding.MeshConfig(fsdp=-1).logical_rules() == sharding.DEFAULT_RULES  # no expert axis: unchanged


@pytest.mark.parametrize("impl", ["padded", "triton"])
def test_expert_parallel_with_the_grouped_gemms(impl):
    """The EP step's local experts run the configured grouped GEMM (``padded``; ``triton`` in Pallas interpret
    mode) and still equal the single-device step. fp32: both sides sum the same < 10^3 products per entry in other
    orders, which moves an entry by at most 10^3 * 2^-24 ~ 6e-5 of the terms' scale; 1e-4 of each leaf's largest
    entry bounds it, while a dropped assignment moves the expert gradients by O(1)."""
    cfg = dataclasses.replace(MOE, moe_impl=impl, pallas_interpret=impl == "triton")
    params = qwen3.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, cfg.vocab_size)
    ref_loss, ref_delta, _ = _sgd_step(cfg, params, tokens)
    loss, delta, text = _sgd_step(cfg, params, tokens, sharding.MeshConfig(fsdp=2, expert=4))
    assert "all-to-all(" in text
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for want, got in zip(jax.tree.leaves(ref_delta), jax.tree.leaves(delta), strict=True):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * scale)
