"""The GPU benchmark driver that ``benchmarks/gpu.sh`` runs: every section in its own process, within a time budget.

    python -m benchmarks.gpu_suite [--tiny] [--out DIR] [--budget-s 420] [--models qwen3-4b,...] [--note TEXT]

Order (most wanted first): the cuDNN-vs-XLA attention check (benchmarks.attention_check), the Qwen3-4B training
step (the >= 45% MFU goal), teacher scoring, the MoE grouped-matmul check (benchmarks.moe_check: one 30B-A3B layer
per implementation), then the other models. Before each section the driver compares its
estimated cost (ESTIMATE_S: process start, compiles and timed runs on one H100/H200) with what is left of the
budget and skips it, saying so in the report, when it would not fit; a section that overruns is killed when the
budget ends and recorded as such. Each section merges its own results into ``<out>/gpu.json`` and ``gpu.md`` when
it ends, so a kill loses only that section, and its peak memory is its own process's.

This module imports neither jax nor torch: the driver never touches the GPU, its children do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

GOAL_MODEL = "qwen3-4b"
DEFAULT_MODELS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")
#: Estimated seconds per section on one H100/H200, compiles and process start-up included (a guess until gpu.sh
#: has run on one: replace with the measured section_seconds). Under --tiny every section is budgeted 1 s.
ESTIMATE_S = {
    "attention_check": 75,
    "precompute": 100,
    "moe_check": 150,
    "train_step/qwen3-0.6b": 60,
    "train_step/qwen3-1.7b": 70,
    "train_step/qwen3-4b": 110,
    "train_step/qwen3-8b": 130,
}
DEFAULT_ESTIMATE_S = 120
CHECKS = ("attention_check", "moe_check")  # sections that are one module writing one JSON report


def plan(models: list[str]) -> list[str]:
    """Section names in running order: the attention check, the goal model, scoring, the MoE check, the remaining
    models."""
    first = [f"train_step/{GOAL_MODEL}"] if GOAL_MODEL in models else []
    rest = [f"train_step/{m}" for m in models if m != GOAL_MODEL]
    return ["attention_check", *first, "precompute", "moe_check", *rest]


def section_command(section: str, args: argparse.Namespace, check: Path, deadline: float) -> list[str]:
    """The child process of one section."""
    tiny = ["--tiny"] if args.tiny else []
    if section in CHECKS:
        return [sys.executable, "-m", f"benchmarks.{section}", *tiny, "--out", str(check)]
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", "gpu", *tiny, "--out", args.out, "--only", section]
    cmd += ["--run-id", args.run_id, "--budget-s", str(args.budget_s), "--deadline", f"{deadline:.0f}"]
    cmd += ["--attention-check", str(check), "--note", args.note]
    if section.startswith("train_step/"):
        cmd += ["--models", section.split("/", 1)[1]]
    return cmd


def _record(path: Path, header: dict, section: str, **outcome) -> None:
    """Merge a driver-side outcome (a skip, a kill, a crash) into the run's document and rewrite it."""
    doc = report.load_run(path, header)
    if section.startswith("train_step/") and outcome.get("skipped"):
        outcome["result"] = {"name": section.split("/", 1)[1], "skipped": outcome["skipped"]}
    if section.startswith("train_step/") and outcome.get("error"):
        outcome["result"] = {"name": section.split("/", 1)[1], "skipped": outcome["error"].splitlines()[0]}
    report.merge(doc, section, **outcome)
    report.write(doc, path.parent, path.stem)


def _check_outcome(section: str, check: Path, rc: int | None) -> dict:
    """A check section's JSON, or a record of why there is none (crash, kill)."""
    try:
        return json.loads(check.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        why = "killed at the end of the time budget" if rc is None else f"exited {rc} without a report"
        return {"ok": False, "error": f"{section} process {why}"}


def run_child(cmd: list[str], timeout_s: float) -> tuple[int | None, str]:
    """(exit code, or None when killed at the timeout; the tail of its stderr). Its stdout streams through. The child
    leads its own process group, so a kill also ends what it started (the vLLM scorer holding GPU memory)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, (err or "")[-2000:]
    sys.stderr.write(err[-4000:])
    return proc.returncode, err[-2000:]


def run_section(section: str, args: argparse.Namespace, path: Path, header: dict, left: float) -> bool:
    """Run one section's process within ``left`` seconds; record what the child could not. True when it ran clean."""
    # The attention check's file is also read by the train_step sections (cuDNN when it agreed).
    check = path.parent / f"{section if section in CHECKS else 'attention_check'}{'_tiny' if args.tiny else ''}.json"
    if section in CHECKS:
        check.unlink(missing_ok=True)  # a stale file of an earlier run must not stand in for this one's
    start = time.time()
    rc, err = run_child(section_command(section, args, check, start + left), left)
    seconds = time.time() - start
    if section in CHECKS:
        doc = report.load_run(path, header)
        doc[section] = _check_outcome(section, check, rc)
        report.merge(doc, section, seconds=seconds)
        report.write(doc, path.parent, path.stem)
        return rc == 0
    if rc is None:
        _record(path, header, section, error=f"killed after {seconds:.0f} s: the time budget ran out", seconds=seconds)
    elif rc:
        _record(path, header, section, error=f"process exited {rc}: {err.strip()[-1500:]}", seconds=seconds)
    return rc == 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.out) / f"gpu{'_tiny' if args.tiny else ''}.json"
    header = {"suite": "gpu", "tiny": args.tiny, "run_id": args.run_id, "budget_s": args.budget_s, "note": args.note}
    _record(path, header, "plan")  # a fresh document for this run: earlier runs' sections never linger in it
    start, clean = time.time(), True
    for section in plan(args.models.split(",")):
        left = args.budget_s - (time.time() - start)
        need = 1 if args.tiny else ESTIMATE_S.get(section, DEFAULT_ESTIMATE_S)
        if left < need:
            reason = f"not started: needs ~{need} s, {max(left, 0):.0f} s of --budget-s {args.budget_s:.0f} left"
            print(f"[gpu_suite] {section}: {reason}", flush=True)
            _record(path, header, section, skipped=reason)
            continue
        print(f"[gpu_suite] {section} (~{need} s, {left:.0f} s left) ...", flush=True)
        clean &= run_section(section, args, path, header, left)
    doc = report.load_run(path, header)
    doc["total_seconds"] = time.time() - start
    report.write(doc, path.parent, path.stem)
    print(f"[gpu_suite] {doc['total_seconds']:.0f} s; results: {path} {path.with_suffix('.md')}", flush=True)
    return 0 if clean and not doc.get("errors") else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="test-sized shapes (runs on a CPU; the tests use it)")
    p.add_argument("--out", default="benchmarks/results", help="directory for gpu.json / gpu.md / attention_check")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock for all sections (default 420)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="presets of the training-step table")
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument("--run-id", default=f"gpu-{time.time():.0f}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
