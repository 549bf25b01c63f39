"""Where the time of the jitted OPD update step goes, by ablation (CPU-friendly, no profiler plugin needed).

    python -m benchmarks.profile_step [--model demo-student|cpu-50m|tiny] [--batch 16] [--seq 128] [--repeats 5]
                                      [--trace DIR]

Times, each jitted on its own and run ``repeats`` times after a warm-up (medians): the full step (the trainer's,
``lopd_jax.training.step.build``); the loss and its gradient; the forward + loss alone; the optimizer update alone; the
gradient with ``attention="ablated"`` in the model config, a pass-through (attention's share); and the gradient
with the lm_head / log-prob part only (the output layer's share). The differences say which part to optimise.
``--trace DIR`` also records a JAX profiler trace of the gradient and sums the compiled program's op time by kind
(matmuls, layout copies/transposes, elementwise, scan stacking), read back with ``jax.profiler.ProfileData``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_step import build_step, make_state, place_batch
from lopd_jax import losses
from lopd_jax.models import qwen3

MODELS = {
    "demo-student": common.DEMO_STUDENT,
    "demo-teacher": common.DEMO_TEACHER,
    "cpu-35m": common.CPU_35M,
    "cpu-50m": common.CPU_50M,
    "tiny": common.TINY,
}


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def profile(cfg, batch_size: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each piece (see the module docstring)."""
    built = build_step(cfg)  # the trainer's own step (lopd_jax.training.step.build)
    state, optimizer = make_state(built, cfg), built.optimizer
    batch = place_batch(built, common.synthetic_batch(cfg, batch_size, seq_len))
    loss_cfg = losses.LossConfig()
    loss = functools.partial(losses.opd_loss, cfg=cfg, loss_cfg=loss_cfg)
    grad = jax.jit(jax.grad(lambda p, b: loss(p, b)[0]))
    out = {"forward+loss": _median_ms(jax.jit(lambda p, b: loss(p, b)[0]), state.params, batch, repeats=repeats)}
    out["forward (hidden states)"] = _median_ms(
        jax.jit(lambda p, b: qwen3.forward(p, b.inputs, cfg=cfg, segment_ids=b.segment_ids, return_hidden=True)),
        state.params,
        batch,
        repeats=repeats,
    )
    out["loss+grad"] = _median_ms(grad, state.params, batch, repeats=repeats)
    grads = grad(state.params, batch)
    out["optimizer update"] = _median_ms(
        jax.jit(optimizer.update), grads, state.opt_state, state.params, repeats=repeats
    )
    # Attention's share: the same model with attention="ablated" (v passed through, no scores), a config value.
    ablated = functools.partial(losses.opd_loss, cfg=dataclasses.replace(cfg, attention="ablated"), loss_cfg=loss_cfg)
    out["loss+grad, attention ablated"] = _median_ms(
        jax.jit(jax.grad(lambda p, b: ablated(p, b)[0])), state.params, batch, repeats=repeats
    )
    no_layers = dataclasses.replace(cfg, num_hidden_layers=0)
    out["loss+grad, no decoder layers"] = _median_ms(
        jax.jit(jax.grad(lambda p, b: losses.opd_loss(p, b, cfg=no_layers, loss_cfg=loss_cfg)[0])),
        _strip_layers(state.params),
        batch,
        repeats=repeats,
    )
    compiled = built.step.lower(state, batch).compile()

    def run(s):
        s, m = compiled(s, batch)
        jax.block_until_ready(m["train/loss"])
        return s

    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state = run(state)
        times.append(time.perf_counter() - start)
    out["full update step"] = 1e3 * float(np.median(times[1:]))
    return out


def _op_kind(name: str) -> str | None:
    """Bucket of an XLA op event name (CPU thunk names); None for containers (while loops, the executor)."""
    if name.startswith(("while", "conditional", "ThunkExecutor")):
        return None
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or "dot" in name or "convolution" in name:
        return "matmuls (YNNPACK/XNNPACK/oneDNN/dot)"
    if name.startswith("copy") or "transpose" in name:
        return "layout copies / transposes"
    if "dynamic-update-slice" in name or "dynamic-slice" in name:
        return "scan stacking (dynamic-(update-)slice)"
    if "scatter" in name or "gather" in name:
        return "gather / scatter"
    return "other (elementwise / reduction fusions)"


def trace_breakdown(fn, args, trace_dir: str, calls: int = 2) -> dict[str, float]:
    """Milliseconds per call of the op kinds (``_op_kind``) executed by ``fn``, summed over XLA's worker threads."""
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    jax.profiler.start_trace(trace_dir)
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    newest = max(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    totals: dict[str, float] = {}
    for plane in ProfileData.from_file(str(newest)).planes:
        for line in plane.lines:
            if line.name.startswith(("python", "tf_XLAPjRt")):  # the caller waiting, not the work
                continue
            for ev in line.events:
                kind = _op_kind(ev.name)
                if kind:
                    totals[kind] = totals.get(kind, 0.0) + ev.duration_ns / 1e6 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _strip_layers(params):
    """Params with zero decoder layers (embed, final norm, lm_head kept)."""
    return jax.tree.map(lambda x: x[:0], {k: v for k, v in params.items() if k in ("layers", "mlp")}) | {
        k: v for k, v in params.items() if k not in ("layers", "mlp", "moe")
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo-student")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace", default=None, help="also trace the gradient into DIR and break it down by op kind")
    p.add_argument(
        "--accelerator-forms",
        action="store_true",
        help="scanned layers and einsum matmuls (what the defaults resolve to on GPU / TPU) instead of the defaults",
    )
    args = p.parse_args(argv)
    cfg = MODELS[args.model]
    cfg = dataclasses.replace(cfg, scan_layers=True, matmuls="einsum") if args.accelerator_forms else cfg
    res = profile(cfg, args.batch, args.seq, args.repeats)
    width = max(map(len, res))
    for name, ms in res.items():
        print(f"{name:<{width}}  {ms:9.1f} ms  ({ms / res['full update step']:5.0%} of the step)")
    if args.trace:
        built = build_step(cfg)
        state = make_state(built, cfg)
        batch = place_batch(built, common.synthetic_batch(cfg, args.batch, args.seq))
        loss_cfg = losses.LossConfig()
        grad = jax.jit(jax.grad(lambda p, b: losses.opd_loss(p, b, cfg=cfg, loss_cfg=loss_cfg)[0]))
        kinds = trace_breakdown(grad, (state.params, batch), args.trace)
        total = sum(kinds.values())
        print("loss+grad by op kind (thread time per call):")
        for kind, ms in kinds.items():
            print(f"  {kind:<42} {ms:9.1f} ms  ({ms / total:5.1%})")
        res = res | {f"trace: {k}": v for k, v in kinds.items()}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
