"""The benchmark harness: the FLOP formula against XLA's own count, the peak table, and both suites end to end with
test-sized shapes (the GPU one through benchmarks/gpu.sh, on CPU), checking the JSON they write."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from lopd_jax.models import presets, qwen3

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    """Child processes: one CPU device (not the 8 fake ones of conftest) and this suite's compile cache."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(os.environ.get("LOPD_JAX_CACHE", ROOT / ".jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def test_forward_flops_match_xla_cost_analysis():
    # XLA counts every multiply-add of the compiled forward; with attention over the full T x T (XLA does not know
    # half of it is masked) it should equal our per-token figure with the causal T/2 replaced by T, to within
    # the elementwise work (norms, softmax, RoPE: under 1% at this shape).
    cfg = qwen3.Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, scan_layers=False,  # XLA counts a while-loop body once
    )  # fmt: skip
    B, T = 2, 128
    params = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    compiled = jax.jit(lambda p, t: qwen3.forward(p, t, cfg=cfg)).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    L, N, H = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    ours_full_attention = B * T * (common.forward_flops_per_token(cfg, T) + 2 * L * N * H * T)
    assert ours_full_attention == pytest.approx(B * T * (2 * common.matmul_params(cfg) + 4 * L * N * H * T))
    assert xla_flops == pytest.approx(ours_full_attention, rel=0.02)
    assert xla_flops >= 0.99 * ours_full_attention  # elementwise work only adds


def test_matmul_params_of_published_shapes():
    # Qwen3-8B: untied, so embed (a lookup) drops out and lm_head stays; Qwen3-0.6B: tied, the head still runs.
    q8 = presets.get_preset("qwen3-8b")
    q06 = presets.get_preset("qwen3-0.6b")
    norms = lambda c: c.num_hidden_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size  # noqa: E731
    assert common.matmul_params(q8) == presets.param_count(q8) - 151936 * 4096 - norms(q8)
    assert common.matmul_params(q06) == presets.param_count(q06) - norms(q06)
    assert common.train_flops_per_token(q8, 4096) == 6 * common.matmul_params(q8) + 6 * 36 * 32 * 128 * 4096


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v4", 275e12),
    ],
)
def test_peak_table(kind, peak):
    assert common.device_peak_flops(SimpleNamespace(device_kind=kind, platform="gpu"))[0] == peak


def _positive(x) -> bool:
    return isinstance(x, float | int) and np.isfinite(x) and x > 0


def _check_train_rows(rows, expect_remat: str):
    assert rows
    for r in rows:
        assert r["model"]["remat"] == expect_remat
        for key in ("tokens_per_s", "flops_per_token", "mfu", "compile_s", "peak_bytes"):
            assert _positive(r[key]), (r["name"], key, r[key])
        assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"]["median"])
        assert r["flops_per_token"] == pytest.approx(6 * r["matmul_params"] + 6 * 2 * 4 * 16 * r["seq_len"])


def test_cpu_suite_tiny(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu_tiny.json").read_text())
    assert (tmp_path / "cpu_tiny.md").read_text().startswith("# Benchmarks: cpu suite")
    assert (tmp_path / "cpu_tiny_ratios.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["errors"] == {}
    assert doc["machine"]["versions"]["jax"] == jax.__version__ and doc["machine"]["host"]["cores"] >= 1
    res = doc["results"]
    _check_train_rows(res["train_step"], "none")
    vt = res["vs_torch"]
    # Same weights, same batch, both fp32: the first step's loss and gradient norm must agree.
    assert vt["agreement"]["jax_loss"] == pytest.approx(vt["agreement"]["torch_loss"], rel=1e-5, abs=1e-6)
    assert vt["agreement"]["jax_grad_norm"] == pytest.approx(vt["agreement"]["torch_grad_norm"], rel=1e-4)
    pre = res["precompute"]
    assert pre["max_abs_logprob_diff"] < 1e-4  # fp32 both sides: the engines score the same numbers
    lvo = res["lightning_vs_opd"]
    parts = lvo["standard_parts_median_s"]
    for r in (vt["speedup"], pre["speedup"], lvo["step_speedup"]):
        assert all(_positive(r[k]) for k in ("median", "low", "high")) and r["low"] <= r["median"] <= r["high"]
    assert all(_positive(v) for v in parts.values())
    assert lvo["lightning_total_s"] == pytest.approx(
        lvo["precompute_s"] + lvo["steps"] * lvo["lightning_step_s"]["median"]
    )


def test_gpu_script_tiny_on_cpu(tmp_path):
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--tiny", "--out", str(tmp_path), "--models", "qwen3-0.6b,qwen3-8b"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check = json.loads((tmp_path / "attention_check_tiny.json").read_text())
    assert check["ok"] is False and "GPU" in check["error"]  # recorded, not fatal, on a CPU
    doc = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert doc["errors"] == {}
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in doc["machine"]["xla_flags"]
    assert doc["attention_check"] == check
    rows = doc["results"]["train_step"]
    assert [r["name"] for r in rows] == ["qwen3-0.6b (tiny stand-in)", "qwen3-8b (tiny stand-in)"]
    _check_train_rows(rows, "full")
    assert all(r["model"]["attention"] == "xla" and r["batch_size"] >= 1 for r in rows)
    assert all(r["fit_attempts"][-1]["xla_peak_bytes"] <= r["memory_budget_bytes"] for r in rows)
    assert doc["results"]["precompute"]["vllm"]["skipped"]
