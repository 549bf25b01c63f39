"""Which exact grouped matmul ``moe_impl: auto`` should run on CPU: ``qwen3.moe_mlp`` forward + backward (fp32)
with ragged_dot, padded and scan, timed in alternating rounds in one process (the CPU is shared: ratios of
interleaved runs, not absolute times, are the result).

    python -m benchmarks.moe_cpu [--rounds 5]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import common
from lopd_jax.models import qwen3

# (tokens X, D, E, R, F): the tests' MoE, a demo-sized student's MoE, and more experts at that size.
SHAPES = {"tests": (26, 32, 8, 2, 16), "small": (512, 256, 8, 2, 128), "many_experts": (512, 256, 64, 8, 64)}
IMPLS = ("ragged_dot", "padded", "scan")


def layer(shape: tuple[int, ...], impl: str):
    X, D, E, R, F = shape
    cfg = qwen3.Qwen3Config(
        vocab_size=8, hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, num_experts=E, num_experts_per_tok=R, moe_intermediate_size=F,
        moe_impl=impl,
    )  # fmt: skip
    k = jax.random.split(jax.random.key(0), 5)
    mp = {
        "router": jax.random.normal(k[0], (D, E)),
        "gate": jax.random.normal(k[1], (E, D, F)) * D**-0.5,
        "up": jax.random.normal(k[2], (E, D, F)) * D**-0.5,
        "down": jax.random.normal(k[3], (E, F, D)) * F**-0.5,
    }
    x = jax.random.normal(k[4], (1, X, D))
    fn = jax.jit(jax.grad(lambda x, mp: jnp.sum(jnp.sin(qwen3.moe_mlp(x, mp, cfg))), argnums=(0, 1)))
    jax.block_until_ready(fn(x, mp))
    return lambda: jax.block_until_ready(fn(x, mp))


def measure(rounds: int) -> dict:
    out = {}
    for name, shape in SHAPES.items():
        fns = {impl: layer(shape, impl) for impl in IMPLS}
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for _ in range(rounds):  # alternating: load changes hit every implementation alike
            for impl in IMPLS:
                times[impl].append(min(common.timed(fns[impl]) for _ in range(3)))
        spreads = {impl: common.spread(t) for impl, t in times.items()}
        best = min(IMPLS, key=lambda i: spreads[i]["median"])
        out[name] = {
            "shape_X_D_E_R_F": shape,
            "seconds": spreads,
            "fastest": best,
            "slowdown_vs_fastest": {i: common.ratio(spreads[i], spreads[best]) for i in IMPLS},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps({"jax": jax.__version__, **measure(args.rounds)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
