"""The benchmark harness: one command measures a suite and writes JSON + Markdown (+ a PNG of the ratios).

    python -m benchmarks.run --suite cpu [--tiny] [--out benchmarks/results]
    python -m benchmarks.run --suite gpu [--tiny] [--attention-check FILE] [--models qwen3-0.6b,qwen3-4b]

cpu: training step (demo-sized student, ~50M config), jitted OPD step vs PyTorch eager, teacher scoring JAX vs
transformers, Lightning vs standard OPD on the demo models.
gpu: teacher scoring (Qwen3-0.6B shape, bf16; JAX vs transformers on the GPU, vs vLLM if it imports), then the
training step of Qwen3-0.6B/1.7B/4B/8B-shaped random weights (bf16, T = 4096, full remat, largest batch that
fits; sizes that fit no batch are skipped and say so). ``benchmarks/gpu.sh`` runs it with the XLA flags set.
``--tiny`` swaps every shape for test-sized ones (runs anywhere in about a minute; the tests use it).

Each section runs on its own: a failure is recorded under ``errors`` and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import common, report
from benchmarks import lightning_vs_opd as lvo
from benchmarks import precompute_bench as pre
from benchmarks import train_step as ts
from benchmarks import vs_torch as vt
from lopd_jax.models import presets

GPU_PRESETS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")
GOALS = {"vs_torch": 1.5, "precompute": 1.5, "lightning_vs_opd": 3.0, "gpu_mfu_qwen3-4b": 0.45}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape and repeat count of a suite (the real ones, or the ``--tiny`` ones)."""

    train: tuple[tuple[str, Any, int, int], ...]  # (name, Qwen3Config, batch, seq_len)
    train_steps: int
    torch: tuple[Any, int, int, int, int]  # (cfg, batch, seq_len, rounds, steps per round)
    scoring: tuple[Any, int, int]  # (teacher cfg, sequences, rounds)
    lightning: tuple[Any, Any, int, int, int, int, int]  # (student, teacher, B, T, max_new, steps, rounds)


CPU = Sizes(
    train=(("demo-student", common.DEMO_STUDENT, 32, 96), ("cpu-50m", common.CPU_50M, 2, 256)),
    train_steps=3,
    torch=(common.DEMO_STUDENT, 32, 96, 5, 3),
    scoring=(common.DEMO_TEACHER, 256, 3),
    lightning=(common.DEMO_STUDENT, common.DEMO_TEACHER, 32, 96, 40, 5, 2),
)
# Test-sized: the train step, the torch comparison and Lightning share one update-step shape (one compile).
TINY = Sizes(
    train=(("tiny", common.TINY, 4, 64),),
    train_steps=2,
    torch=(common.TINY, 4, 64, 2, 1),
    scoring=(common.TINY_TEACHER, 16, 1),
    lightning=(common.TINY, common.TINY_TEACHER, 4, 64, 8, 2, 1),
)


# ----------------------------------------------------------------------------------------------------------------
# CPU suite
# ----------------------------------------------------------------------------------------------------------------


def cpu_sections(sizes: Sizes, peak: float) -> dict[str, Callable[[], Any]]:
    def train():
        return [ts.bench_train_step(n, c, b, t, sizes.train_steps, peak) for n, c, b, t in sizes.train]

    def scoring():
        cfg, n, rounds = sizes.scoring
        return pre.bench_scoring(cfg, common.task_sequences(n, seed=2)[1], rounds)

    return {
        "train_step": train,
        "vs_torch": lambda: vt.bench_vs_torch(*sizes.torch),
        "precompute": scoring,
        "lightning_vs_opd": lambda: lvo.bench_lightning_vs_opd(*sizes.lightning),
    }


# ----------------------------------------------------------------------------------------------------------------
# GPU suite
# ----------------------------------------------------------------------------------------------------------------


def gpu_train_config(name: str, tiny: bool, attention: str, budget: int) -> Any:
    """The preset (or its test-sized stand-in) in bf16 with full remat; fp32 master weights and Adam moments when
    they take under 60% of the memory budget, else bf16 ones (recorded in the result's model.param_dtype)."""
    base = common.TINY if tiny else presets.get_preset(name)
    cfg = dataclasses.replace(base, dtype="bfloat16", param_dtype="float32", remat="full", attention=attention)
    if ts.state_bytes(cfg) > 0.6 * budget:
        cfg = dataclasses.replace(cfg, param_dtype="bfloat16")
    return cfg


def gpu_train(names: tuple[str, ...], tiny: bool, attention: str, peak: float, steps: int) -> list[dict]:
    device = jax.devices()[0]
    limit = common.device_memory_limit(device)
    budget = int(0.92 * limit) if limit else 256 * 2**20  # CPU (--tiny): a nominal 256 MiB "device"
    seq_len = 64 if tiny else 4096
    out = []
    for name in names:
        cfg = gpu_train_config(name, tiny, attention, budget)
        start = ts.first_guess_batch(cfg, seq_len, budget, cap=8 if tiny else 64)
        batch, precompiled, tried = ts.largest_fitting_batch(cfg, seq_len, budget, start)
        if batch is None:
            out.append({"name": name, "skipped": f"no batch fits {budget / 2**30:.1f} GiB", "tried": tried})
            continue
        label = f"{name} (tiny stand-in)" if tiny else name
        res = ts.bench_train_step(label, cfg, batch, seq_len, steps, peak, precompiled=precompiled)
        out.append(res | {"fit_attempts": tried, "memory_budget_bytes": budget})
    return out


def _attention_backend(requested: str, check: dict | None) -> str:
    if requested != "auto":
        return requested
    return "cudnn" if check and check.get("ok") else "xla"


def gpu_sections(args, sizes: Sizes, peak: float, check: dict | None) -> dict[str, Callable[[], Any]]:
    attention = _attention_backend(args.attention, check)
    names = tuple(args.models.split(",")) if args.models else GPU_PRESETS

    def scoring():
        if args.tiny:
            cfg, n, rounds = dataclasses.replace(common.TINY_TEACHER, dtype="bfloat16"), 16, 1
            samples = common.task_sequences(n, seed=2)[1]
        else:
            cfg, rounds = presets.get_preset("qwen3-0.6b", dtype="bfloat16"), 2
            rng = np.random.default_rng(0)
            samples = [rng.integers(0, cfg.vocab_size, int(n), dtype=np.int32) for n in rng.integers(512, 2048, 256)]
        device = "cuda" if _torch_cuda() else "cpu"
        dtype = "bfloat16"
        return pre.bench_scoring(cfg, samples, rounds, 16384, dtype, device, with_vllm=True)

    sections = {"precompute": scoring}
    sections["train_step"] = lambda: gpu_train(names, args.tiny, attention, peak, 2 if args.tiny else 5)
    return sections


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run_sections(sections: dict[str, Callable[[], Any]]) -> tuple[dict, dict, dict]:
    results, errors, seconds = {}, {}, {}
    for name, fn in sections.items():
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", flush=True)
        try:
            results[name] = fn()
        except Exception as e:  # one broken section must not lose the others' numbers
            errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            print(f"[benchmarks] {name} FAILED: {type(e).__name__}: {e}", flush=True)
        seconds[name] = time.perf_counter() - start
        print(f"[benchmarks] {name} done in {seconds[name]:.1f} s", flush=True)
    return results, errors, seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    p.add_argument("--tiny", action="store_true", help="test-sized shapes and counts")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON / Markdown / PNG")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all of the suite)")
    p.add_argument("--models", default="", help=f"gpu: presets to measure (default {','.join(GPU_PRESETS)})")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto", help="gpu: attention backend")
    p.add_argument("--attention-check", default=None, help="gpu: JSON written by benchmarks.attention_check")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    peak, peak_source = common.device_peak_flops(device)
    check = json.loads(Path(args.attention_check).read_text()) if args.attention_check else None
    sizes = TINY if args.tiny else CPU
    sections = cpu_sections(sizes, peak) if args.suite == "cpu" else gpu_sections(args, sizes, peak, check)
    if args.only:
        sections = {k: v for k, v in sections.items() if k in args.only.split(",")}
    start = time.perf_counter()
    results, errors, seconds = run_sections(sections)
    doc = {
        "suite": args.suite,
        "tiny": args.tiny,
        "machine": common.describe_machine(),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "goals": GOALS,
        "note": args.note,
        "attention_check": check,
        "results": results,
        "errors": errors,
        "section_seconds": seconds,
        "total_seconds": time.perf_counter() - start,
    }
    paths = report.write(doc, Path(args.out), f"{args.suite}{'_tiny' if args.tiny else ''}")
    print("[benchmarks] wrote " + ", ".join(str(p) for p in paths), flush=True)
    return doc


if __name__ == "__main__":
    main()
