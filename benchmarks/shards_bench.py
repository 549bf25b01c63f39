"""Throughput honesty of sharded precompute , measured side by side in one run on CPU.

1. Scoring scale-out. One store of the demo task's samples is scored by ``python -m precompute.teacher_logprobs``
   (JAX engine, a random teacher of the demo's shape saved with the task's tokenizer) as one process pinned to one
   core, as N = 2 processes (``LOPD_PROCESS_ID`` / ``LOPD_NUM_PROCESSES``, ``--out DATASET``) each pinned to its own
   core, and, for context, as one unpinned process (every core). On a 2-core host "N devices" is N cores: pinning
   gives the single process exactly one, so the ratio measures the sharding, not XLA's thread pool. Tokens/s is
   every scored token over the whole wall-clock from the first launch to the last exit (interpreter start, model
   load and compile included: each child compiles for itself, no persistent cache); the tools' own summary lines
   (``tokens_per_s``, from opening the store) are kept beside it. The 2-shard dataset must hold the single
   process's teacher log-probs bit for bit: the split is cut on ``--window`` boundaries (README "Precompute on a
   cluster").
2. Reader rate. The trainer's Grain pipeline (``lopd_jax.data.loader.make_iterator``, lightning_opd's data config) over
   the same scored samples as a dataset of 8 shards and as one store, in alternating rounds: batches/s and
   tokens/s (non-padding slots); the two pipelines must yield identical batches.

    python -m benchmarks.shards_bench [--tiny] [--out benchmarks/results]   # -> cpu_shards{,_tiny}.json / .md

``benchmarks.run --suite cpu`` runs the same measurement as its ``shards`` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import common
from lopd_jax.atomic import write_atomic
from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Qwen3Config

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"scoring_scale_out": 2.0, "reader_8_shards_vs_store": 1.0}


@dataclasses.dataclass(frozen=True)
class ShardSizes:
    """The shapes and counts of one run (the real ones or the ``--tiny`` ones)."""

    teacher: Qwen3Config
    samples: int  # scored by every scoring launch
    window: int  # --window: samples per commit; the N-way split is cut on its multiples
    score_rounds: int  # alternating rounds of (1 pinned, 2 pinned, 1 unpinned)
    reader_samples: int  # samples behind the reader comparison (a multiple of reader_shards * window)
    reader_shards: int
    batch_size: int  # rows per trainer batch
    seq_len: int
    batches: int  # timed per reader round (after WARMUP_BATCHES)
    reader_rounds: int


#: The demo's teacher (3 x 128, 128-id vocabulary); ~70 tokens per sample (the demo's task).
CPU = ShardSizes(common.DEMO_TEACHER, 24576, 256, 3, 4096, 8, 16, 256, 300, 5)
TINY = ShardSizes(common.TINY_TEACHER, 256, 32, 1, 256, 8, 4, 128, 20, 1)
WARMUP_BATCHES = 5
EQUAL_BATCHES = 20  # batches compared field by field between the two pipelines

# Child launcher: pin to the cores in argv[1] (empty: inherit every core) before JAX starts, then run the module.
_PIN = (
    "import os, runpy, sys\n"
    "cores = sys.argv[1]\n"
    "if cores: os.sched_setaffinity(0, {int(c) for c in cores.split(',')})\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)
_LAUNCHER_VARS = re.compile(r"^(LOPD_PROCESS_ID|LOPD_NUM_PROCESSES|SLURM_.*|XLA_FLAGS|JAX_COMPILATION_CACHE_DIR)$")


# ----------------------------------------------------------------------------------------------------------------
# Inputs, built with the project's own tools
# ----------------------------------------------------------------------------------------------------------------


def build_inputs(root: Path, sizes: ShardSizes) -> dict[str, Path]:
    """The demo task (``lopd_jax.demo.synthetic``), its worked solutions imported as a store
    (``precompute.import_jsonl``),
    a second store of the first ``reader_samples`` of them, and a random teacher saved with the task's tokenizer
    (so the stores' tokenizer fingerprint is the teacher's)."""
    from lopd_jax.demo import synthetic
    from precompute import import_jsonl

    task = root / "task"
    t = common.DEMO_TASK
    flags = ["--min-operands", t["min_operands"], "--max-operands", t["max_operands"]]
    flags += ["--min-digits", t["min_digits"], "--max-digits", t["max_digits"], *(["--chain"] if t["chain"] else [])]
    argv = ["--out", task, "--n-sft", sizes.samples, "--n-opd", 1, "--n-eval", 1, *flags]
    _check(synthetic.main([str(a) for a in argv]), "lopd_jax.demo.synthetic")
    lines = (task / "sft.jsonl").read_text().splitlines(keepends=True)
    (root / "reader.jsonl").write_text("".join(lines[: sizes.reader_samples]))
    paths = {"tokenizer": task / "tokenizer", "store": root / "store", "reader_store": root / "reader_store"}
    for data, out in ((task / "sft.jsonl", paths["store"]), (root / "reader.jsonl", paths["reader_store"])):
        argv = ["--tokenizer", str(paths["tokenizer"]), "--data", str(data), "--out", str(out)]
        _check(import_jsonl.main(argv), "precompute.import_jsonl")
    paths["teacher"] = root / "teacher"
    save_teacher(paths["teacher"], sizes.teacher)
    return paths


def save_teacher(path: Path, cfg: Qwen3Config) -> None:
    """Random ``cfg`` weights (``qwen3.save_hf``) plus the synthetic task's tokenizer files."""
    from lopd_jax.demo import synthetic

    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(3))
    qwen3.save_hf(str(path), cfg, params, dtype=np.float32)
    synthetic.build_tokenizer(path)


def _check(code: int, tool: str) -> None:
    if code != 0:
        raise RuntimeError(f"{tool} exited {code} while building the benchmark's inputs")


# ----------------------------------------------------------------------------------------------------------------
# 1. Scoring scale-out
# ----------------------------------------------------------------------------------------------------------------


def child_env(index: int, count: int) -> dict[str, str]:
    """This worktree on the path, one plain CPU device, no persistent compile cache (each launch compiles for
    itself), and the shard in the launcher's variables (none for a single process)."""
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARS.match(k)}
    env |= {"PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if count > 1:
        env |= {"LOPD_PROCESS_ID": str(index), "LOPD_NUM_PROCESSES": str(count)}
    return env


def score_launch(paths: dict[str, Path], out: Path, sizes: ShardSizes, pins: list[list[int] | None]) -> dict:
    """Launch ``len(pins)`` scoring processes of ``paths["store"]`` into ``out`` at once (process i on the cores
    ``pins[i]``, None: unpinned) and wait for the last; wall-clock seconds and each tool's summary line."""
    argv = ["--teacher", paths["teacher"], "--store", paths["store"], "--out", out, "--window", sizes.window]
    logs, procs = [], []
    start = time.perf_counter()
    for i, cores in enumerate(pins):
        log = out.parent / f"{out.name}.{i}.log"
        pin = ",".join(map(str, cores)) if cores else ""
        cmd = [sys.executable, "-c", _PIN, pin, "precompute.teacher_logprobs", *map(str, argv)]
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall a child that the parent is not reading
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=child_env(i, len(pins)), stdout=f, stderr=f))
        logs.append(log)
    waited = [os.wait4(p.pid, 0) for p in procs]  # (pid, status, rusage): the CPU time each child got
    wall = time.perf_counter() - start
    for p, (_, status, _) in zip(procs, waited):
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"teacher_logprobs exited {p.returncode}: {log.read_text()[-2000:]}")
    cpu = [r.ru_utime + r.ru_stime for _, _, r in waited]
    summaries = [tool_summary(log.read_text()) for log in logs]
    return {"wall_s": wall, "cpu_s": cpu, "pins": [c or "all" for c in pins], "tool": summaries}


def tool_summary(text: str) -> dict[str, Any]:
    """The fields of the tool's last ``teacher_logprobs: k=v ...`` line (numbers as numbers)."""
    line = [s for s in text.splitlines() if s.startswith("teacher_logprobs: ")][-1]
    fields = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split())
    return {k: float(v) if re.fullmatch(r"-?[\d.]+", v) else v for k, v in fields.items()}


def same_teacher_values(single: Path, dataset: Path) -> dict[str, Any]:
    """Compare the teacher log-probs (and tokens) of the single process's store with the N-shard dataset."""
    from lopd_jax.store import RolloutStore

    a, b = RolloutStore.open(single), RolloutStore.open(dataset)
    x, y = (s.read_array("teacher_logprobs", 0, s.num_tokens) for s in (a, b))
    tokens = [s.read_array("tokens", 0, s.num_tokens) for s in (a, b)]
    tokens_equal = bool(np.array_equal(*tokens))
    both = np.isfinite(x) & np.isfinite(y)
    return {
        "samples": [len(a), len(b)],
        "scored": [a.teacher_committed, b.teacher_committed],
        "tokens_equal": tokens_equal,
        "nan_equal": bool(np.array_equal(np.isnan(x), np.isnan(y))),
        "bitwise_equal": x.shape == y.shape and bool(np.array_equal(x.view(np.uint32), y.view(np.uint32))),
        "max_abs_diff": float(np.abs(x[both] - y[both]).max()) if both.any() else 0.0,
    }


def bench_scoring(paths: dict[str, Path], root: Path, sizes: ShardSizes) -> dict[str, Any]:
    """``score_rounds`` alternating rounds of the three launches; the ratio of the 2-process to the pinned
    1-process throughput (median and the pessimistic / optimistic pairings of the rounds)."""
    from lopd_jax.store import RolloutStore

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"skipped": f"needs 2 cores to pin 2 processes, this process may use {cores}"}
    setups = {"one_pinned": [[cores[0]]], "two_pinned": [[cores[0]], [cores[1]]], "one_unpinned": [None]}
    runs: dict[str, list[dict]] = {k: [] for k in setups}
    for r in range(sizes.score_rounds):
        for name, pins in setups.items():
            runs[name].append(score_launch(paths, root / f"{name}.{r}", sizes, pins))
    tokens = RolloutStore.open(paths["store"]).num_tokens
    res: dict[str, Any] = {"samples": sizes.samples, "tokens": tokens, "window": sizes.window}
    res["model"] = {"hidden_size": sizes.teacher.hidden_size, "layers": sizes.teacher.num_hidden_layers}
    res["params"] = qwen3.param_count(sizes.teacher)
    for name, rs in runs.items():
        res[name] = _setup_fields(rs, tokens)
    walls = {k: common.spread([r["wall_s"] for r in rs]) for k, rs in runs.items()}
    res["speedup_two_vs_one_pinned"] = common.ratio(walls["one_pinned"], walls["two_pinned"])
    res["speedup_two_pinned_vs_one_unpinned"] = common.ratio(walls["one_unpinned"], walls["two_pinned"])
    cpu = {k: common.spread([sum(r["cpu_s"]) for r in rs]) for k, rs in runs.items()}
    res["cpu_s_two_over_one_pinned"] = cpu["two_pinned"]["median"] / cpu["one_pinned"]["median"]  # 1.0: no overhead
    # What the rounds would give if every process had its core to itself: the slowest shard's CPU time is its wall.
    busiest = [max(r["cpu_s"]) for r in runs["two_pinned"]]
    res["cpu_time_speedup_two_vs_one"] = common.ratio(cpu["one_pinned"], common.spread(busiest))
    res["equal"] = same_teacher_values(root / "one_pinned.0", root / "two_pinned.0")
    return res


def _setup_fields(rs: list[dict], tokens: int) -> dict[str, Any]:
    wall = common.spread([r["wall_s"] for r in rs])
    tool_rate = [sum(t["tokens_per_s"] for t in r["tool"]) for r in rs]  # processes run at once: rates add
    return {
        "pins": rs[0]["pins"],
        "wall_s": wall,
        "tokens_per_s": tokens / wall["median"],
        "tool_tokens_per_s": common.spread(tool_rate),
        "cpu_s": [r["cpu_s"] for r in rs],  # per round, per process: user + system
        "cpu_share": [[c / r["wall_s"] for c in r["cpu_s"]] for r in rs],  # of one core, per process
        "tool_seconds": [[t["seconds"] for t in r["tool"]] for r in rs],
        "tool_tokens": [[int(t["tokens"]) for t in r["tool"]] for r in rs],
    }


# ----------------------------------------------------------------------------------------------------------------
# 2. Reader rate
# ----------------------------------------------------------------------------------------------------------------


def build_reader_inputs(paths: dict[str, Path], root: Path, sizes: ShardSizes) -> tuple[Path, Path]:
    """The reader store scored into one store and, by ``reader_shards`` runs of ``--num-shards``, into a dataset
    of that many shards (in this process, one after the other: only their content matters here)."""
    from precompute import teacher_logprobs

    one, many = root / "reader_one", root / "reader_many"
    base = ["--teacher", str(paths["teacher"]), "--store", str(paths["reader_store"]), "--window", str(sizes.window)]
    _check(teacher_logprobs.main([*base, "--out", str(one)]), "precompute.teacher_logprobs")
    n = sizes.reader_shards
    for i in range(n):
        argv = [*base, "--out", str(many), "--num-shards", str(n), "--shard-index", str(i)]
        _check(teacher_logprobs.main(argv), "precompute.teacher_logprobs")
    return one, many


def reader_config(store: Path, sizes: ShardSizes):
    """The trainer's data config for lightning_opd (teacher log-probs required), packing on, endless."""
    from lopd_jax.data.batch import DataConfig

    return DataConfig(store=str(store), batch_size=sizes.batch_size, seq_len=sizes.seq_len, require_teacher=True)


def read_rate(store: Path, sizes: ShardSizes) -> tuple[float, int]:
    """(seconds, non-padding tokens) of ``batches`` batches after WARMUP_BATCHES, from a fresh iterator."""
    from lopd_jax.data import loader as data

    it = data.make_iterator(reader_config(store, sizes), 0, 1)
    for _ in range(WARMUP_BATCHES):
        next(it)
    tokens, start = 0, time.perf_counter()
    for _ in range(sizes.batches):
        tokens += int((next(it).segment_ids > 0).sum())
    return time.perf_counter() - start, tokens


def same_batches(one: Path, many: Path, sizes: ShardSizes) -> bool:
    """Whether the two pipelines yield the same first EQUAL_BATCHES batches, every field bit for bit."""
    from lopd_jax.data import loader as data

    a, b = (data.make_iterator(reader_config(s, sizes), 0, 1) for s in (one, many))
    for _ in range(EQUAL_BATCHES):
        x, y = next(a), next(b)
        for f in dataclasses.fields(x):
            u, v = np.asarray(getattr(x, f.name)), np.asarray(getattr(y, f.name))
            if u.shape != v.shape or u.tobytes() != v.tobytes():
                return False
    return True


def bench_reader(paths: dict[str, Path], root: Path, sizes: ShardSizes) -> dict[str, Any]:
    """Alternating rounds (one store, then the dataset) of the trainer's pipeline; the dataset/store rate ratio."""
    one, many = build_reader_inputs(paths, root, sizes)
    times: dict[str, list[float]] = {"one_store": [], "dataset": []}
    tokens: dict[str, int] = {}
    for _ in range(sizes.reader_rounds):
        for name, store in (("one_store", one), ("dataset", many)):
            secs, tokens[name] = read_rate(store, sizes)
            times[name].append(secs)
    res: dict[str, Any] = {"samples": sizes.reader_samples, "shards": sizes.reader_shards, "batches": sizes.batches}
    res |= {"batch_size": sizes.batch_size, "seq_len": sizes.seq_len, "warmup_batches": WARMUP_BATCHES}
    for name, ts in times.items():
        s = common.spread(ts)
        res[name] = {"s": s, "batches_per_s": sizes.batches / s["median"], "tokens_per_s": tokens[name] / s["median"]}
    res["speed_dataset_vs_store"] = common.ratio(common.spread(times["one_store"]), common.spread(times["dataset"]))
    res["same_tokens_read"] = tokens["one_store"] == tokens["dataset"]
    res["same_batches"] = same_batches(one, many, sizes)
    return res


# ----------------------------------------------------------------------------------------------------------------
# Both, and the report
# ----------------------------------------------------------------------------------------------------------------


def bench_shards(sizes: ShardSizes) -> dict[str, Any]:
    """Build the inputs in a temporary directory and run both measurements; the load average before each part."""
    with tempfile.TemporaryDirectory(prefix="lopd_shards_bench_") as tmp:
        root = Path(tmp)
        paths = build_inputs(root, sizes)
        load = {"before_scoring": list(os.getloadavg())}
        scoring = bench_scoring(paths, root, sizes)
        load["before_reader"] = list(os.getloadavg())
        reader = bench_reader(paths, root, sizes)
        load["end"] = list(os.getloadavg())
    return {"scoring": scoring, "reader": reader, "load_average_1_5_15": load}


def _rate(s: dict) -> str:
    return f"{s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]"


def _scoring_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"- skipped: {r['skipped']}"]
    out = [
        f"{r['samples']:,} samples / {r['tokens']:,} tokens, teacher {r['params'] / 1e6:.2f}M params "
        f"({r['model']['layers']} x {r['model']['hidden_size']}), --window {r['window']}, JAX engine fp32.",
        "",
        "| launch | cores | wall s, median [min-max] | CPU s per process | share of a core per process | "
        "tokens/s (wall) | tokens/s (tools' summaries, summed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("one_pinned", "1 process"), ("two_pinned", "2 processes (shards)"),
                        ("one_unpinned", "1 process, unpinned")):  # fmt: skip
        s = r[name]
        w, t = s["wall_s"], s["tool_tokens_per_s"]
        cpu = "; ".join(", ".join(f"{c:.1f}" for c in row) for row in s["cpu_s"])  # rounds; processes
        share = "; ".join(", ".join(f"{c:.2f}" for c in row) for row in s["cpu_share"])
        out.append(
            f"| {label} | {s['pins']} | {w['median']:.1f} [{w['min']:.1f}-{w['max']:.1f}] | {cpu} | {share} | "
            f"{s['tokens_per_s']:,.0f} | {t['median']:,.0f} |"
        )
    e = r["equal"]
    out += [
        "",
        f"- 2 processes vs 1 pinned process: **{_rate(r['speedup_two_vs_one_pinned'])}** (goal ~2x); vs the "
        f"unpinned process: {_rate(r['speedup_two_pinned_vs_one_unpinned'])}. CPU seconds of the 2 processes "
        f"together / the pinned process's: {r['cpu_s_two_over_one_pinned']:.2f} (1.0: sharding adds no work). "
        f"By CPU time (each process alone on its core: the busier shard's CPU seconds vs the pinned process's): "
        f"{_rate(r['cpu_time_speedup_two_vs_one'])}.",
        f"- 2-shard dataset vs the single store: tokens equal {e['tokens_equal']}, teacher log-probs bit-identical "
        f"{e['bitwise_equal']} (max |diff| {e['max_abs_diff']:.2e}), scored {e['scored']}.",
    ]
    return out


def _reader_lines(r: dict) -> list[str]:
    out = [
        f"{r['samples']:,} scored samples, {r['shards']} shards vs one store; lightning_opd data config, "
        f"B x T = {r['batch_size']} x {r['seq_len']} packed; {r['batches']} timed batches per round after "
        f"{r['warmup_batches']} warm-up ones.",
        "",
        "| source | s per round, median [min-max] | batches/s | tokens/s |",
        "|---|---|---|---|",
    ]
    for name, label in (("one_store", "one store"), ("dataset", f"{r['shards']} shards")):
        s = r[name]
        out.append(
            f"| {label} | {s['s']['median']:.2f} [{s['s']['min']:.2f}-{s['s']['max']:.2f}] | "
            f"{s['batches_per_s']:,.1f} | {s['tokens_per_s']:,.0f} |"
        )
    out += [
        "",
        f"- dataset / store rate: **{_rate(r['speed_dataset_vs_store'])}** (goal: equal within noise); identical "
        f"batches {r['same_batches']}.",
    ]
    return out


def markdown(doc: dict) -> str:
    m, res = doc["machine"], doc["results"]
    load = res["load_average_1_5_15"]
    lines = [
        "# Benchmarks: sharded precompute, cpu" + (" (--tiny shapes)" if doc["tiny"] else ""),
        "",
        f"- date: {m['date']}; host CPU {m['host']['cpu']}, {m['host']['cores']} cores; jax {m['versions']['jax']}",
        f"- load average (1 min) before scoring {load['before_scoring'][0]:.1f}, before the reader "
        f"{load['before_reader'][0]:.1f}, at the end {load['end'][0]:.1f} (other jobs share these cores)",
        *([f"- note: {doc['note']}"] if doc.get("note") else []),
        f"- command: `{doc['command']}`",
        "",
        "## Scoring scale-out (`precompute.teacher_logprobs`, one store -> N shards)",
        "",
        *_scoring_lines(res["scoring"]),
        "",
        "## Reader rate (`lopd_jax.data.loader.make_iterator`)",
        "",
        *_reader_lines(res["reader"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="test-sized shapes and counts")
    p.add_argument("--out", default="benchmarks/results", help="directory for cpu_shards.json / .md")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = p.parse_args(argv)
    results = bench_shards(TINY if args.tiny else CPU)
    doc = {"suite": "cpu_shards", "tiny": args.tiny, "goals": GOALS, "note": args.note}
    doc |= {"command": "python -m benchmarks.shards_bench" + (" --tiny" if args.tiny else "")}
    doc |= {"machine": common.describe_machine(), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_shards{'_tiny' if args.tiny else ''}.json"
    write_atomic(path, json.dumps(doc, indent=1, default=float) + "\n")
    write_atomic(path.with_suffix(".md"), markdown(doc))
    print(f"[shards_bench] wrote {path} and {path.with_suffix('.md')}", flush=True)
    return path


if __name__ == "__main__":
    main()
