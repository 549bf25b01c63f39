"""The benchmark harness: the FLOP formula against XLA's own count, the peak table, and both suites end to end with
test-sized shapes (the GPU one through benchmarks/gpu.sh, on CPU, where torch, grain, vllm, math-verify and
tensorboardX cannot be imported, as on the GPU image), checking the JSON they write."""

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

ROOT = Path(__file__).resolve().parents[2]


#: Run first in a child (PYTHONPATH): the packages the GPU image lacks (and torch) cannot be imported, as if absent
#: (importlib.util.find_spec returns None for them, which is how transformers probes for torch).
BLOCKER = """import sys
for _name in ("torch", "grain", "vllm", "math_verify", "tensorboardX"):
    sys.modules[_name] = None
"""


def _env(blocked_dir: Path | None = None) -> dict:
    """Child processes: one CPU device (not the 8 fake ones of conftest) and this suite's compile cache; with
    ``blocked_dir``, a sitecustomize there that makes the GPU image's missing packages unimportable."""
    env = dict(os.environ)
    if blocked_dir is not None:
        blocked_dir.mkdir(exist_ok=True)
        (blocked_dir / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = os.pathsep.join([str(blocked_dir), str(ROOT), env.get("PYTHONPATH", "")])
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
    "kind, peak, bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
        ("NVIDIA H100 PCIe", 756e12, 2.0e12),
        ("NVIDIA H100 NVL", 835e12, 3.9e12),
        ("NVIDIA H200", 989e12, 4.8e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
        ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
        ("TPU v4", 275e12, 1.2e12),
        ("TPU v5 lite", 197e12, 0.819e12),
        ("TPU v5p", 459e12, 2.765e12),
        ("TPU v5", 459e12, 2.765e12),
        ("TPU v6 lite", 918e12, 1.638e12),
    ],
)
def test_peak_table(kind, peak, bandwidth):
    device = SimpleNamespace(device_kind=kind, platform="gpu")
    assert common.device_peak_flops(device)[0] == peak
    assert common.device_peak_bandwidth(device) == bandwidth


def test_peak_table_unknown_kind_is_nan_not_a_guess():
    flops, source = common.device_peak_flops(SimpleNamespace(device_kind="NVIDIA B300", platform="gpu"))
    assert np.isnan(flops) and "PEAKS" in source


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
    # 1e-5 holds against torch's gradients summed in float64 (clip_grad_norm_'s own fp32 figure reads low on large
    # tensors: tests/unit/test_gradnorm_vs_torch.py); fp32 on both sides stays ~1e-7 from the truth.
    assert vt["agreement"]["jax_grad_norm"] == pytest.approx(vt["agreement"]["torch_grad_norm_f64"], rel=1e-5)
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
    # Greedy sampling on the same weights: the JAX engine and transformers.generate emit the same tokens.
    rows = res["sampling"]["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["identical_tokens"] for r in rows)
    assert all(_positive(r["jax_tokens_per_s"]) and _positive(r["torch_tokens_per_s"]) for r in rows)
    assert "sampling, batch 4: JAX vs transformers.generate" in (tmp_path / "cpu_tiny.md").read_text()


def test_shards_bench_tiny(tmp_path):
    # Sharded precompute, side by side: 1 process pinned to one core, 2 pinned processes (one shard each), 1 unpinned;
    # then the trainer's reader over 8 shards vs one store. The numbers are noise at this size; what must hold is
    # the bookkeeping (every token scored once, pins obeyed) and that the shards give the same data.
    cmd = [sys.executable, "-m", "benchmarks.shards_bench", "--tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu_shards_tiny.json").read_text())
    assert (tmp_path / "cpu_shards_tiny.md").read_text().startswith("# Benchmarks: sharded precompute, cpu")
    sc, rd = doc["results"]["scoring"], doc["results"]["reader"]
    assert sc["equal"] == {"samples": [256, 256], "scored": [256, 256], "tokens_equal": True, "nan_equal": True,
                           "bitwise_equal": True, "max_abs_diff": 0.0}  # fmt: skip
    one, two, free = sc["one_pinned"], sc["two_pinned"], sc["one_unpinned"]
    assert len(one["pins"]) == 1 and len(one["pins"][0]) == 1 and free["pins"] == ["all"]
    assert len(two["pins"]) == 2 and all(len(c) == 1 for c in two["pins"]) and two["pins"][0] != two["pins"][1]
    for s in (one, two):  # a process pinned to one core gets at most that core's time
        assert all(0 < share <= 1.02 for row in s["cpu_share"] for share in row), s["cpu_share"]
    for s in (one, two, free):  # the shards split the samples: every token scored exactly once per launch
        assert [sum(row) for row in s["tool_tokens"]] == [sc["tokens"]] * len(s["tool_tokens"])
        assert s["tokens_per_s"] == pytest.approx(sc["tokens"] / s["wall_s"]["median"])
    r = sc["speedup_two_vs_one_pinned"]
    assert r["median"] == pytest.approx(one["wall_s"]["median"] / two["wall_s"]["median"]) and r["median"] > 0
    busier = max(two["cpu_s"][0])  # one round: the CPU-time ratio is the pinned process's over the busier shard's
    assert sc["cpu_time_speedup_two_vs_one"]["median"] == pytest.approx(one["cpu_s"][0][0] / busier)
    assert rd["same_batches"] and rd["same_tokens_read"] and rd["shards"] == 8
    for name in ("one_store", "dataset"):
        assert rd[name]["batches_per_s"] == pytest.approx(rd["batches"] / rd[name]["s"]["median"])
    assert rd["speed_dataset_vs_store"]["low"] <= rd["speed_dataset_vs_store"]["median"]


def test_gpu_script_tiny_without_torch_grain_vllm(tmp_path):
    # The whole script on CPU, as the GPU image would run it but with torch also gone: every section in its own
    # process, each merged into gpu_tiny.json as it ends; torch's and vLLM's sides skipped with the reason.
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--tiny", "--out", str(out), "--models", "qwen3-0.6b,qwen3-4b"],
        cwd=ROOT, env=_env(tmp_path / "blocked"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((out / "attention_check_tiny.json").read_text())
    assert check["ok"] is False and "GPU" in check["error"]  # recorded, not fatal, on a CPU
    doc = json.loads((out / "gpu_tiny.json").read_text())
    assert doc["errors"] == {} and doc["skipped"] == {}
    assert doc["machine"]["versions"]["torch"] is not None  # installed, yet unimportable in the child
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in doc["machine"]["xla_flags"]
    assert doc["attention_check"] == check
    # Running order: the attention check, the goal model, scoring, the rest; each section timed on its own.
    assert list(doc["section_seconds"]) == [
        "attention_check", "train_step/qwen3-4b", "precompute", "moe_check", "train_step/qwen3-0.6b"
    ]  # fmt: skip
    moe = json.loads((out / "moe_check_tiny.json").read_text())
    assert doc["moe_check"] == moe and moe["jax"] == jax.__version__
    assert moe["impls"]["padded"]["ok"] and moe["impls"]["ragged_dot"]["wall_s"]["n"] > 0
    assert "need an NVIDIA GPU" in moe["impls"]["triton"]["error"]  # recorded, not fatal, on a CPU
    rows = doc["results"]["train_step"]
    assert [r["name"] for r in rows] == ["qwen3-4b (tiny stand-in)", "qwen3-0.6b (tiny stand-in)"]
    _check_train_rows(rows, "full")
    for r in rows:  # one dtype policy for every row: bf16 params (fp32 moments: test_state_bytes_policy)
        assert (r["model"]["dtype"], r["model"]["param_dtype"], r["model"]["attention"]) == ("bfloat16",) * 2 + ("xla",)
        assert r["peak_scope"] == "this model's own process"
        assert r["fit_attempts"][-1]["xla_peak_bytes"] <= r["memory_budget_bytes"]
    assert doc["policy"].startswith("bf16 params and grads, fp32 AdamW moments")
    pre = doc["results"]["precompute"]
    assert "torch" in pre["torch"]["skipped"] and pre["vllm"]["skipped"] == "vllm is not installed"
    assert _positive(pre["jax_tokens_per_s"])
    md = (out / "gpu_tiny.md").read_text()
    assert "transformers skipped" in md and "qwen3-4b (tiny stand-in)" in md


def test_cpu_suite_refuses_an_unwritable_out_before_measuring(tmp_path):
    """--out that cannot hold the results is refused in one line, exit 2, before any section runs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--tiny", "--out", str(blocker / "results")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    want = f"error: --out {blocker / 'results'}: cannot create it (Not a directory)"
    assert proc.stderr.strip().splitlines() == [want]
    assert "[benchmarks]" not in proc.stdout and blocker.read_text() == "kept"


def test_gpu_script_without_gpu_refuses_in_one_line(tmp_path):
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no GPU" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not any(tmp_path.iterdir())


def test_gpu_suite_budget_skips_and_kills_saying_so(tmp_path):
    # Budget 1.5 s: the attention check starts (it needs ~1 s under --tiny) and is killed at the budget; every later
    # section is not started. All of it is in the report; the exit code says the run was not clean.
    from benchmarks import gpu_suite

    out = tmp_path / "out"
    args = ["--tiny", "--out", str(out), "--budget-s", "1.5", "--models", "qwen3-0.6b,qwen3-4b"]
    env = _env(tmp_path / "blocked")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads((out / "gpu_tiny.json").read_text())
    assert doc["attention_check"] == {
        "ok": False,
        "error": "attention_check process killed at the end of the time budget",
    }
    assert set(doc["skipped"]) == set(gpu_suite.plan(["qwen3-0.6b", "qwen3-4b"])[1:])
    assert all(v.startswith("not started: needs ~1 s") for v in doc["skipped"].values())
    assert [r["name"] for r in doc["results"]["train_step"]] == ["qwen3-4b", "qwen3-0.6b"]  # listed as skipped rows
    assert "## Skipped" in (out / "gpu_tiny.md").read_text()


def test_gpu_suite_plan_puts_the_goal_first_and_estimates_fit_the_budget():
    from benchmarks import gpu_suite

    sections = gpu_suite.plan(list(gpu_suite.DEFAULT_MODELS))
    assert sections[:3] == ["attention_check", "train_step/qwen3-4b", "precompute"]
    assert sorted(sections) == sorted(gpu_suite.ESTIMATE_S)
    # The attention check, the goal row and scoring fit the default budget with room; the rest as it allows.
    assert sum(gpu_suite.ESTIMATE_S[s] for s in sections[:3]) < 0.75 * 420


def test_every_benchmarks_module_imports_without_torch_grain_vllm(tmp_path):
    modules = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    code = "import importlib\n" + "".join(f"importlib.import_module('benchmarks.{m}')\n" for m in modules)
    code += "import sys; assert all(sys.modules[m] is None for m in ('torch', 'grain', 'vllm'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path / "blocked"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"run", "gpu_suite", "vs_torch", "lightning_vs_opd", "precompute_bench"} <= set(modules)


def test_vllm_model_dir_holds_a_tokenizer_covering_the_vocabulary(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks import precompute_bench

    cfg = common.TINY
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(0))
    precompute_bench.save_model_dir(str(tmp_path), cfg, params)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == cfg.vocab_size and tok.convert_tokens_to_ids(f"<{cfg.vocab_size - 1}>") == cfg.vocab_size - 1
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == cfg.vocab_size
    assert list(tmp_path.glob("*.safetensors"))


def test_state_bytes_policy_and_fp32_moments():
    from benchmarks import run, train_step

    cfg = run.gpu_train_config("qwen3-4b", tiny=False, attention="xla")
    assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("bfloat16", "bfloat16", "full")
    assert train_step.state_bytes(cfg) == 12 * presets.param_count(cfg)  # 2 params + 2 grads + 4 + 4 moments
    assert train_step.state_bytes(cfg) < 0.92 * 0.95 * 80e9 - 10e9  # fits an 80 GB H100 with 10 GB to spare
    small = run.gpu_train_config("qwen3-0.6b", tiny=True, attention="xla")
    optimizer = train_step.make_optimizer(small)
    params = jax.eval_shape(lambda: qwen3.init_params(small, jax.random.key(0)))
    state = jax.eval_shape(optimizer.init, params)
    dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim}
    assert dtypes == {jnp.dtype("float32")} and {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def test_report_merge_replaces_a_models_row_and_keeps_other_sections(tmp_path):
    from benchmarks import report

    header = {"suite": "gpu", "tiny": True, "run_id": "r1"}
    doc = report.load_run(tmp_path / "gpu.json", header)
    report.merge(doc, "train_step/a", {"name": "a", "skipped": "no batch fits"}, skipped="no batch fits")
    report.merge(doc, "extra", {"x": 1}, seconds=2.0)
    report.write(doc, tmp_path, "gpu")
    again = report.load_run(tmp_path / "gpu.json", header)
    report.merge(again, "train_step/a", {"name": "a", "tokens_per_s": 5})
    assert again["results"] == {"train_step": [{"name": "a", "tokens_per_s": 5}], "extra": {"x": 1}}
    assert report.load_run(tmp_path / "gpu.json", {**header, "run_id": "r2"})["results"] == {}  # another run
    assert not list(tmp_path.glob(".*tmp*"))  # written via rename, no leftovers


def test_next_batch_jumps_to_what_the_measured_row_cost_allows():
    from benchmarks.train_step import next_batch

    gib = 2**30
    # 16 rows compiled to 48 + 16 x 4 GiB = 112 GiB against a 70 GiB budget: 22 GiB / 4 GiB = 5 rows -> 4, not 8.
    assert next_batch(16, 112 * gib, 48 * gib, 70 * gib) == 4
    assert next_batch(16, 17 * gib, 1 * gib, 16 * gib) == 8  # just over: halving is the cap
    assert next_batch(4, 80 * gib, 60 * gib, 62 * gib) == 0  # not even one row: stop, do not compile 2 and 1


def test_moe_check_agreement_flops_and_report_lines():
    from benchmarks import moe_check, report

    cfg, tokens = moe_check.shapes(tiny=False)
    assert (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, tokens) == (2048, 128, 768, 5120)
    assert moe_check.layer_flops(cfg, tokens) == 9 * 2 * 40960 * 2048 * 768
    want = (np.ones((2, 3)), np.ones(3), {"gate": np.ones(2), "up": np.full(2, 4.0)})
    close = (want[0] * (1 + 1e-3), want[1], {"gate": want[2]["gate"], "up": want[2]["up"] - 0.01})
    far = (want[0], want[1], {"gate": want[2]["gate"], "up": want[2]["up"] * 0.9})
    assert moe_check._agreement(close, want)["ok"]
    bad = moe_check._agreement(far, want)
    assert not bad["ok"] and bad["max_rel_diff"]["d_up"] == pytest.approx(0.1) and bad["max_rel_diff"]["d_x"] == 0
    rec = {"wall_s": {"median": 2e-3}, "tflops_per_s": 3.0, "xla_temp_bytes": 2e9, "ok": True}
    doc = {"jax": "0.11.2", "device": "H100", "assignments": 40960, "hidden": 2048, "experts": 128,
           "moe_intermediate": 768, "impls": {"triton": rec, "padded": {"error": "ValueError: no"}}}  # fmt: skip
    lines = report._moe_lines(doc)
    assert lines[0] == "- jax 0.11.2, H100: 40960 assignments, D 2048, E 128, F 768"
    assert "- triton: 2.00 ms, 3.0 TFLOP/s, XLA temp 2.00 GB; agrees" in lines
    assert "- padded: failed: `ValueError: no`" in lines
