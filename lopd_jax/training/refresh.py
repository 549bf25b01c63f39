"""Drift-aware Lightning OPD: refresh the rollouts when the student has drifted from the policy that sampled them.

A lightning_opd config with an active ``refresh`` section (``refresh.when`` and/or ``refresh.every_steps``) is run
by ``run_loop`` as a loop of generations, each a stage of ``lopd_jax.training.pipeline`` (a subprocess, cached by its
inputs, marked complete only once it has fully succeeded) under ``<run_dir>/refresh/``:

  gen0_train      python -m lopd_jax.train ... data.store=<data.store> refresh.generation=0 resume=true
                  trains until the trigger fires at step s: writes stop-gen0.json, checkpoints step s, exports the
                  student to gen0_train/policy (HF safetensors + provenance) and segment.json, and exits
  gen1_prompts    python -m lopd_jax.training.refresh prompts ...   the next refresh.prompts prompts of the pool
  gen1_rollouts   python -m precompute.rollouts --policy {gen0_train}/policy ...   (behaviour log-probs: the export's)
  gen1_teacher    python -m precompute.teacher_logprobs --teacher <refresh.teacher> ...
  gen1_train      the trainer again: resumes step s (params, optimizer state, step count) on the new store
  ...             until a train stage ends at train.steps (segment.json reason "finished": hf/, eval.json)

Every trainer invocation shares the run directory (checkpoints, metrics.jsonl, curves.png); each step's record
carries ``refresh/generation``, and ``refresh/generations.json`` lists each generation's store, policy and teacher
fingerprints, step range and teacher cost. A kill at any point resumes from the last complete stage: a stage
without its marker is cleared and run again (the trainer with ``resume``), and the stop step of a generation is
pinned in ``stop-gen<g>.json`` before its checkpoint is written, so a replay stops at the same step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import operator
import re
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from lopd_jax.atomic import write_atomic
from lopd_jax.config.errors import ConfigError, TrainError
from lopd_jax.data import prompts
from lopd_jax.models import hf
from lopd_jax.store import RolloutStore, provenance
from lopd_jax.training import pipeline
from lopd_jax.training.metrics import read_metrics
from lopd_jax.training.pipeline import Stage

REFRESH_DIR = "refresh"
GENERATIONS_FILE = "generations.json"
SEGMENT_FILE = "segment.json"
POLICY_DIR = "policy"
# Trigger names -> (metric key of the loss, what it measures). All read the behaviour log-probs of the store.
TRIGGER_METRICS = {
    "kl_k3": "opd/kl_behavior_k3",
    "kl_k1": "opd/kl_behavior_k1",
    "ess": "opd/iw_ess",
    "clip_frac": "opd/clip_frac",
}
_WHEN = re.compile(r"^\s*([a-z_0-9]+)\s*([<>])\s*([-+0-9.eE]+)\s*$")
_OPS = {">": operator.gt, "<": operator.lt}


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """When and how a lightning_opd run refreshes its rollouts (docs/drift.md). Inactive by default."""

    when: str | None = None  # "kl_k3 > X" | "kl_k1 > X" | "ess < Y" | "clip_frac > Z": the mean over ``window`` steps
    every_steps: int = 0  # also (or only) refresh after this many steps of a generation; 0 = off
    window: int = 5  # steps of the current generation the ``when`` metric is averaged over (the first fire >= window)
    prompts: int | float = 1.0  # prompts per refresh: a fraction (<= 1.0) of the pool, or a count (an int >= 1)
    prompts_file: str | None = None  # the prompt pool (JSONL); None = data.prompts
    teacher: str | None = None  # HF dir of the teacher that scores refreshed rollouts: the SFT data's teacher
    rollout_args: str = ""  # extra precompute.rollouts flags (e.g. "--batch-size 500 --engine vllm")
    teacher_args: str = ""  # extra precompute.teacher_logprobs flags
    generation: int | None = None  # set by the loop on the trainer it starts; None = this invocation is the loop

    def __post_init__(self):
        if self.when is not None:
            self.trigger()  # parses, or raises naming the key
        if self.every_steps < 0:
            raise ValueError(f"refresh.every_steps must be >= 0, got {self.every_steps}")
        if self.window < 1:
            raise ValueError(f"refresh.window must be >= 1, got {self.window}")
        if isinstance(self.prompts, float) and not 0.0 < self.prompts <= 1.0:
            raise ValueError(f"refresh.prompts: a fraction must be in (0, 1], got {self.prompts}")
        if isinstance(self.prompts, int) and self.prompts < 1:
            raise ValueError(f"refresh.prompts: a count must be >= 1, got {self.prompts}")
        if self.generation is not None and self.generation < 0:
            raise ValueError(f"refresh.generation must be >= 0, got {self.generation}")

    @property
    def active(self) -> bool:
        return self.when is not None or self.every_steps > 0

    def trigger(self) -> tuple[str, str, float] | None:
        """(metric key, ">" or "<", threshold) of ``when``; None without one."""
        if self.when is None:
            return None
        m = _WHEN.match(self.when)
        if m is None or m.group(1) not in TRIGGER_METRICS:
            raise ValueError(
                f"refresh.when: {self.when!r} is not '<metric> > X' or '<metric> < X' with metric one of "
                f"{sorted(TRIGGER_METRICS)}"
            )
        try:
            threshold = float(m.group(3))
        except ValueError:
            raise ValueError(f"refresh.when: {m.group(3)!r} is not a number") from None
        return TRIGGER_METRICS[m.group(1)], m.group(2), threshold


# ----------------------------------------------------------------------------------------------------------------
# Records in <run_dir>/refresh
# ----------------------------------------------------------------------------------------------------------------


def refresh_dir(run_cfg: Any) -> Path:
    return Path(run_cfg.logging.run_dir) / REFRESH_DIR


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stop_file(rdir: Path, generation: int) -> Path:
    return rdir / f"stop-gen{generation}.json"


def stop_step(rdir: Path, generation: int) -> int | None:
    """The step generation ``generation`` ends at, once the trainer has decided it (else None)."""
    rec = _read_json(stop_file(rdir, generation))
    return None if rec is None else int(rec["step"])


def generation_start(rdir: Path, generation: int) -> int:
    """The step a generation starts after: the previous generation's stop step (0 for generation 0)."""
    if generation == 0:
        return 0
    step = stop_step(rdir, generation - 1)
    if step is None:
        raise TrainError(f"refresh.generation {generation}: generation {generation - 1} has no stop record in {rdir}")
    return step


def stage_name(generation: int, what: str) -> str:
    return f"gen{generation}_{what}"


def policy_dir(rdir: Path, generation: int) -> Path:
    """Where the trainer exports the student that samples generation ``generation + 1``."""
    return rdir / stage_name(generation, "train") / POLICY_DIR


def rollout_policy(run_cfg: Any, init_fingerprint: str | None) -> str | None:
    """The weights fingerprint the store of this invocation's generation must have been sampled from: the init
    checkpoint (pi_ref) for generation 0 and runs without refresh, else the student exported at the previous
    generation's stop step, which is also the checkpoint this invocation resumes from (``check_resume_step``)."""
    g = run_cfg.refresh.generation
    if not g:
        return init_fingerprint

    export = policy_dir(refresh_dir(run_cfg), g - 1)
    try:
        return provenance.fingerprint_weights(export)
    except (OSError, provenance.ProvenanceError) as e:
        raise provenance.ProvenanceError(f"refresh.generation {g}: the exported student {export}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Inside the trainer: which generation a step reads, when the generation ends
# ----------------------------------------------------------------------------------------------------------------


class Controller:
    """The refresh side of one trainer invocation (generation ``refresh.generation``).

    ``should_stop(step, metrics)`` is asked after every step: the stop step pinned in ``stop-gen<g>.json`` when
    one exists (a replay after a kill stops where the first run decided), else the trigger. The ``when`` metric
    is read from the device every step (a sync of one scalar) and averaged over the generation's last
    ``window`` steps; a resume inside a generation refills the window from metrics.jsonl (train.log_every 1).
    """

    def __init__(self, run_cfg: Any, start_step: int):
        self.cfg, self.rcfg = run_cfg, run_cfg.refresh
        self.g = self.rcfg.generation
        self.rdir = refresh_dir(run_cfg)
        self.gen_start = generation_start(self.rdir, self.g)
        self.pinned = stop_step(self.rdir, self.g)
        self.trigger = self.rcfg.trigger()
        self.values: deque[float] = deque(maxlen=self.rcfg.window)
        if self.trigger is not None and start_step > self.gen_start:
            self._refill(start_step)
        self.stopped = self.pinned is not None and self.pinned == start_step

    def _refill(self, start_step: int) -> None:

        path = Path(self.cfg.logging.run_dir) / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        key = self.trigger[0]
        for rec in records:
            if self.gen_start < rec["step"] <= start_step and isinstance(rec.get(key), float):
                self.values.append(rec[key])

    def stats(self) -> dict[str, float]:
        return {"refresh/generation": float(self.g)}

    def should_stop(self, step: int, metrics: dict) -> bool:
        """Whether generation g ends after ``step``; pins the decision before returning True."""
        if step >= self.cfg.train.steps:
            return False
        if self.pinned is not None:
            self.stopped = step == self.pinned
            return self.stopped
        fire = self.rcfg.every_steps > 0 and step - self.gen_start >= self.rcfg.every_steps
        if self.trigger is not None:
            key, op, threshold = self.trigger
            self.values.append(float(jax.device_get(metrics[key])))
            mean = sum(self.values) / len(self.values)
            fire |= len(self.values) == self.rcfg.window and _OPS[op](mean, threshold)
        if fire:
            reason = f"every_steps {self.rcfg.every_steps}" if self.trigger is None else self.rcfg.when
            _write_json(stop_file(self.rdir, self.g), {"generation": self.g, "step": step, "trigger": reason})
            self.pinned, self.stopped = step, True
        return fire

    def finish(self, step: int, export_fn) -> None:
        """After the loop: export the student (a refresh stop) and write ``segment.json`` in the stage dir."""
        out = self.rdir / stage_name(self.g, "train")
        out.mkdir(parents=True, exist_ok=True)
        rec = {"generation": self.g, "first_step": self.gen_start, "last_step": step}
        if self.stopped:
            t0 = time.perf_counter()
            path = export_fn(out / POLICY_DIR)
            rec |= {"reason": "refresh", "policy": str(path), "export_s": round(time.perf_counter() - t0, 2)}
        else:
            rec["reason"] = "finished"
        _write_json(out / SEGMENT_FILE, rec)


def controller(run_cfg: Any, start_step: int) -> Controller | None:
    if run_cfg.refresh.generation is None:
        return None
    return Controller(run_cfg, start_step)


def check_resume_step(run_cfg: Any, latest: int | None) -> bool:
    """For the trainer of generation g >= 1: the checkpoint it resumes must be at or after the previous stop
    (the weights that sampled this generation); returns whether the data iterator state continues (False at
    the generation's first step: the checkpoint's iterator walked the previous generation's store)."""
    g = run_cfg.refresh.generation
    if not g:
        return True
    start = generation_start(refresh_dir(run_cfg), g)
    if latest is None or latest < start:
        raise TrainError(
            f"refresh.generation {g}: its rollouts come from the student at step {start}, but the latest checkpoint "
            f"is {latest}; nothing to resume from"
        )
    return latest > start


# ----------------------------------------------------------------------------------------------------------------
# The loop: validation, stages, the generations record
# ----------------------------------------------------------------------------------------------------------------


def prompt_pool(run_cfg: Any) -> str | None:
    return run_cfg.refresh.prompts_file or run_cfg.data.prompts


def prompts_per_refresh(run_cfg: Any, pool_size: int) -> int:
    n = run_cfg.refresh.prompts
    return max(1, round(n * pool_size)) if isinstance(n, float) else n


def check(run_cfg: Any, setup: Any) -> int:
    """Refuses a refresh the run cannot do, before anything is written (ConfigError / ProvenanceError naming the
    key); returns the size of the prompt pool."""

    r = run_cfg.refresh
    if run_cfg.mode != "lightning_opd":
        raise ConfigError(f"refresh: mode {run_cfg.mode!r} has no rollouts to refresh (only lightning_opd does)")
    if r.trigger() is not None:
        name = r.when.split()[0]
        if setup.manifest.get("behavior_logprobs") == "none":
            raise ConfigError(
                f"refresh.when: {name} is computed from the rollouts' behaviour log-probs, but data.store "
                f"{run_cfg.data.store} has none (manifest behavior_logprobs: none)"
            )
        if name == "clip_frac" and run_cfg.loss.old_policy != "behavior":
            raise ConfigError("refresh.when: clip_frac is always 0 with loss.old_policy: current (ratio 1)")
        if run_cfg.train.log_every != 1:
            raise ConfigError(
                f"refresh.when: needs train.log_every: 1 (a resume refills its window from the log), "
                f"got {run_cfg.train.log_every}"
            )
    if not r.teacher:
        raise ConfigError("refresh.teacher: required (the teacher that scores the refreshed rollouts)")
    if not (Path(r.teacher) / hf.CONFIG_FILE).is_file():
        raise ConfigError(f"refresh.teacher: {r.teacher} is not an HF checkpoint directory")
    teacher = provenance.fingerprint_weights(r.teacher)
    if not run_cfg.allow_teacher_inconsistency:
        sft_teacher = setup.init_provenance.get("sft_teacher")
        if teacher != sft_teacher:
            raise provenance.ProvenanceError(
                f"refresh.teacher: {r.teacher} is teacher {teacher}, but the init checkpoint was SFT'd on answers of "
                f"teacher {sft_teacher}; refreshed rollouts would be scored by another teacher"
            )
    pool = prompt_pool(run_cfg)
    if not pool:
        raise ConfigError("refresh.prompts_file: required (or data.prompts): the prompts refreshed rollouts answer")
    try:
        size = len(prompts.read_records(pool).records)
    except (OSError, ValueError) as e:
        raise ConfigError(f"refresh.prompts_file: {e}") from None
    if size == 0:
        raise ConfigError(f"refresh.prompts_file: {pool} has no prompts left to sample")
    n = prompts_per_refresh(run_cfg, size)
    if n > size:
        raise ConfigError(f"refresh.prompts: {n} prompts per refresh, but {pool} holds only {size}")
    return size


def _trainer_cmd(run_cfg: Any, config_path: str, overrides: list[str], g: int, store: str) -> str:
    may_change = sorted({*run_cfg.resume_may_change, "data.store", "refresh.generation"})
    argv = ["python", "-m", "lopd_jax.train", "--config", config_path, *overrides]
    argv += [
        f"data.store={store}",
        f"refresh.generation={g}",
        "resume=true",
        f"resume_may_change=[{','.join(may_change)}]",
    ]
    return shlex.join(argv)


def _sampling_flags(run_cfg: Any, g: int) -> list[str]:
    s = run_cfg.sampling
    flags = ["--temperature", str(s.temperature), "--top-p", str(s.top_p), "--top-k", str(s.top_k)]
    return flags + ["--max-new-tokens", str(s.max_new_tokens), "--seed", str(s.seed + g)]


def _refresh_stages(run_cfg: Any, g: int, n_prompts: int) -> list:
    """The three stages that make generation g >= 1 from the student exported at generation g - 1's stop."""

    r = run_cfg.refresh
    prompts = shlex.join(
        ["python", "-m", "lopd_jax.training.refresh", "prompts", "--pool", prompt_pool(run_cfg), "--generation", str(g),
         "--count", str(n_prompts), "--out", "{out}/prompts.jsonl"]
    )  # fmt: skip
    rollouts = shlex.join(
        ["python", "-m", "precompute.rollouts", "--policy", f"{{{stage_name(g - 1, 'train')}}}/{POLICY_DIR}",
         "--prompts", f"{{{stage_name(g, 'prompts')}}}/prompts.jsonl", "--out", "{out}/store",
         *_sampling_flags(run_cfg, g)]
    )  # fmt: skip
    teacher = shlex.join(
        ["python", "-m", "precompute.teacher_logprobs", "--teacher", r.teacher,
         "--store", f"{{{stage_name(g, 'rollouts')}}}/store", "--out", "{out}/store"]
    )  # fmt: skip
    return [
        Stage(stage_name(g, "prompts"), stage_name(g, "prompts"), prompts),
        Stage(stage_name(g, "rollouts"), stage_name(g, "rollouts"), f"{rollouts} {r.rollout_args}".strip()),
        Stage(stage_name(g, "teacher"), stage_name(g, "teacher"), f"{teacher} {r.teacher_args}".strip()),
    ]


def _store_record(path: str) -> dict:

    store = RolloutStore.open(path)
    m = store.manifest
    response = int((store.lengths - store.prompt_lengths).sum())
    return {"store": path, "samples": len(store), "response_tokens": response, "policy": m.get("policy"),
            "teacher": m.get("teacher")}  # fmt: skip


def _record_generation(rdir: Path, g: int, store: str, records: list[dict]) -> None:
    """Updates ``generations.json`` with generation g: its store, fingerprints, step range and teacher cost."""
    by_name = {r["name"]: r for r in records}
    rec = {"generation": g, **_store_record(store)}
    teacher = by_name.get(stage_name(g, "teacher"))
    rec["teacher_tokens"] = rec["response_tokens"] if g > 0 else 0  # generation 0 was scored before the run
    rec["teacher_s"] = teacher["seconds"] if teacher else 0.0
    rollouts = by_name.get(stage_name(g, "rollouts"))
    rec["rollout_s"] = rollouts["seconds"] if rollouts else 0.0
    rec["first_step"] = generation_start(rdir, g)
    segment = _read_json(rdir / stage_name(g, "train") / SEGMENT_FILE) or {}
    rec |= {k: segment[k] for k in ("last_step", "reason", "export_s") if k in segment}
    gens = [x for x in (_read_json(rdir / GENERATIONS_FILE) or []) if x["generation"] != g]
    _write_json(rdir / GENERATIONS_FILE, sorted([*gens, rec], key=lambda x: x["generation"]))


def run_loop(run_cfg: Any, config_path: str, overrides: list[str], validated: Callable[[Any], Any]) -> dict:
    """Runs the generations of a refreshed lightning_opd run (module docstring); returns the final metrics."""

    gen0 = dataclasses.replace(run_cfg, refresh=dataclasses.replace(run_cfg.refresh, generation=0))
    setup = validated(gen0)  # the trainer's own checks on generation 0, before anything is written
    pool_size = check(run_cfg, setup)
    n_prompts = prompts_per_refresh(run_cfg, pool_size)
    run_dir, rdir = Path(run_cfg.logging.run_dir), refresh_dir(run_cfg)
    if not run_cfg.resume and (rdir.exists() or (run_dir / "metrics.jsonl").exists()):
        raise ConfigError(f"logging.run_dir: {run_dir} already holds a run; set resume: true or pick a new run_dir")
    rdir.mkdir(parents=True, exist_ok=True)
    stages, g = [], 0
    store = placeholder = str(Path(run_cfg.data.store).absolute())  # the path, and how a stage command names it
    while True:
        stages.append(pipeline.Stage(stage_name(g, "train"), stage_name(g, "train"),
                                     _trainer_cmd(run_cfg, config_path, overrides, g, placeholder)))  # fmt: skip
        records = _run_stages(pipeline, stages, rdir)
        _record_generation(rdir, g, store, records)
        segment = _read_json(rdir / stage_name(g, "train") / SEGMENT_FILE)
        if segment is None:
            raise TrainError(f"refresh: the trainer of generation {g} ended without {SEGMENT_FILE}")
        if segment["reason"] == "finished":
            break
        g += 1
        stages += _refresh_stages(run_cfg, g, n_prompts)
        records = _run_stages(pipeline, stages, rdir)
        placeholder = f"{{{stage_name(g, 'teacher')}}}/store"
        store = str(rdir.absolute() / stage_name(g, "teacher") / "store")
        _record_generation(rdir, g, store, records)  # its teacher cost counts from now; its steps once trained
    final = _read_json(run_dir / "eval.json") or {}
    return {k: v for k, v in final.items() if k != "step"}


def _run_stages(pipeline: Any, stages: list, rdir: Path) -> list[dict]:

    try:
        return pipeline.Pipeline(stages, rdir).run()
    except pipeline.PipelineError as e:
        raise TrainError(f"refresh: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# CLI: the prompts of a generation
# ----------------------------------------------------------------------------------------------------------------


def select_prompts(pool: list[dict], generation: int, count: int) -> list[dict]:
    """Generation g >= 1 takes the ``count`` prompts after those of generation g - 1, walking the pool in its order
    and wrapping around: every prompt of the pool is refreshed once before any is refreshed twice."""
    start = (generation - 1) * count
    return [pool[(start + i) % len(pool)] for i in range(count)]


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m lopd_jax.training.refresh", description="helpers of the refresh loop")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("prompts", help="write the prompts generation g samples (JSONL)")
    sp.add_argument("--pool", required=True)
    sp.add_argument("--generation", type=int, required=True)
    sp.add_argument("--count", type=int, required=True)
    sp.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        pool = [
            {k: v for k, v in row.items() if k not in ("line", "row")}
            for _, row in prompts.read_records(args.pool).records
        ]
    except (OSError, ValueError) as e:
        print(f"error: --pool: {e}", file=sys.stderr)
        return 2
    if not pool or args.count < 1 or args.generation < 1:
        print(f"error: need a non-empty --pool, --count >= 1 and --generation >= 1 ({args.pool})", file=sys.stderr)
        return 2
    rows = select_prompts(pool, args.generation, args.count)
    write_atomic(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
