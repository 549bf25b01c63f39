"""Fused cuDNN attention with packed segments vs the XLA path: ``qwen3.forward`` with ``attention="cudnn"`` and
``attention="xla"`` on the same bf16 weights and packed batch (three sequences per row plus padding), logits and
parameter gradients compared. Never raises: an unsupported cuDNN path (no GPU, old cuDNN, a shape it refuses)
is recorded as the error it raised.

    python -m benchmarks.attention_check [--tiny] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lopd_jax.atomic import write_atomic
from lopd_jax.models import presets, qwen3
from lopd_jax.models.qwen3 import Qwen3Config

# bf16 operands on both paths, fp32 softmax statistics on both: differences come from bf16 rounding of the
# probabilities and the order of the sums. Agreement = within this fraction of the largest |logit| / |grad|.
RELATIVE_TOLERANCE = 2e-2


def packed_inputs(batch: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, T] and segment_ids [B, T]: three packed sequences of different lengths, then padding (id 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)
    seg = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq_len - seq_len // 8), 2, replace=False))
        bounds = [0, *cuts, seq_len - seq_len // 8]  # the last eighth of every row is padding
        for i in range(3):
            seg[b, bounds[i] : bounds[i + 1]] = i + 1
    return tokens, seg


def _loss(params, tokens, seg, cfg: Qwen3Config) -> tuple[jax.Array, jax.Array]:
    logits = qwen3.forward(params, tokens, cfg=cfg, segment_ids=seg).astype(jnp.float32)
    valid = (seg > 0)[..., None]
    return jnp.sum(jnp.where(valid, jax.nn.log_softmax(logits), 0.0)) / jnp.sum(valid), logits


def run_path(params, tokens, seg, cfg: Qwen3Config) -> tuple[np.ndarray, Any]:
    """Logits [B, T, V] fp32 and parameter gradients of a scalar loss through one attention backend."""
    fn = jax.jit(jax.value_and_grad(lambda p: _loss(p, tokens, seg, cfg), has_aux=True))
    (_, logits), grads = fn(params)
    return np.asarray(logits), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)


def check(cfg: Qwen3Config, batch: int, seq_len: int) -> dict[str, Any]:
    """Run both paths; the report holds the differences, or the cuDNN path's error."""
    tokens, seg = packed_inputs(batch, seq_len, cfg.vocab_size)
    params = jax.jit(qwen3.init_params, static_argnums=0)(
        dataclasses.replace(cfg, param_dtype="bfloat16"), jax.random.key(0)
    )
    report: dict[str, Any] = {
        "batch": batch,
        "seq_len": seq_len,
        "layers": cfg.num_hidden_layers,
        "backend": jax.default_backend(),
        "tolerance": RELATIVE_TOLERANCE,
    }
    start = time.perf_counter()
    ref_logits, ref_grads = run_path(params, tokens, seg, dataclasses.replace(cfg, attention="xla"))
    report["xla_s"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        logits, grads = run_path(params, tokens, seg, dataclasses.replace(cfg, attention="cudnn"))
        report["cudnn_s"] = time.perf_counter() - start
    except Exception as e:  # unsupported here: record it, never crash the GPU script
        report |= {
            "ok": False,
            "error": f"{type(e).__name__}: {str(e)[:1000]}",
            "trace": traceback.format_exc()[-2000:],
        }
        return report
    valid = seg > 0
    logit_diff = float(np.max(np.abs(logits - ref_logits)[valid]))
    grad_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    grad_scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
    logit_scale = float(np.max(np.abs(ref_logits[valid])))
    report |= {
        "max_abs_logit_diff": logit_diff,
        "max_abs_logit": logit_scale,
        "max_abs_grad_diff": grad_diff,
        "max_abs_grad": grad_scale,
        "ok": logit_diff <= RELATIVE_TOLERANCE * logit_scale and grad_diff <= RELATIVE_TOLERANCE * grad_scale,
    }
    return report


def shapes(tiny: bool) -> tuple[Qwen3Config, int, int]:
    """(config, batch, seq_len): two layers of the Qwen3-4B shape (32k vocab: attention is under test) at
    T = 4096, or the test-sized model."""
    if tiny:
        return dataclasses.replace(common.TINY, dtype="bfloat16"), 2, 64
    return presets.get_preset("qwen3-4b", dtype="bfloat16", num_hidden_layers=2, vocab_size=32768), 2, 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="test-sized model (runs anywhere)")
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    try:
        report = check(*shapes(args.tiny))
    except Exception as e:  # even the XLA path failed: still a report, still exit 0 for the script
        report = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:1000]}", "trace": traceback.format_exc()[-2000:]}
    report["device"] = jax.devices()[0].device_kind
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
