"""``--plan --target tpu-*``: XLA:TPU compiles the trainer's step over a libtpu topology (no TPU here), the
roofline estimate follows the model formula, and bad targets are one line with exit 2.

The compile test needs libtpu (``pip install -e ".[tpu]"``; CI installs it) and is skipped without it.
"""

from __future__ import annotations

import importlib.util

import jax
import pytest
import transformers

from lopd_jax import train
from lopd_jax.models import presets
from lopd_jax.plan import planner as plan
from lopd_jax.plan import targets
from lopd_jax.training import config as config_lib
from lopd_jax.training import setup as train_setup

HAS_LIBTPU = targets.installed("libtpu")
HAS_CUDA_PLUGIN = targets.installed(targets.CUDA_PLUGIN)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    """A 2-layer Qwen3 with head_dim 128 (splash's block layout), 8 rows x 1024 tokens, full remat."""
    root = tmp_path_factory.mktemp("tpu")
    transformers.Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, tie_word_embeddings=False,
    ).save_pretrained(root / "hf")  # fmt: skip
    path = root / "tiny.yaml"
    path.write_text(
        f"mode: lightning_opd\nmodel: {{init: {root / 'hf'}, dtype: bfloat16, remat: full}}\n"
        "data: {store: /unused}\ntrain: {batch_size: 8, seq_len: 1024, grad_accum: 2}\nmesh: {fsdp: -1}\n"
    )
    return str(path)


def _cli(capsys, *argv) -> tuple[int, str]:
    status = train.main(list(argv))
    return status, capsys.readouterr().err.strip()


def test_unknown_target_is_one_line_naming_the_accepted(tiny_yaml, capsys):
    status, err = _cli(capsys, "--config", tiny_yaml, "--plan", "--target", "tpu-v9-8")
    assert status == 2 and len(err.splitlines()) == 1
    assert "tpu-v9-8" in err and "tpu-v5p-{8," in err and "tpu-v6e-" in err


def test_target_without_plan_is_refused(tiny_yaml, capsys):
    status, err = _cli(capsys, "--config", tiny_yaml, "--target", "tpu-v5p-8")
    assert status == 2 and "--plan" in err and len(err.splitlines()) == 1


def test_missing_libtpu_names_the_install(tiny_yaml, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    status, err = _cli(capsys, "--config", tiny_yaml, "--plan", "--target", "tpu-v5e-8")
    assert status == 2 and len(err.splitlines()) == 1 and "pip install -e '.[tpu]'" in err


def test_target_names_map_to_topologies():
    assert targets.get_target("tpu-v5p-8").topology == "v5p:2x2x1"  # v5p counts TensorCores: 4 chips
    assert targets.get_target("tpu-v5p-8").num_chips == 4
    assert targets.get_target("tpu-v5e-8").topology == "v5e:2x4" and targets.get_target("tpu-v6e-8").num_chips == 8
    assert targets.get_target("tpu-v5p-64").num_chips == 32


def test_planned_attention_per_platform():
    assert plan.planned_attention("auto", "tpu") == ("splash", None)
    assert plan.planned_attention("auto", "cpu") == ("xla", None)
    assert plan.planned_attention("cudnn", "tpu")[0] == "splash"
    assert plan.planned_attention("cudnn", "gpu") == ("cudnn", None)
    assert plan.planned_attention("splash", "cpu")[0] == "blockwise"  # interpret mode is no plan


def test_roofline_follows_the_model_formula():
    from benchmarks import common

    cfg = presets.get_preset("qwen3-8b", dtype="bfloat16", remat="full")
    chip = targets.CHIPS["v5p"]
    rows, T, accum, chips = 256, 5120, 16, 8
    per_chip_tokens = rows * T / chips
    state = 12 * presets.param_count(cfg) // chips  # fp32 params + two fp32 moments, sharded
    r = targets.estimate(cfg, rows, T, accum, chips, chip, state)
    assert r.model_flops == pytest.approx(common.train_flops_per_token(cfg, T) * per_chip_tokens)
    # Full remat reruns every decoder layer's forward: + 2 * (P_matmul - lm_head) + 2 * L * N * H * T per token.
    rerun = 2 * (common.matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size) + 2 * 36 * 32 * 128 * T
    assert r.hardware_flops == pytest.approx(r.model_flops + rerun * per_chip_tokens)
    # Traffic: at least the bf16 weights gathered and read 3x per micro-batch, and the state read + written once.
    assert r.bytes_accessed > accum * 3 * 2 * presets.param_count(cfg) + 2 * state
    assert r.step_seconds == max(r.hardware_flops / 459e12, r.bytes_accessed / 2.765e12)
    assert r.mfu(chip) == pytest.approx(r.model_flops / (r.step_seconds * 459e12))
    assert 0.3 < r.mfu(chip) < 1  # 8B at T=5120 is compute-bound on v5p: the estimate is near peak by design


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu absent: pip install -e '.[tpu]' (CI installs it)")
def test_xla_tpu_compiles_the_step_with_splash(tiny_yaml, capsys):
    cfg = config_lib.load_config(tiny_yaml)
    # conftest sets "highest" for fp32 parity; Mosaic refuses it on bf16 operands (as a TPU run never sets it).
    with jax.default_matmul_precision("default"):
        p = plan.run(cfg, "tpu-v5p-8")
    out = capsys.readouterr().out
    assert p.attention == "splash" and p.mesh["fsdp"] == 4 and p.budget_bytes == 95e9
    assert "XLA:TPU" in out and "ROOFLINE ESTIMATE" in out and "FITS" in out
    assert p.memory["temp"] > 0 and p.memory["argument"] >= sum(p.state_bytes.values())
    assert 0 < p.roofline.mfu(p.target.chip) < 1
    # The XLA attention keeps [rows, N, T, T] probabilities (bf16 at least) for its backward; splash never builds
    # them (measured: 12.1 MB more temp for XLA here).
    with jax.default_matmul_precision("default"):
        xla = plan.make_plan(config_lib.load_config(tiny_yaml, ["model.attention=xla"]), target="tpu-v5p-8")
    scores = 1 * 4 * 1024 * 1024 * 2  # one row per chip, 4 heads, bf16
    assert xla.attention == "xla" and xla.memory["temp"] - p.memory["temp"] >= scores


def test_gpu_targets_and_missing_plugin(tiny_yaml, capsys):
    h100 = targets.get_target("h100")
    assert (h100.platform, h100.num_chips, h100.chip.peak_flops) == ("gpu", 8, 989e12)
    assert targets.get_target("h200-16").num_chips == 16 and "device_memory_size: 150754820096" in (
        targets.gpu_target_config(targets.get_target("h200").chip)
    )
    if not HAS_CUDA_PLUGIN:
        status, err = _cli(capsys, "--config", tiny_yaml, "--plan", "--target", "h100")
        assert status == 2 and len(err.splitlines()) == 1 and "jax-cuda12-plugin==0.10.2" in err


@pytest.mark.skipif(
    not HAS_CUDA_PLUGIN,
    reason="jax-cuda12-plugin absent: pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2",
)
def test_xla_gpu_compiles_the_step_deviceless(tiny_yaml, capsys):
    with jax.default_matmul_precision("default"):
        p = plan.run(config_lib.load_config(tiny_yaml, ["model.attention=xla"]), "h100")
    out = capsys.readouterr().out
    assert p.attention == "xla" and p.mesh["fsdp"] == 8 and p.budget_bytes == 84_978_434_048
    assert "XLA:GPU" in out and p.memory["temp"] > 0 and p.memory["argument"] >= sum(p.state_bytes.values())


@pytest.fixture(scope="module")
def tiny_moe_yaml(tmp_path_factory):
    """A 2-layer Qwen3-MoE (16 experts, top 4; head_dim 128 for splash), 8 rows x 256 tokens in 2 micro-batches."""
    root = tmp_path_factory.mktemp("tpu_moe")
    transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
        tie_word_embeddings=False,
    ).save_pretrained(root / "hf")  # fmt: skip
    path = root / "tiny_moe.yaml"
    path.write_text(
        f"mode: lightning_opd\nmodel: {{init: {root / 'hf'}, dtype: bfloat16, remat: full}}\n"
        "data: {store: /unused}\ntrain: {batch_size: 16, seq_len: 256, grad_accum: 2}\nmesh: {fsdp: 1, expert: -1}\n"
    )
    return str(path)


def _ragged_bytes_per_step(cfg, devices: int) -> int:
    """Rows one device sends per ragged all-to-all (its A = tokens x top-k assignments, bf16 x D), six per MoE
    layer and micro-batch: dispatch and return in the forward, again in the remat forward, and their transposes
    in the backward."""
    m = train_setup.model_config(cfg)
    tokens = cfg.train.batch_size // cfg.train.grad_accum * cfg.train.seq_len // devices
    per_a2a = tokens * m.num_experts_per_tok * m.hidden_size * 2
    return 6 * len(m.moe_layers) * cfg.train.grad_accum * per_a2a


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu absent: pip install -e '.[tpu]' (CI installs it)")
def test_xla_tpu_compiles_expert_parallelism_with_ragged_all_to_all(tiny_moe_yaml, capsys):
    """mesh.expert=8 on tpu-v5p-16 (8 chips): 2 whole experts per chip, the dispatch compiled as XLA:TPU's
    ragged all-to-all, and --plan's collective count equals the rows the dispatch must move."""
    cfg = config_lib.load_config(tiny_moe_yaml)
    with jax.default_matmul_precision("default"):
        p = plan.run(cfg, "tpu-v5p-16")
    out = capsys.readouterr().out
    assert p.mesh["expert"] == 8 and p.moe == "ragged_dot" and p.fits and "FITS" in out
    assert "experts: expert parallel: 2 whole experts per device" in out and "ragged all-to-all" in out
    assert p.collectives.unknown_trip_counts == 0
    assert p.collectives.by_kind["ragged-all-to-all"] == _ragged_bytes_per_step(cfg, 8)
    assert "ragged-all-to-all" in out and "collectives per step" in out


@pytest.mark.skipif(
    not HAS_CUDA_PLUGIN,
    reason="jax-cuda12-plugin absent: see docs/plans.md (a venv with the plugin of jax's own version)",
)
def test_xla_gpu_compiles_expert_parallelism_with_the_triton_kernels(tiny_moe_yaml, capsys):
    """The same on XLA:GPU (deviceless h100): moe_impl auto -> the Triton grouped GEMMs, ragged dispatch."""
    cfg = config_lib.load_config(tiny_moe_yaml, ["model.attention=xla"])
    with jax.default_matmul_precision("default"):
        p = plan.run(cfg, "h100")
    out = capsys.readouterr().out
    assert p.moe == "triton" and "moe: triton" in out and p.fits and "FITS" in out
    assert "experts: expert parallel: 2 whole experts per device" in out
    assert p.collectives.by_kind["ragged-all-to-all"] == _ragged_bytes_per_step(cfg, 8)
