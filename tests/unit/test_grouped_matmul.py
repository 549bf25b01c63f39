"""grouped_matmul: every implementation equals lax.ragged_dot (forward, d lhs, d rhs) on ragged groups; the
Pallas-Triton kernels run in interpret mode on CPU; the tile metadata; the per-backend choice; the Qwen3-MoE
forward and OPD gradient with moe_impl="triton" against transformers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.losses import ROWS, assert_tree_close, pack, rel_err, torch_opd_loss
from helpers.qwen3 import hf_model, random_tokens, torch_logits

from lopd_jax import losses
from lopd_jax.models import grouped_matmul as gm
from lopd_jax.models import qwen3
from lopd_jax.plan import targets

U = 2.0**-24  # fp32 unit roundoff
SMALL = gm.Tiles(bm=16, bn=16, bk=16, num_warps=4, num_stages=2)  # Triton's smallest dot: several tiles per group

# (A rows, group sizes): every case has D = 24 and F = 40 (neither a multiple of 16: partial K and N tiles).
CASES = {
    # skewed, empty groups (first, middle, last), boundaries inside 16-row tiles, A = 53 not a multiple of 16,
    # and sum(group_sizes) = 50 < A: three tail rows must come out zero (and get zero gradient)
    "skewed_empty_tail": (53, [0, 31, 1, 0, 3, 15, 0]),
    "one_group_all_rows": (40, [0, 0, 40, 0]),
    "no_rows": (17, [0, 0, 0]),
}
IMPLS = {
    "triton": lambda x, w, g: gm.grouped_matmul_triton(x, w, g, True, (SMALL, SMALL)),
    "triton_default_tiles": lambda x, w, g: gm.grouped_matmul(x, w, g, impl="triton", interpret=True),
    "padded": lambda x, w, g: gm.grouped_matmul(x, w, g, impl="padded"),
    "padded_bm16": lambda x, w, g: gm.grouped_matmul_padded(x, w, g, bm=16),
    "scan": lambda x, w, g: gm.grouped_matmul(x, w, g, impl="scan"),
}


def _operands(case: str):
    A, sizes = CASES[case]
    k = jax.random.split(jax.random.key(0), 3)
    E, D, F = len(sizes), 24, 40
    x = jax.random.normal(k[0], (A, D))
    w = jax.random.normal(k[1], (E, D, F))
    ct = jax.random.normal(k[2], (A, F))  # the output cotangent
    return x, w, jnp.array(sizes, jnp.int32), ct


def _abs_ragged(a, b, sizes) -> np.ndarray:
    """sum_k |a_ik| |b_kj| per group in float64 (rows past the groups: 0): the scale of each rounding bound."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    out, start = np.zeros((a.shape[0], b.shape[-1])), 0
    for e, n in enumerate(np.asarray(sizes)):
        out[start : start + n] = a[start : start + n] @ b[e]
        start += n
    return out


def _bound(n: int, scale: np.ndarray) -> np.ndarray:
    """Two fp32 sums of the same n products, in any order, each within gamma_n * sum |products| of the exact
    value (Higham, Accuracy and Stability, eq. 3.5; gamma_n = n u / (1 - n u)): they differ by at most twice
    that. Plus one ulp-sized term for the final rounding to fp32, which either side may place differently."""
    gamma = n * U / (1 - n * U)
    return 2 * gamma * scale + 2 * U * scale


# Interpret mode is slow: the default tiles (what the model runs) on the richest case only. The fast subset keeps
# padded_bm16 and scan; padded's default tiles (the same code, larger padding) and triton run in the full suite.
PAIRS = [(i, c) for i in IMPLS for c in CASES if i != "triton_default_tiles" or c == "skewed_empty_tail"]


@pytest.mark.parametrize(
    "impl,case",
    [pytest.param(i, c, marks=[pytest.mark.slow] if "triton" in i or i == "padded" else []) for i, c in PAIRS],
)
def test_forward_and_gradients_equal_ragged_dot(impl, case):
    x, w, sizes, ct = _operands(case)
    A, D = x.shape
    F = w.shape[-1]
    out, vjp = jax.vjp(jax.jit(lambda x, w: IMPLS[impl](x, w, sizes)), x, w)  # jitted: one compile, not op by op
    ref, ref_vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x, w)
    (dx, dw), (ref_dx, ref_dw) = vjp(ct), ref_vjp(ct)

    tail = int(sizes.sum())
    assert np.all(np.asarray(out)[tail:] == 0) and np.all(np.asarray(dx)[tail:] == 0)
    np.testing.assert_array_less(np.abs(out - ref), _bound(D, _abs_ragged(x, w, sizes)) + 1e-30)
    # d lhs = ct @ w[e]^T per group: F products per entry.
    np.testing.assert_array_less(np.abs(dx - ref_dx), _bound(F, _abs_ragged(ct, np.swapaxes(w, 1, 2), sizes)) + 1e-30)
    # d rhs[e] = x_e^T @ ct_e: size_e <= A products per entry; empty experts get exactly zero.
    start, scale = 0, np.zeros(w.shape)
    for e, n in enumerate(np.asarray(sizes)):
        scale[e] = np.abs(np.asarray(x[start : start + n], np.float64)).T @ np.abs(np.asarray(ct[start : start + n]))
        start += n
    np.testing.assert_array_less(np.abs(dw - ref_dw), _bound(A, scale) + 1e-30)
    assert np.all(np.asarray(dw)[np.asarray(sizes) == 0] == 0)
    if tail:
        assert np.abs(np.asarray(ref)).max() > 1  # the comparison is between real numbers


def test_bound_is_tight_enough_to_catch_a_wrong_row():
    """A kernel that drops the last row of a group (an off-by-one at a tile edge) exceeds the bound."""
    x, w, sizes, _ = _operands("skewed_empty_tail")
    ref = np.asarray(jax.lax.ragged_dot(x, w, sizes))
    wrong = ref.copy()
    wrong[30] = 0  # row 30: the last of group 1, inside the second 16-row tile
    assert np.any(np.abs(wrong - ref) >= _bound(x.shape[1], _abs_ragged(x, w, sizes)))


@pytest.mark.parametrize("bm", [1, 4, 16, 64])
def test_tile_metadata_covers_each_row_once_within_its_group(bm):
    rng = np.random.default_rng(bm)
    E, A = 6, 80
    metadata = jax.jit(gm.tile_metadata, static_argnums=(1, 2))
    for _ in range(20):  # skewed random groups, empty ones among them, and 0-20 rows past the groups
        sizes = rng.multinomial(int(rng.integers(60, A + 1)), rng.dirichlet(np.full(E, 0.3)))
        group, start, end = map(np.asarray, metadata(jnp.asarray(sizes, jnp.int32), A, bm))
        assert len(group) == (A + (E + 1) * (bm - 1)) // bm  # the static bound
        ends = np.cumsum(np.append(sizes, A - sizes.sum()))
        covered = np.zeros(A, int)
        for g, s, e in zip(group, start, end):
            assert 0 <= e - s <= bm
            if e > s:
                assert ends[g] - np.append(sizes, A - sizes.sum())[g] <= s and e <= ends[g]  # inside group g
                covered[s:e] += 1
        assert np.all(covered == 1)


def test_resolve_moe_impl_per_backend():
    assert gm.resolve_moe_impl("auto", "gpu") == "triton" and gm.resolve_moe_impl("auto", "cuda") == "triton"
    assert gm.resolve_moe_impl("auto", "tpu") == "ragged_dot"
    assert gm.resolve_moe_impl("auto", "cpu") == gm.AUTO["cpu"]
    assert gm.resolve_moe_impl("padded", "tpu") == "padded" and gm.resolve_moe_impl("auto", "rocm") == "padded"
    assert gm.resolve_moe_impl("triton", "cpu", interpret=True) == "triton"
    for platform in ("cpu", "tpu"):
        with pytest.raises(ValueError, match=f"need an NVIDIA GPU \\(backend is '{platform}'\\)"):
            gm.resolve_moe_impl("triton", platform)
    with pytest.raises(ValueError, match="moe_impl must be"):
        gm.resolve_moe_impl("dense", "cpu")


def test_config_choices_are_the_module_impls():
    import typing

    from lopd_jax.models import qwen3_specs

    assert set(typing.get_args(qwen3_specs.MoeImpl)) == {"auto", *gm.IMPLS}


@pytest.mark.slow
def test_triton_outside_interpret_mode_is_refused_on_cpu(tmp_root):
    _, cfg, params = hf_model("moe_norm_topk", tmp_root)
    cfg = dataclasses.replace(cfg, moe_impl="triton")
    with pytest.raises(ValueError, match="moe_impl='triton'.*backend is 'cpu'"):
        qwen3.forward(params, random_tokens((1, 4)), cfg=cfg)


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.slow
def test_moe_forward_with_triton_kernels_matches_transformers(tmp_root):
    model, cfg, params = hf_model("moe_norm_topk", tmp_root)
    cfg = dataclasses.replace(cfg, moe_impl="triton", pallas_interpret=True)
    tokens = random_tokens((2, 13))
    ref = torch_logits(model, tokens)
    out = np.asarray(jax.jit(qwen3.forward, static_argnames=("cfg",))(params, tokens, cfg=cfg))
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # test_qwen3's tolerance for every implementation


V = 128
MOE_KW = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=10_000.0, rms_norm_eps=1e-6,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
)  # fmt: skip


def _moe_params(model, where: str) -> tuple[qwen3.Qwen3Config, dict]:
    model.save_pretrained(where)
    return qwen3.load_hf(where)


@pytest.mark.slow
def test_moe_opd_gradient_with_triton_kernels_matches_torch(sequences, tmp_path):
    """test_losses' OPD parity (sample_mean, old = current) on a Qwen3-MoE student, experts run as the triton
    kernels in interpret mode."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**MOE_KW, attn_implementation="eager")
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # larger-than-init weights so every parameter matters in the gradient
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model = model.float().eval()
    t_loss, _ = torch_opd_loss(model, sequences, "sample_mean", old_offsets=False)
    t_loss.backward()
    grads_model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), grads_model.named_parameters()):
            q.copy_(p.grad)
    _, want = _moe_params(grads_model, str(tmp_path / "grads"))
    cfg, params = _moe_params(model, str(tmp_path / "weights"))
    cfg = dataclasses.replace(cfg, moe_impl="triton", pallas_interpret=True)
    assert cfg.num_experts == 8 and len(ROWS) == 3

    loss_cfg = losses.LossConfig(normalization="sample_mean", logprob_chunk_size=5)
    fn = jax.jit(jax.value_and_grad(losses.opd_loss, has_aux=True), static_argnames=("cfg", "loss_cfg"))
    (loss, _), grads = fn(params, pack(sequences), cfg=cfg, loss_cfg=loss_cfg)
    assert rel_err(loss, t_loss.item()) <= 1e-5
    assert_tree_close(grads, want, 1e-4)  # test_losses' tolerance
    assert float(jnp.abs(grads["moe"]["down"]).max()) > 0  # the expert weights get a gradient


# ---------------------------------------------------------------------------------------------- XLA:GPU, deviceless


@pytest.mark.skipif(
    not targets.installed(targets.CUDA_PLUGIN),
    reason="jax-cuda12-plugin absent: pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2",
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_compile_deviceless_for_h100(dtype):
    """XLA:GPU compiles the three kernels (Triton's compiler for sm90, no GPU) for every tile candidate, with none
    of the temporaries XLA:GPU's dense ragged dot needs."""
    dev = targets.topology_devices(targets.get_target("h100"))[0]
    A, D, F, E = 512, 256, 192, 8
    s = jax.sharding.SingleDeviceSharding(dev)
    args = [jax.ShapeDtypeStruct(shape, dt, sharding=s) for shape, dt in [((A, D), dtype), ((E, D, F), dtype)]]
    args.append(jax.ShapeDtypeStruct((E,), jnp.int32, sharding=s))

    def compiled(gmm):
        def f(x, w, g):
            y, vjp = jax.vjp(lambda a, b: gmm(a, b, g), x, w)
            return y, *vjp(y)

        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).compile()

    dense = compiled(jax.lax.ragged_dot).memory_analysis().temp_size_in_bytes
    assert dense >= A * E * D * jnp.dtype(dtype).itemsize  # the [A, E * D] masked operand
    for tiles in gm.TILE_CANDIDATES.values():
        c = compiled(lambda x, w, g, tiles=tiles: gm.grouped_matmul_triton(x, w, g, False, tiles))
        assert c.as_text().count("xla.gpu.triton") == 3  # gmm, transposed gmm, tgmm
        assert c.memory_analysis().temp_size_in_bytes < dense / 100
