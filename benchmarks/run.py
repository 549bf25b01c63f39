"""The benchmark harness: one command measures a suite and writes JSON + Markdown (+ a PNG of the ratios).

    python -m benchmarks.run --suite cpu [--tiny] [--out benchmarks/results]
    python -m benchmarks.run --suite gpu [--tiny] [--attention-check FILE] [--models qwen3-0.6b,qwen3-4b]

cpu: training step (demo-sized student, ~50M config), jitted OPD step vs PyTorch eager, teacher scoring JAX vs
transformers, Lightning vs standard OPD on the demo models.
gpu: teacher scoring (Qwen3-0.6B shape, bf16; JAX vs transformers on the GPU, vs vLLM if it imports), and one
section per model, ``train_step/<preset>``: the training step of Qwen3-0.6B/1.7B/4B/8B-shaped random weights
(train_step.GPU_POLICY, T = 4096, the largest batch that fits; a model that fits none is skipped and says so).
``benchmarks/gpu.sh`` runs each GPU section in its own process (``--only SECTION``) within a time budget, so that
each section's peak memory is its own. ``--tiny`` swaps every shape for test-sized ones (the tests use it).

Each section's outcome is merged into ``<out>/<suite>.json`` and ``.md`` the moment it ends (a timeout loses only
the unfinished section); a failure is recorded under ``errors``, a section whose module cannot be imported here
(torch, math-verify missing) under ``skipped`` with the reason, and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import common, gpu_suite, report
from benchmarks import precompute_bench as pre
from benchmarks import train_step as ts
from lopd_jax.models import presets

GPU_PRESETS = gpu_suite.DEFAULT_MODELS  # the driver (gpu.sh) and a direct --suite gpu measure the same models
# The CPU goals: the update step >= 1.0x torch at the demo's shape and >= 1.25x at the 35M one, sampling >= 2x
# transformers.generate at batch 32, teacher scoring >= 1.5x, a Lightning step >= 2.5x a standard OPD step.
GOALS = {
    "vs_torch": 1.0,
    "vs_torch_35m": 1.25,
    "sampling": 2.0,
    "precompute": 1.5,
    "lightning_vs_opd": 2.5,
    "gpu_mfu_qwen3-4b": 0.45,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape and repeat count of a suite (the real ones, or the ``--tiny`` ones)."""

    train: tuple[tuple[str, Any, int, int], ...]  # (name, Qwen3Config, batch, seq_len)
    train_steps: int
    torch: tuple[Any, int, int, int, int]  # (cfg, batch, seq_len, rounds, steps per round)
    scoring: tuple[Any, int, int]  # (teacher cfg, sequences, rounds)
    lightning: tuple[Any, Any, int, int, int, int, int]  # (student, teacher, B, T, max_new, steps, rounds)
    torch_35m: tuple[Any, int, int, int, int] | None = None  # like torch, at the 35M shape (cpu only)
    # (cfg, batch sizes, prompt, new, rounds, other forms also timed)
    sampling: tuple[Any, tuple[int, ...], int, int, int, dict] | None = None


CPU = Sizes(
    train=(("demo-student", common.DEMO_STUDENT, 32, 96), ("cpu-50m", common.CPU_50M, 2, 256)),
    train_steps=3,
    torch=(common.DEMO_STUDENT, 32, 96, 5, 3),  # every row runs the library's default forms
    scoring=(common.DEMO_TEACHER, 256, 3),
    lightning=(common.DEMO_STUDENT, common.DEMO_TEACHER, 32, 96, 40, 5, 2),
    torch_35m=(common.CPU_35M, 4, 256, 3, 2),
    sampling=(common.DEMO_STUDENT, (1, 32, 256), 16, 40, 3, common.OTHER_FORMS),
)
# Test-sized: the train step, the torch comparison and Lightning share one update-step shape (one compile).
TINY = Sizes(
    train=(("tiny", common.TINY, 4, 64),),
    train_steps=2,
    torch=(common.TINY, 4, 64, 2, 1),
    scoring=(common.TINY_TEACHER, 16, 1),
    lightning=(common.TINY, common.TINY_TEACHER, 4, 64, 8, 2, 1),
    sampling=(common.TINY, (1, 4), 8, 4, 1, common.OTHER_FORMS),
)


# ----------------------------------------------------------------------------------------------------------------
# Sections: name -> (modules it imports, function of those modules). The modules are imported when the section
# runs, so a missing package (torch, math-verify) skips that section with the reason instead of failing the suite.
# ----------------------------------------------------------------------------------------------------------------

Section = tuple[tuple[str, ...], Callable[..., Any]]


def cpu_sections(sizes: Sizes, peak: float) -> dict[str, Section]:
    def train():
        return [ts.bench_train_step(n, c, b, t, sizes.train_steps, peak) for n, c, b, t in sizes.train]

    def scoring():
        cfg, n, rounds = sizes.scoring
        return pre.bench_scoring(cfg, common.task_sequences(n, seed=2)[1], rounds)

    sections: dict[str, Section] = {
        "train_step": ((), train),
        "vs_torch": (("benchmarks.vs_torch",), lambda vt: vt.bench_vs_torch(*sizes.torch)),
        "precompute": (("lopd_jax.demo.synthetic",), lambda _: scoring()),  # the demo's task: math-verify via eval
        "lightning_vs_opd": (
            ("benchmarks.lightning_vs_opd",),
            lambda lvo: lvo.bench_lightning_vs_opd(*sizes.lightning),
        ),
        # Sharded precompute: 1 vs 2 pinned scoring processes, the trainer's reader on 8 shards vs one store.
        "shards": (
            ("benchmarks.shards_bench", "grain"),
            lambda sb, _: sb.bench_shards(sb.TINY if sizes is TINY else sb.CPU),
        ),
    }
    if sizes.torch_35m:
        sections["vs_torch_35m"] = (("benchmarks.vs_torch",), lambda vt: vt.bench_vs_torch(*sizes.torch_35m))
    if sizes.sampling:
        sections["sampling"] = (("benchmarks.sampling_bench",), lambda sb: sb.bench_sampling(*sizes.sampling))
    return sections


# ----------------------------------------------------------------------------------------------------------------
# GPU suite
# ----------------------------------------------------------------------------------------------------------------


def gpu_train_config(name: str, tiny: bool, attention: str) -> Any:
    """The preset (or its test-sized stand-in) under train_step.GPU_POLICY: bf16 params, full remat."""
    base = common.TINY if tiny else presets.get_preset(name)  # one tiny shape: one compile, cached across models
    return dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16", remat="full", attention=attention)


def gpu_train(name: str, tiny: bool, attention: str, peak: float) -> dict[str, Any]:
    """One model's row: the largest batch (<= 16 rows of T = 4096) whose compiled peak fits 92% of the card, then
    one warm-up and 3 timed steps (2 under --tiny). Skipped, without compiling, when the state alone cannot fit."""
    limit = common.device_memory_limit(jax.devices()[0])
    budget = int(0.92 * limit) if limit else 256 * 2**20  # CPU (--tiny): a nominal 256 MiB "device"
    seq_len = 64 if tiny else 4096
    cfg = gpu_train_config(name, tiny, attention)
    label = f"{name} (tiny stand-in)" if tiny else name
    state = ts.state_bytes(cfg)
    if state > budget:
        return {"name": label, "skipped": f"its state alone ({state / 2**30:.0f} GiB) exceeds {budget / 2**30:.0f} GiB"}
    start = ts.first_guess_batch(cfg, seq_len, budget, cap=8 if tiny else 16)
    batch, precompiled, tried = ts.largest_fitting_batch(cfg, seq_len, budget, start, max_attempts=8 if tiny else 3)
    if batch is None:
        return {"name": label, "skipped": f"no batch fits {budget / 2**30:.1f} GiB", "tried": tried}
    res = ts.bench_train_step(label, cfg, batch, seq_len, 2 if tiny else 3, peak, precompiled=precompiled)
    return res | {"fit_attempts": tried, "memory_budget_bytes": budget, "peak_scope": "this model's own process"}


def _attention_backend(requested: str, check: dict | None) -> str:
    if requested != "auto":
        return requested
    return "cudnn" if check and check.get("ok") else "xla"


def scoring_samples(tiny: bool, vocab: int) -> list[np.ndarray]:
    """Random token sequences (the GPU suite needs no tokenizer): 128 of 512-2048 tokens, or 16 of 16-48."""
    rng = np.random.default_rng(0)
    n, lo, hi = (16, 16, 48) if tiny else (128, 512, 2048)
    return [rng.integers(0, vocab, int(k), dtype=np.int32) for k in rng.integers(lo, hi, n)]


def gpu_sections(args, peak: float, check: dict | None) -> dict[str, Section]:
    attention = _attention_backend(args.attention, check)
    names = tuple(args.models.split(",")) if args.models else GPU_PRESETS

    def scoring():
        if args.tiny:
            cfg, rounds = dataclasses.replace(common.TINY_TEACHER, dtype="bfloat16"), 1
        else:
            cfg, rounds = presets.get_preset("qwen3-0.6b", dtype="bfloat16"), 2
        left = (args.deadline - time.time() - 30) if args.deadline else 600.0
        device = "cuda" if _torch_cuda() else "cpu"
        samples = scoring_samples(args.tiny, cfg.vocab_size)
        return pre.bench_scoring(cfg, samples, rounds, 16384, "bfloat16", device, True, min(600.0, left))

    sections: dict[str, Section] = {"precompute": ((), lambda: scoring())}
    for name in names:
        sections[f"train_step/{name}"] = ((), lambda n=name: gpu_train(n, args.tiny, attention, peak))
    return sections


def _torch_cuda() -> bool:
    if common.missing("torch"):
        return False
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run_section(name: str, section: Section) -> dict[str, Any]:
    """Import the section's modules and run it: {"result": ...}, {"skipped": reason} or {"error": text}."""
    modules, fn = section
    try:
        imported = [importlib.import_module(m) for m in modules]
    except ImportError as e:
        return {"skipped": f"{', '.join(modules)} cannot be imported here ({type(e).__name__}: {e})"}
    try:
        return {"result": fn(*imported)}
    except Exception as e:  # one broken section must not lose the others' numbers
        return {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}


def run_sections(sections: dict[str, Section], path: Path, header: dict, machine: dict) -> None:
    """Run each section and merge its outcome into the document at ``path`` as soon as it ends."""
    for name, section in sections.items():
        print(f"[benchmarks] {name} ...", flush=True)
        start = time.perf_counter()
        out = run_section(name, section)
        seconds = time.perf_counter() - start
        row = out.get("result")
        skipped = out.get("skipped") or (row.get("skipped") if isinstance(row, dict) else None)
        doc = report.load_run(path, header) | machine
        report.merge(doc, name, row, out.get("error"), skipped, seconds)
        report.write(doc, path.parent, path.stem)
        verdict = "FAILED" if "error" in out else ("skipped" if skipped else "done")
        print(f"[benchmarks] {name} {verdict} in {seconds:.1f} s" + (f": {skipped}" if skipped else ""), flush=True)


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
    p.add_argument("--run-id", default=None, help="add to this run's document (gpu.sh: one per script run)")
    p.add_argument("--budget-s", type=float, default=None, help="the script's time budget (recorded)")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds this section must end by")
    return p.parse_args(argv)


def header(args: argparse.Namespace) -> dict[str, Any]:
    """The run-level fields every section process writes identically (benchmarks.gpu_suite writes them too)."""
    return {
        "suite": args.suite,
        "tiny": args.tiny,
        "run_id": args.run_id or f"{args.suite}-{time.time():.0f}",
        "goals": GOALS,
        "note": args.note,
        "budget_s": args.budget_s,
        "policy": ts.GPU_POLICY if args.suite == "gpu" else None,
    }


def machine_fields(check: dict | None) -> dict[str, Any]:
    device = jax.devices()[0]
    peak, source = common.device_peak_flops(device)
    return {
        "machine": common.describe_machine(),
        "peak_flops": peak,
        "peak_flops_source": source,
        "peak_bandwidth": common.device_peak_bandwidth(device),
        **({"attention_check": check} if check is not None else {}),
    }


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    common.writable_dir(args.out)  # before hours of measurements, not after
    check = json.loads(Path(args.attention_check).read_text()) if args.attention_check else None
    machine = machine_fields(check)
    if args.suite == "cpu":
        sections = cpu_sections(TINY if args.tiny else CPU, machine["peak_flops"])
    else:
        sections = gpu_sections(args, machine["peak_flops"], check)
    if args.only:
        wanted = args.only.split(",")
        sections = {k: v for k, v in sections.items() if k in wanted or k.split("/")[0] in wanted}
    path = Path(args.out) / f"{args.suite}{'_tiny' if args.tiny else ''}.json"
    run_sections(sections, path, header(args), machine)
    print(f"[benchmarks] wrote {path} and {path.with_suffix('.md')}", flush=True)
    return path


if __name__ == "__main__":
    main()
