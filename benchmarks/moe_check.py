"""One Qwen3-30B-A3B-shaped MoE layer (``qwen3.moe_mlp``: 5120 tokens x 8 experts each = 40960 assignments,
D 2048, E 128, F 768, bf16) forward + backward with each grouped-matmul implementation on this device: time,
TFLOP/s, XLA's temp bytes, the device's peak, and agreement with ``lax.ragged_dot``. Also the Triton kernels alone
with each tile candidate (``grouped_matmul.TILE_CANDIDATES``), and ``lax.ragged_dot`` with XLA's cuDNN ragged-dot
fusion flag (in a child process: XLA reads its flags once). Never raises: an implementation that fails (triton
off a GPU, the fusion flag's crash) is recorded with its error.

    python -m benchmarks.moe_check [--tiny] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lopd_jax.atomic import write_atomic
from lopd_jax.models import grouped_matmul as gm
from lopd_jax.models import presets, qwen3

# bf16 operands, fp32 accumulation everywhere: differences come from the order of the sums and bf16 rounding of the
# outputs. Agreement = within this fraction of the largest |value| of the reference, per array.
RELATIVE_TOLERANCE = 2e-2
IMPLS = ("ragged_dot", "triton", "padded")  # scan: E x the FLOPs, a memory stand-in, not timed
FUSION_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"
REPEATS = {False: 10, True: 2}  # timed calls per implementation (by --tiny)


def shapes(tiny: bool) -> tuple[qwen3.Qwen3Config, int]:
    """(config, tokens): the 30B-A3B layer at 5120 tokens (one 5120-token rollout), or a test-sized one."""
    cfg = presets.get_preset("qwen3-30b-a3b", dtype="bfloat16", param_dtype="bfloat16")
    if tiny:
        cfg = dataclasses.replace(cfg, hidden_size=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
        return cfg, 48
    return cfg, 5120


def _normal(key: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
    return (scale * jax.random.normal(key, shape)).astype(jnp.bfloat16)


def inputs(cfg: qwen3.Qwen3Config, tokens: int, seed: int = 0) -> tuple[jax.Array, dict, jax.Array]:
    """x [1, X, D], the layer's weights (router scaled so the routing is skewed, as a trained router's) and the
    output cotangent, bf16, the same on every run."""
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    k = jax.random.split(jax.random.key(seed), 6)
    mp = {
        "router": _normal(k[0], (D, E), 0.5),
        "gate": _normal(k[1], (E, D, F), D**-0.5),
        "up": _normal(k[2], (E, D, F), D**-0.5),
        "down": _normal(k[3], (E, F, D), F**-0.5),
    }
    return _normal(k[4], (1, tokens, D), 1.0), mp, _normal(k[5], (1, tokens, D), 1.0)


def layer_grads(cfg: qwen3.Qwen3Config):
    """jitted (x, weights, cotangent) -> (out, d x, d weights) of ``qwen3.moe_mlp`` under ``cfg.moe_impl``."""

    def f(x, mp, ct):
        out, vjp = jax.vjp(lambda x, mp: qwen3.moe_mlp(x, mp, cfg), x, mp)
        return (out, *vjp(ct))

    return jax.jit(f)


def layer_flops(cfg: qwen3.Qwen3Config, tokens: int) -> float:
    """Useful FLOPs of the grouped matmuls: 3 of 2 A D F each, forward and twice backward (d lhs, d rhs)."""
    A = tokens * cfg.num_experts_per_tok
    return 3 * 3 * 2 * A * cfg.hidden_size * cfg.moe_intermediate_size


def _time(fn, *args, repeats: int = REPEATS[False]) -> dict[str, float]:
    jax.block_until_ready(fn(*args))  # compile and warm up
    return common.spread([common.timed(lambda: jax.block_until_ready(fn(*args))) for _ in range(repeats)])


def _agreement(got, want) -> dict[str, Any]:
    """max |got - want| / max |want| per array (output, d x, d weight by name); ok when all are within tolerance."""
    names = ["out", "d_x", *(f"d_{k}" for k in sorted(want[2]))]
    rel = {}
    for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rel[name] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
    return {"max_rel_diff": rel, "ok": all(v <= RELATIVE_TOLERANCE for v in rel.values())}


def run_impl(
    cfg: qwen3.Qwen3Config, tokens: int, impl: str, reference=None, repeats: int = REPEATS[False]
) -> tuple[dict[str, Any], Any]:
    """One implementation's record (time, TFLOP/s, memory, agreement with ``reference``) and its results."""
    x, mp, ct = inputs(cfg, tokens)
    fn = layer_grads(dataclasses.replace(cfg, moe_impl=impl))
    rec: dict[str, Any] = {"impl": gm.resolve_moe_impl(impl, jax.default_backend())}
    compiled = fn.lower(x, mp, ct).compile()
    mem = compiled.memory_analysis()
    rec["xla_temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
    rec["wall_s"] = _time(compiled, x, mp, ct, repeats=repeats)
    rec["tflops_per_s"] = layer_flops(cfg, tokens) / rec["wall_s"]["median"] / 1e12
    rec["device_peak_bytes_so_far"] = common.device_peak_memory(jax.devices()[0])
    results = compiled(x, mp, ct)
    if reference is not None:
        rec |= _agreement(results, reference)
    return rec, results


def _guarded(fn, *args) -> tuple[dict[str, Any], Any]:
    try:
        return fn(*args)
    except Exception as e:  # recorded, never fatal: the next implementation still runs
        return {"error": f"{type(e).__name__}: {str(e)[:1000]}", "trace": traceback.format_exc()[-1500:]}, None


def triton_tiles(cfg: qwen3.Qwen3Config, tokens: int) -> dict[str, Any]:
    """The three grouped matmuls' kernels alone (up projection shape, forward + backward) per tile candidate."""
    x, mp, ct = inputs(cfg, tokens)
    A, R = tokens * cfg.num_experts_per_tok, cfg.num_experts_per_tok
    _, experts_XR = qwen3.route(x[0], mp["router"], cfg)
    sizes = jnp.bincount(experts_XR.reshape(-1), length=cfg.num_experts).astype(jnp.int32)
    lhs = jnp.repeat(x[0], R, axis=0)
    out = {}
    for name, tiles in gm.TILE_CANDIDATES.items():

        def f(lhs, w, sizes, tiles=tiles):
            y, vjp = jax.vjp(lambda a, b: gm.grouped_matmul_triton(a, b, sizes, False, tiles), lhs, w)
            return y, *vjp(jnp.ones_like(y))

        rec, _ = _guarded(lambda: ({"wall_s": _time(jax.jit(f), lhs, mp["up"], sizes)}, None))
        if "wall_s" in rec:
            flops = 3 * 2 * A * cfg.hidden_size * cfg.moe_intermediate_size
            rec["tflops_per_s"] = flops / rec["wall_s"]["median"] / 1e12
        out[name] = rec
    return out


def fusion_child(tiny: bool) -> dict[str, Any]:
    """``lax.ragged_dot`` under XLA's cuDNN ragged-dot fusion flag, in a child process; compared with ``padded``
    there (pure XLA, untouched by the flag; the parent compares ``padded`` with the unfused ragged_dot)."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FUSION_FLAG}".strip())
    cmd = [sys.executable, "-m", "benchmarks.moe_check", "--fusion-child", *(["--tiny"] if tiny else [])]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"flag": FUSION_FLAG, "error": "timed out after 300 s"}
    try:
        return {"flag": FUSION_FLAG, **json.loads(proc.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError):
        return {"flag": FUSION_FLAG, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"}


def check(tiny: bool) -> dict[str, Any]:
    cfg, tokens = shapes(tiny)
    report: dict[str, Any] = {
        "tokens": tokens,
        "assignments": tokens * cfg.num_experts_per_tok,
        "hidden": cfg.hidden_size,
        "experts": cfg.num_experts,
        "moe_intermediate": cfg.moe_intermediate_size,
        "dtype": cfg.dtype,
        "flops": layer_flops(cfg, tokens),
        "tolerance": RELATIVE_TOLERANCE,
        "tiles": {"gmm": dataclasses.asdict(gm.GMM_TILES), "tgmm": dataclasses.asdict(gm.TGMM_TILES)},
        "padded_bm": gm.PADDED_BM,
    }
    impls: dict[str, Any] = {}
    reference = None
    for impl in IMPLS:  # ragged_dot first: the reference
        impls[impl], results = _guarded(run_impl, cfg, tokens, impl, reference, REPEATS[tiny])
        if impl == "ragged_dot":
            reference = results
    report["impls"] = impls
    report["triton_tiles"] = triton_tiles(cfg, tokens)
    report["ragged_dot_fusion"] = fusion_child(tiny)
    return report


def _fusion_child_main(tiny: bool) -> int:
    cfg, tokens = shapes(tiny)
    padded, want = _guarded(run_impl, cfg, tokens, "padded", None, REPEATS[tiny])
    rec, _ = _guarded(run_impl, cfg, tokens, "ragged_dot", want, REPEATS[tiny])
    print(json.dumps(rec if want is not None else {"error": f"padded failed: {padded.get('error')}"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="test-sized layer (runs anywhere)")
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    parser.add_argument("--fusion-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fusion_child:
        return _fusion_child_main(args.tiny)
    start = time.perf_counter()
    try:
        report = check(args.tiny)
    except Exception as e:  # still a report, still exit 0 for the script
        report = {"error": f"{type(e).__name__}: {str(e)[:1000]}", "trace": traceback.format_exc()[-2000:]}
    report |= {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seconds": time.perf_counter() - start}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
