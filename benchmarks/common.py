"""Shared pieces of the benchmark harness: the machine, peak FLOP/s, the FLOP formula, timing, model shapes.

Everything here is measured side by side in one process: on shared CPUs the ratios are the result, the absolute
times are context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lopd_jax.data.batch import Batch
from lopd_jax.models import presets
from lopd_jax.models.presets import (  # noqa: F401  (re-exported: the model FLOP formulas live with the sizes)
    forward_flops_per_token,
    matmul_params,
    train_flops_per_token,
)
from lopd_jax.models.qwen3 import Qwen3Config
from lopd_jax.plan.targets import PEAKS

# Peak dense bf16 FLOP/s and HBM bandwidth per device kind: lopd_jax.plan.targets.PEAKS (sources cited there), the one
# table that --plan --target's roofline and the benchmarks' MFU both read.
#: (substring, peak FLOP/s): the FLOP column of PEAKS.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = tuple((k, f) for k, f, _ in PEAKS)


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` made if absent and checked writable before any measurement runs; else one ``error:`` line, exit 2."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        why = None if os.access(d, os.W_OK) else "not writable"
    except OSError as e:
        why = f"cannot create it ({e.strerror or e})"
    if why:
        print(f"error: {flag} {d}: {why}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return d


def device_peak_bandwidth(device: Any) -> float | None:
    """The data-sheet memory bandwidth (bytes/s) of an accelerator, None when its kind is not in PEAKS."""
    kind = device.device_kind.lower()
    return next((bw for key, _, bw in PEAKS if key.lower() in kind), None)


def device_peak_flops(device: Any) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for an accelerator; CPUs are measured (see cpu_matmul_peak)."""
    kind = device.device_kind
    for key, peak, _ in PEAKS:
        if key.lower() in kind.lower():
            return peak, f"data sheet, dense bf16 ({key})"
    if device.platform == "cpu":
        return cpu_matmul_peak(), "measured: best fp32 1024^3 matmul FLOP/s on this CPU (jnp.dot, all cores)"
    return float("nan"), f"unknown device kind {kind!r}: add it to lopd_jax.plan.targets.PEAKS"


def missing(*packages: str) -> str | None:
    """None when every package imports here, else the reason a section that needs them is skipped."""
    absent = [p for p in packages if not _importable(p)]
    return f"needs {', '.join(absent)}, not installed here" if absent else None


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a stub or a module whose __spec__ is None
        return False


def cpu_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s: the best of ``repeats`` n x n x n products. A CPU has no vendor bf16 figure
    that XLA:CPU reaches, so MFU on CPU is against what its own matmul kernel achieves on this (shared) machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------------------------

_SMALL = dict(head_dim=32, rope_theta=10_000.0, max_position_embeddings=4096, tie_word_embeddings=False)


def _demo_arch(name: str, fallback: Qwen3Config) -> Qwen3Config:
    """The demo's architecture file (configs/demo/<name>_arch.json), or ``fallback`` when it is absent."""
    from lopd_jax.models import hf

    path = Path(__file__).resolve().parents[1] / "configs" / "demo" / f"{name}_arch.json"
    if not path.is_file():
        return fallback
    return hf.config_from_hf(json.loads(path.read_text()), where=str(path))


#: The demo's student (2 x 128) and teacher (3 x 128): its 128-id vocabulary (configs/demo/*_arch.json).
DEMO_STUDENT = _demo_arch(
    "student",
    Qwen3Config(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **dict(_SMALL, head_dim=32, tie_word_embeddings=True),
    ),
)
DEMO_TEACHER = _demo_arch(
    "teacher",
    dataclasses.replace(DEMO_STUDENT, num_hidden_layers=3),  # the student is 2 x 128; the teacher 3 x 128
)
#: ~50M parameters (~33M in matmuls) on CPU: D 512, 12 layers, a 16k vocabulary.
CPU_50M = Qwen3Config(
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    **dict(_SMALL, head_dim=64),
)
#: A realistic CPU shape: ~35M parameters (a 32k vocabulary, 6 x 512, tied), B x T = 4 x 256.
CPU_35M = dataclasses.replace(CPU_50M, vocab_size=32000, num_hidden_layers=6, tie_word_embeddings=True)
#: The model forms a row can differ in (Qwen3Config fields). Their defaults ("auto") are what the trainer and the
#: engines run: on CPU unrolled layers, 2-D dots for the MLP and lm_head (the einsum form's own arithmetic) and
#: multiply-reduce decode attention. The sampling rows also time the accelerators' decode attention ("dot"), whose
#: last bits differ, in the same rounds: the A/B behind the CPU default.
FORM_FIELDS = ("scan_layers", "matmuls", "decode_attention")
OTHER_FORMS = {"decode_attention=dot": {"decode_attention": "dot"}}


def forms_of(cfg: Qwen3Config) -> str:
    """How a result row names the model's forms: the form fields that differ from the library's defaults."""
    changed = [f"{k}={getattr(cfg, k)}" for k in FORM_FIELDS if getattr(cfg, k) != getattr(Qwen3Config, k)]
    return ", ".join(changed) or "default forms"


#: Test-sized shapes for ``--tiny`` (D <= 64, 2 layers, vocab <= 512).
TINY = Qwen3Config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    **dict(_SMALL, head_dim=16),
)
TINY_TEACHER = dataclasses.replace(TINY, intermediate_size=192)


def tiny_preset(name: str) -> Qwen3Config:
    """A preset's family traits (GQA ratio, tie) at test size, standing in for the preset under ``--tiny``."""
    p = presets.get_preset(name)
    return dataclasses.replace(
        TINY,
        num_attention_heads=4,
        num_key_value_heads=max(1, 4 * p.num_key_value_heads // p.num_attention_heads),
        tie_word_embeddings=p.tie_word_embeddings,
    )


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def synthetic_batch(cfg: Qwen3Config, batch_size: int, seq_len: int, seed: int = 0, prompt_frac: float = 0.25):
    """A numpy OPD Batch [B, T]: one sequence per row filling it, the first ``prompt_frac`` masked as the prompt,
    random tokens and plausible teacher / behaviour log-probs (only their values, not their meaning, matter)."""
    rng = np.random.default_rng(seed)
    B, T = batch_size, seq_len
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, int(prompt_frac * T) :] = 1.0
    teacher = (-rng.exponential(2.0, (B, T)) * mask).astype(np.float32)
    behavior = (-rng.exponential(2.0, (B, T)) * mask).astype(np.float32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return Batch(tokens[:, :-1], tokens[:, 1:], pos, np.ones((B, T), np.int32), mask, teacher, behavior)


# ----------------------------------------------------------------------------------------------------------------
# Timing and statistics
# ----------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call (the caller blocks on device results inside ``fn``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(xs: list[float]) -> dict[str, float]:
    """min / median / max / n of a list of measurements."""
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def ratio(slow: dict[str, float], fast: dict[str, float]) -> dict[str, float]:
    """How many times faster ``fast`` is: median / median, plus the pessimistic (slow min / fast max) and the
    optimistic (slow max / fast min) bounds of the alternating runs."""
    return {
        "median": slow["median"] / fast["median"],
        "low": slow["min"] / fast["max"],
        "high": slow["max"] / fast["min"],
    }


def torch_thread_counts() -> list[int]:
    """torch's default intra-op thread count and 1. Its OpenMP threads spin-wait: on an oversubscribed host (other
    jobs on the same cores) that can cost 10x, so every torch measurement runs with both and keeps the faster."""
    import torch

    return sorted({torch.get_num_threads(), 1}, reverse=True)


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def best_of(times_by_threads: dict[int, list[float]]) -> tuple[str, dict[str, dict[str, float]]]:
    """(thread count with the lowest median, spreads keyed by thread count as strings)."""
    spreads = {str(n): spread(t) for n, t in times_by_threads.items()}
    return min(spreads, key=lambda n: spreads[n]["median"]), spreads


# ----------------------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------------------


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """CPU model and cores, the JAX backend and its devices, package versions, the date and XLA flags."""
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "backend": jax.default_backend(),
        "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()},
        "versions": {
            p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy", "vllm")
        },
        "python": platform.python_version(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def device_peak_memory(device: jax.Device) -> int | None:
    """The allocator's peak bytes in use on an accelerator (None where the backend keeps no statistics)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def device_memory_limit(device: jax.Device) -> int | None:
    """Bytes the allocator may use on an accelerator (None on CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ----------------------------------------------------------------------------------------------------------------
# The synthetic task (the demo's data)
# ----------------------------------------------------------------------------------------------------------------


#: The demo's task: five one-digit operands, the running sum spelled out (configs/demo.yaml, stage "task").
DEMO_TASK = dict(min_operands=5, max_operands=5, min_digits=1, max_digits=1, chain=True)


def task_sequences(n: int, seed: int = 0) -> tuple[list[list[int]], list[np.ndarray]]:
    """``n`` problems of the demo's task through its tokenizer: (chat-templated prompt ids, prompt + worked
    solution + <|im_end|> ids), i.e. what the demo's rollouts and teacher scoring see."""
    import tempfile

    from lopd_jax.data.prompts import encode_prompt
    from lopd_jax.demo import synthetic as syn

    rng = np.random.default_rng(seed)
    difficulty = syn.Difficulty(**DEMO_TASK)
    problems = [syn.make_problem(rng, difficulty) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = syn.build_tokenizer(tmp)
    prompts = [encode_prompt(tok, {"prompt": p["prompt"]}) for p in problems]
    answers = tok([p["solution"] + syn.EOS_TOKEN for p in problems], add_special_tokens=False)["input_ids"]
    return prompts, [np.asarray(p + a, np.int32) for p, a in zip(prompts, answers)]
