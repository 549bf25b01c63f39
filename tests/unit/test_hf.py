"""HF checkpoint I/O: config mapping and refusals, safetensors load/save round trips through transformers,
sharded loading on a fake 8-device mesh, streamed loading's host memory."""

import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from lopd_jax.models import hf, qwen3
from lopd_jax.parallel import sharding

_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, initializer_range=0.1, rope_theta=1e6,
)  # fmt: skip
MODELS = {
    "dense": (Qwen3ForCausalLM, Qwen3Config(**_BASE, tie_word_embeddings=False)),
    "dense_tied": (Qwen3ForCausalLM, Qwen3Config(**_BASE, tie_word_embeddings=True)),
    "moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **{**_BASE, "num_hidden_layers": 3},
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),  # fmt: skip
}


@pytest.fixture(scope="module", params=list(MODELS))
def hf_dir(request, tmp_path_factory):
    """A transformers model saved twice: one file, and sharded with an index."""
    model_cls, config = MODELS[request.param]
    torch.manual_seed(0)
    model = model_cls(config).eval()
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return model, root


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 128, shape)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_and_single_file_checkpoints_load_the_same(hf_dir):
    _, root = hf_dir
    assert os.path.exists(root / "sharded" / hf.INDEX_FILE)
    assert len([f for f in os.listdir(root / "sharded") if f.endswith(".safetensors")]) > 2
    cfg1, p1 = qwen3.load_hf(str(root / "single"))
    cfg2, p2 = qwen3.load_hf(str(root / "sharded"))
    assert cfg1 == cfg2
    _assert_trees_identical(p1, p2)


def test_save_hf_loads_in_transformers_and_round_trips(hf_dir, tmp_path):
    model, root = hf_dir
    cfg, params = qwen3.load_hf(str(root / "single"))
    out = qwen3.save_hf(str(tmp_path / "out"), cfg, params, max_shard_bytes=16_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    with open(os.path.join(out, hf.INDEX_FILE)) as f:
        index = json.load(f)
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    # The same tensor names (per-expert MoE keys) and shapes as transformers' own save_pretrained.
    with safe_open(str(root / "single" / "model.safetensors"), "np") as f:
        reference = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    ours = {}
    for name in files:
        with safe_open(os.path.join(out, name), "np") as f:
            ours.update({k: f.get_slice(k).get_shape() for k in f.keys()})  # noqa: SIM118
    assert ours == reference
    # transformers reads it back to the identical weights, hence identical logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    ref_state, new_state = model.state_dict(), reloaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for k in ref_state:
        torch.testing.assert_close(new_state[k], ref_state[k], rtol=0, atol=0)
    tokens = _tokens((2, 9))
    np.testing.assert_array_equal(_torch_logits(reloaded, tokens), _torch_logits(model, tokens))
    # ... and so do we, bit for bit.
    cfg2, params2 = qwen3.load_hf(out)
    assert cfg2 == cfg
    _assert_trees_identical(params2, params)


def test_bfloat16_round_trip(hf_dir, tmp_path):
    model, root = hf_dir
    cfg, params = qwen3.load_hf(str(root / "single"), dtype=jnp.bfloat16)
    assert cfg.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
    out = qwen3.save_hf(str(tmp_path / "bf16"), cfg, params, max_shard_bytes=10_000)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    _assert_trees_identical(qwen3.load_hf(out, dtype=jnp.bfloat16)[1], params)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ref = model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, ref, rtol=0, atol=0)


def test_load_on_8_device_mesh(hf_dir):
    _, root = hf_dir
    cfg, params = qwen3.load_hf(str(root / "sharded"))
    mesh_cfg = sharding.MeshConfig(fsdp=2, expert=4) if cfg.num_experts else sharding.MeshConfig(fsdp=4, tensor=2)
    mesh = sharding.make_mesh(mesh_cfg)
    cfg_m, params_m = qwen3.load_hf(str(root / "sharded"), mesh=mesh)
    expected = qwen3.param_shardings(cfg, mesh)
    for leaf, want in zip(jax.tree.leaves(params_m), jax.tree.leaves(expected)):
        assert leaf.sharding == want
    if cfg.num_experts:
        assert params_m["moe"]["gate"].sharding.shard_shape(params_m["moe"]["gate"].shape)[1] == 1
    else:
        assert params_m["layers"]["q"].addressable_shards[0].data.shape == (2, 8, 2, 16)
    _assert_trees_identical(params_m, params)
    tokens = jnp.asarray(_tokens((8, 6)))
    fwd = jax.jit(qwen3.forward, static_argnames="cfg")
    np.testing.assert_allclose(fwd(params_m, tokens, cfg=cfg_m), fwd(params, tokens, cfg=cfg), atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_sliding_window", True),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("model_type", "llama"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(tmp_path, field, value):
    config = Qwen3Config(**_BASE).to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        hf.load_config(str(tmp_path))


def test_released_config_format():
    """Qwen3-30B-A3B's published config.json (rope_theta/rope_scaling, num_experts) parses and round-trips."""
    released = {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    }  # fmt: skip
    cfg = hf.config_from_hf(released)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (
        128, 8, 768, True,
    )  # fmt: skip
    assert cfg.rope_theta == 1e6 and cfg.head_dim == 128 and len(cfg.moe_layers) == 48
    assert hf.config_from_hf(hf.config_to_hf(cfg, "bfloat16")) == cfg
    # transformers accepts what we write and reads the same architecture back
    theirs = Qwen3MoeConfig(**hf.config_to_hf(cfg, "bfloat16"))
    assert hf.config_from_hf(theirs.to_dict()) == cfg


def test_missing_tensor_is_named(hf_dir, tmp_path):
    _, root = hf_dir
    tensors = load_file(str(root / "single" / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((root / "single" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        qwen3.load_hf(str(tmp_path))


@pytest.mark.slow
def test_streamed_load_peak_host_memory(tmp_path, monkeypatch):
    """Loading a checkpoint of many shard files stages about one leaf at a time, never the whole model.

    On the CPU backend a device buffer may alias the host array it was made from, so the loaded params
    themselves count as host memory here; the staging cost is therefore measured per leaf, as the traced peak
    above what was allocated when the leaf started (on an accelerator that is the whole host footprint).
    """
    cfg = qwen3.Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(0))
    shard_bytes = 160_000
    qwen3.save_hf(str(tmp_path), cfg, params, max_shard_bytes=shard_bytes)
    total = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert total > 4 * shard_bytes
    staging = []
    load_leaf = hf._load_leaf

    def measured_load_leaf(*args):
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        leaf = jax.block_until_ready(load_leaf(*args))
        staging.append(tracemalloc.get_traced_memory()[1] - start)
        return leaf

    monkeypatch.setattr(hf, "_load_leaf", measured_load_leaf)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    tracemalloc.start()
    try:
        _, loaded = qwen3.load_hf(str(tmp_path), mesh=mesh)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest_leaf = max(x.nbytes for x in jax.tree.leaves(params))
    print(
        f"streamed load of {total / 1e3:.0f} kB in {len(os.listdir(tmp_path)) - 3} files: staging peak "
        f"{max(staging) / 1e3:.0f} kB per leaf (largest leaf {largest_leaf / 1e3:.0f} kB), "
        f"overall traced peak {peak / 1e3:.0f} kB"
    )
    assert len(staging) == len(jax.tree.leaves(params))
    assert max(staging) < largest_leaf + shard_bytes < total / 2
    _assert_trees_identical(loaded, params)
