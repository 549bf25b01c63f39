"""The trainer: ``python -m lopd_jax.train --config FILE [key.sub=value ...] [--plan]``.

Modes (``mode:`` in the config), one jitted update step (``lopd_jax.training.step.build``:
``update.make_update_step`` with
the mode's loss; ``--plan`` and the benchmarks compile the same step):

* ``sft``: cross entropy on a store of teacher answers; the exported model records the store's ``sft_teacher``.
* ``lightning_opd``: the offline OPD objective on a store with teacher log-probs; one forward per step (the old
  log-probs are ``stop_gradient`` of the current ones). Before step 0 the store's teacher must be the init
  checkpoint's ``sft_teacher`` and the store's rollout policy must be the init weights (``provenance``), unless
  ``allow_teacher_inconsistency: true``, which is then stamped on every metrics record and the progress bar.
* ``opd``: standard online OPD (``online_opd``): sample from the current student, score with a live teacher.

Everything is validated before the run directory is created (``train_setup.validated``): a bad config, store,
provenance or vocabulary exits with status 2 and one ``error: ...`` line, and writes nothing. A config listing
``stages`` is a pipeline (``lopd_jax.training.pipeline``); ``--plan`` hands the resolved config to
``lopd_jax.plan.planner``.

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` + ``tensorboard/``, ``checkpoints/``
(orbax: TrainState + the Grain iterator state, every ``checkpoint.every_steps`` and at the end), ``eval.json``,
``curves.png`` and ``hf/`` (safetensors, tokenizer files and ``lopd_provenance.json``). ``resume: true``
continues from the latest checkpoint and reaches the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import yaml
from jax.sharding import NamedSharding

from lopd_jax import update
from lopd_jax.atomic import write_atomic
from lopd_jax.data.loader import Batch, make_iterator
from lopd_jax.models import hf, qwen3
from lopd_jax.parallel import distributed, sharding
from lopd_jax.store import provenance
from lopd_jax.store.lock import FileLock
from lopd_jax.training import config as config_lib
from lopd_jax.training import drift, modes, refresh
from lopd_jax.training import step as step_lib
from lopd_jax.training.checkpoint import Checkpointer
from lopd_jax.training.config import ConfigError, TrainConfig
from lopd_jax.training.metrics import MetricsWriter, plot_metrics
from lopd_jax.training.run_dir import CONFIG_RECORD, acquire_run_lock, checkpoint_dir, release_run_lock
from lopd_jax.training.setup import SCRATCH, USER_ERRORS, Setup, TrainError, validated

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)
# Metrics that measure the machine, not the training; everything else is reproducible bit for bit.
TIMING_PREFIXES = ("time/", "perf/")


# ----------------------------------------------------------------------------------------------------------------
# State, batches, the step
# ----------------------------------------------------------------------------------------------------------------


def _param_shardings(setup: Setup) -> Any:
    return qwen3.param_shardings(setup.model_cfg, setup.mesh, setup.rules)


def load_params(run_cfg: TrainConfig, setup: Setup) -> Any:
    """The init params on their shardings: the HF checkpoint, or random weights (seed ``train.seed``)."""
    shardings = _param_shardings(setup)
    if run_cfg.model.init == SCRATCH:
        init = jax.jit(qwen3.init_params, static_argnums=0, out_shardings=shardings)
        return init(setup.model_cfg, jax.random.key(run_cfg.train.seed))
    dtype = qwen3.dtype_of(setup.model_cfg.param_dtype)
    return hf.load_hf(run_cfg.model.init, dtype=dtype, shardings=shardings)[1]


def place_local(batch: Batch, sh: NamedSharding, global_rows: int) -> Batch:
    """This process's [B / P, T] numpy rows -> global [B, T] arrays on the batch sharding."""
    return distributed.global_batch(batch, sh, global_rows)


def place_global(batch: Batch, sh: NamedSharding) -> Batch:
    """A global numpy batch (identical on every process) -> arrays on the batch sharding."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx]), batch)


# ----------------------------------------------------------------------------------------------------------------
# Logging: metrics read one step late, NaN check, progress bar
# ----------------------------------------------------------------------------------------------------------------


class Logger:
    """Holds the newest step's device metrics and writes the previous ones, so dispatch stays asynchronous."""

    def __init__(self, run_cfg: TrainConfig, writer: MetricsWriter | None, bar, start_time: float, guard=None):
        self.cfg, self.writer, self.bar, self.guard = run_cfg, writer, bar, guard or (lambda what: None)
        self.pending: tuple[int, dict, dict] | None = None
        self.last_time, self.last = start_time, {}

    def push(self, step: int, device_metrics: dict, host: dict) -> None:
        """Queue step ``step``'s metrics; writes the previously queued step's (a sync on that step only)."""
        self.flush()
        self.pending = (step, device_metrics, host)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, dev, host = self.pending
        self.pending = None
        vals = {k: float(v) for k, v in jax.device_get(dev).items()}
        now = time.perf_counter()
        tokens = host.pop("_tokens", 0.0)
        host.setdefault("time/step_s", now - self.last_time)
        host["perf/tokens_per_s"] = tokens / max(host["time/step_s"], 1e-9)
        self.last_time = now
        record = {**vals, **host}
        self.last = record
        if self.writer is not None and (step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps):
            self.guard(f"write the metrics of step {step}")
            self.writer.write(step, record)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{vals['train/loss']:.4f}", tok_s=f"{record['perf/tokens_per_s']:.0f}")
        if not math.isfinite(vals["train/loss"]):
            raise TrainError(f"non-finite loss {vals['train/loss']} at step {step}; stopping")

    def write_extra(self, step: int, metrics: dict) -> None:
        self.last = {**self.last, **metrics}
        if self.writer is not None:
            self.writer.write(step, metrics)


def _progress_bar(run_cfg: TrainConfig, setup: Setup, start: int):
    if not run_cfg.logging.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    desc = run_cfg.mode + (" [TEACHER INCONSISTENCY ALLOWED]" if setup.warnings else "")
    return tqdm(total=run_cfg.train.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """The live objects of a run (built by ``start``)."""

    state: update.TrainState
    step_fn: Any
    data_iter: Any
    next_batch: Any  # (step, state) -> (device Batch, host stats)
    ckpt: Checkpointer
    logger: Logger
    evaluator: Any
    start: int
    guard: Any = None  # (what) -> None; raises when the run directory's lock was lost (store_lock.FileLock.verify)
    refresh: refresh.Controller | None = None  # a generation of a refreshed run (lopd_jax.training.refresh)


def _batch_source(run_cfg: TrainConfig, setup: Setup, data_iter):
    """(step, state) -> (device Batch, host stats) for the mode: the store iterator or online sampling."""
    sh = sharding.batch_sharding(setup.mesh, 2, setup.rules)
    if modes.get(run_cfg.mode).reads_store:

        def from_store(step: int, state) -> tuple[Batch, dict]:
            t0 = time.perf_counter()
            host = next(data_iter)
            stats = {**data_iter.metrics, "time/data_s": time.perf_counter() - t0}
            stats["_tokens"] = float((host.segment_ids > 0).sum()) * jax.process_count()
            return place_local(host, sh, run_cfg.train.batch_size), stats

        return from_store
    from lopd_jax.training import online_opd

    tparams = hf.load_hf(run_cfg.model.teacher, mesh=setup.mesh)
    tcfg = dataclasses.replace(tparams[0], dtype=setup.model_cfg.dtype)
    scfg = online_opd.sampler_config(run_cfg.sampling, setup.stop_ids)
    online = online_opd.OnlineOPD(
        prompts=setup.prompts,
        model_cfg=setup.model_cfg,
        teacher_cfg=tcfg,
        teacher_params=tparams[1],
        sampling_cfg=scfg,
        batch_size=run_cfg.train.batch_size,
        seq_len=run_cfg.train.seq_len,
        max_response_len=run_cfg.data.max_response_len,
        seed=run_cfg.data.seed,
        shuffle=run_cfg.data.shuffle,
        chunk_size=run_cfg.loss.logprob_chunk_size,
        mesh=setup.mesh,
        place=lambda b: place_global(b, sh),
    )
    return lambda step, state: online.next_batch(step, state.params)


def _evaluator(run_cfg: TrainConfig, setup: Setup):
    if not run_cfg.eval.prompts:
        return None
    from lopd_jax.inference import evaluation

    return evaluation.Evaluator(
        run_cfg.eval,
        setup.tokenizer,
        setup.model_cfg,
        mesh=setup.mesh,
        seed=run_cfg.train.seed,
        batch_size=run_cfg.train.batch_size,
        stop_ids=setup.stop_ids,
        prompt_cfg=run_cfg.prompt,
    )


def start(run_cfg: TrainConfig, setup: Setup, run_dir: Path, guard=None) -> Run:
    """Builds the state (restored when resuming), the step, the batches, the checkpointer and the logger."""
    built = step_lib.build(setup, **step_lib.settings(run_cfg))  # the one step builder: --plan compiles the same
    abstract = built.abstract_state
    data_iter = make_iterator(run_cfg.data) if modes.get(run_cfg.mode).reads_store else None
    ckpt = Checkpointer(checkpoint_dir(run_cfg), run_cfg.checkpoint)
    # A refreshed generation's first step reads a new store: its iterator starts fresh, not at the saved position.
    continues = refresh.check_resume_step(run_cfg, ckpt.latest_step())
    restored = ckpt.restore_latest(abstract, data_iter if continues else None) if run_cfg.resume else None
    if restored is not None:
        state, start_step = restored
    else:
        state, start_step = built.init_state(load_params(run_cfg, setup), run_cfg.train.seed), 0
    writer = None
    if jax.process_index() == 0:
        header = {"mode": run_cfg.mode}
        if setup.warnings:
            header["teacher_inconsistency"] = " | ".join(setup.warnings)
        writer = MetricsWriter(run_dir, tensorboard=run_cfg.logging.tensorboard, header=header)
    logger = Logger(run_cfg, writer, _progress_bar(run_cfg, setup, start_step), time.perf_counter(), guard)
    source = _batch_source(run_cfg, setup, data_iter)
    sh = sharding.batch_sharding(setup.mesh, 2, setup.rules)
    ref_kl = drift.build_ref_kl(run_cfg, setup, lambda: load_params(run_cfg, setup), lambda b: place_global(b, sh))
    evaluator = drift.with_ref_kl(_evaluator(run_cfg, setup), ref_kl)
    ctl = refresh.controller(run_cfg, start_step)
    return Run(state, built.step, data_iter, source, ckpt, logger, evaluator, start_step, guard, ctl)


def _eval_due(run_cfg: TrainConfig, step: int) -> bool:
    every = run_cfg.train.eval_every
    return step == run_cfg.train.steps or (every > 0 and step % every == 0)


def train_loop(run_cfg: TrainConfig, run: Run) -> dict:
    """Runs steps ``run.start .. train.steps``; returns the last eval metrics (empty without eval)."""
    state, last_eval = run.state, {}
    stopped = run.refresh is not None and run.refresh.stopped  # resumed at a generation's pinned stop step
    for i in range(run.start, run_cfg.train.steps if not stopped else run.start):
        step = i + 1
        batch, stats = run.next_batch(i, state)
        if run.refresh is not None:
            stats.update(run.refresh.stats())
        t0 = time.perf_counter()
        state, metrics = run.step_fn(state, batch)
        if modes.get(run_cfg.mode).samples_online:  # the next step samples from the new params: time the update alone
            jax.block_until_ready(metrics)
            stats["time/update_s"] = time.perf_counter() - t0
        run.logger.push(step, metrics, stats)
        final = step == run_cfg.train.steps
        if run.evaluator is not None and _eval_due(run_cfg, step):
            run.logger.flush()
            last_eval = run.evaluator(state.params, step)
            run.logger.write_extra(step, last_eval)
        stop = run.refresh is not None and run.refresh.should_stop(step, metrics)  # pinned before the save
        if final or stop or run.ckpt.should_save(step):
            run.logger.flush()  # every metric up to this step is on disk before the checkpoint is
            run.logger.guard(f"save the checkpoint of step {step}")
            run.ckpt.save(step, state, run.data_iter, force=final or stop)
            run.logger.last_time = time.perf_counter()  # the next step's time excludes the save
        if stop:
            break
    run.logger.flush()
    run.ckpt.wait_until_finished()
    run.state = state
    return last_eval


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def _host_params(params: Any) -> Any:
    """The params as host numpy arrays (multi-process: gathered from every process).

    One host copy of the weights (16 GB for an 8B model in bf16) is what an HF export needs anyway; slicing
    device arrays layer by layer instead would compile one small XLA program per slice shape."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def _lineage(run_cfg: TrainConfig, setup: Setup) -> dict:
    """Provenance fields of the exported model (docs/design.md "Provenance")."""
    m = setup.manifest
    fields: dict[str, Any] = {
        "training_mode": run_cfg.mode,
        "init": run_cfg.model.init,
        "init_weights": setup.init_fingerprint,
    }
    mode = modes.get(run_cfg.mode)
    if mode.trains_on_answers:
        # The answers' teacher; SFT data without the field was generated by its rollout policy.
        fields["sft_teacher"] = m.get("sft_teacher") or m.get("policy")
    else:
        fields["sft_teacher"] = setup.init_provenance.get("sft_teacher")
    if setup.store is not None:
        fields["store"] = {"path": setup.store.path, "policy": m.get("policy"), "teacher": m.get("teacher")}
        fields["store"]["tokenizer"] = m.get("tokenizer")
        fields["store"]["identity"] = setup.store_identity
    if mode.live_teacher:
        fields["opd_teacher"] = provenance.fingerprint_weights(run_cfg.model.teacher)
    if setup.warnings:
        fields["teacher_inconsistency"] = setup.warnings
    fields["config"] = config_lib.config_fingerprint(run_cfg)
    if setup.resume_changes:
        fields["resumed_with_changes"] = setup.resume_changes
    return fields


def export(
    run_cfg: TrainConfig, setup: Setup, params: Any, run_dir: Path, guard=None, *, out: Path | None = None
) -> Path:
    """``run_dir/hf`` (or ``out``): safetensors + config, the tokenizer files, ``lopd_provenance.json``.

    Written to ``run_dir/.hf.tmp-PID`` and renamed into place, so a kill mid-export leaves the previous ``hf/``
    (or none), never a half-written one; a previous ``hf/`` is moved aside first and removed once the new one is in
    place (a kill between the two renames leaves it as ``.hf.old-PID``)."""
    out = run_dir / "hf" if out is None else out
    params = _host_params(params)
    if jax.process_index() != 0:
        return out
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a killed export's leftovers: never a user's file
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    hf.save_hf(str(tmp), setup.model_cfg, params)
    for name in TOKENIZER_FILES:
        if (Path(setup.tokenizer_dir) / name).is_file():
            shutil.copy2(Path(setup.tokenizer_dir) / name, tmp / name)
    provenance.write_provenance(tmp, weights=provenance.fingerprint_weights(tmp), **_lineage(run_cfg, setup))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if guard is not None:
        guard(f"publish {out.name}/")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def _record_config(run_cfg: TrainConfig, setup: Setup, run_dir: Path) -> None:
    """Saves the resolved config: ``config.yaml`` (for people) and ``CONFIG_RECORD`` with its fingerprint beside
    the checkpoints (what ``resume`` compares). A resume never replaces them (allowed changes,
    ``resume_may_change``, go to ``config.resume-N.yaml``); a fresh run (validated: no checkpoints, no metrics)
    keeps a differing ``config.yaml`` it finds as ``config.prev-N.yaml`` rather than overwrite it."""
    text = yaml.safe_dump(config_lib.to_dict(run_cfg), sort_keys=False)
    yaml_file = run_dir / "config.yaml"
    if yaml_file.exists() and yaml_file.read_text(encoding="utf-8", errors="replace") != text:
        if run_cfg.resume:
            if setup.resume_changes:
                write_atomic(_next_free(run_dir, "config.resume-{}.yaml"), text)
        else:
            kept = _next_free(run_dir, "config.prev-{}.yaml")
            yaml_file.rename(kept)
            print(f"note: {yaml_file} held another config; kept as {kept}", file=sys.stderr, flush=True)
    if not yaml_file.exists():
        write_atomic(yaml_file, text)
    record = checkpoint_dir(run_cfg) / CONFIG_RECORD
    if not (run_cfg.resume and record.exists()):
        record.parent.mkdir(parents=True, exist_ok=True)
        body = {"fingerprint": config_lib.config_fingerprint(run_cfg), "config": config_lib.to_dict(run_cfg)}
        if setup.store_identity is not None:  # what a resume checks the store at data.store against
            body["store"] = setup.store_identity
        write_atomic(record, json.dumps(body, indent=1))


def _next_free(run_dir: Path, pattern: str) -> Path:
    n = 1
    while (run_dir / pattern.format(n)).exists():
        n += 1
    return run_dir / pattern.format(n)


def _open_run_dir(run_cfg: TrainConfig, setup: Setup) -> FileLock | None:
    """Locks the run directory (process 0; None elsewhere) and records the config; errors as TrainError."""
    run_dir = Path(run_cfg.logging.run_dir)
    if jax.process_index() != 0:
        return None
    lock = acquire_run_lock(run_dir)
    try:
        _record_config(run_cfg, setup, run_dir)
    except OSError as e:
        release_run_lock(lock)
        raise TrainError(f"logging.run_dir: cannot write to {run_dir}: {e}") from None
    return lock


def train(run_cfg: TrainConfig, setup: Setup) -> dict:
    """Runs a validated config end to end, holding the run directory's lock; returns the final metrics."""
    lock = _open_run_dir(run_cfg, setup)
    try:
        return _train(run_cfg, setup, Path(run_cfg.logging.run_dir), lock.verify if lock is not None else None)
    finally:
        if lock is not None:
            release_run_lock(lock)


def _train(run_cfg: TrainConfig, setup: Setup, run_dir: Path, guard=None) -> dict:
    for warning in setup.warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    run = start(run_cfg, setup, run_dir, guard)
    try:
        last_eval = train_loop(run_cfg, run)
    finally:
        run.ckpt.close()
        if run.data_iter is not None:
            run.data_iter.close()  # stop Grain's prefetch thread now, not in a finalizer at interpreter exit
        if run.logger.writer is not None:
            run.logger.writer.close()
        if run.logger.bar is not None:
            run.logger.bar.close()
    ctl = run.refresh
    if ctl is not None and ctl.stopped:  # a refresh: this generation's student samples the next one
        ctl.finish(ctl.pinned, lambda out: export(run_cfg, setup, run.state.params, run_dir, guard, out=out))
        if jax.process_index() == 0 and run_cfg.logging.plots and (run_dir / "metrics.jsonl").exists():
            plot_metrics(run_dir / "metrics.jsonl", run_dir, title=f"{run_cfg.mode}: {run_dir.name}")
        return {**run.logger.last, **last_eval}
    export(run_cfg, setup, run.state.params, run_dir, guard)
    if jax.process_index() == 0:
        if last_eval:
            record = {"step": run_cfg.train.steps, **last_eval, "per_prompt": run.evaluator.per_prompt}
            write_atomic(run_dir / "eval.json", json.dumps(record, indent=1))
        if run_cfg.logging.plots and (run_dir / "metrics.jsonl").exists():
            plot_metrics(run_dir / "metrics.jsonl", run_dir, title=f"{run_cfg.mode}: {run_dir.name}")
    if ctl is not None:
        ctl.finish(run_cfg.train.steps, None)  # last: the loop reads a finished generation's outputs after it
    return {**run.logger.last, **last_eval}


def _run_pipeline(raw: dict, path: str, overrides: list[str]) -> int:
    from lopd_jax.training import pipeline

    if overrides:
        raise ConfigError(f"{path}: a pipeline config takes no key=value overrides (edit its stages)")
    from lopd_jax.demo import report  # the table (accuracy, wall-clock per stage) and the PNG plots

    try:  # the report reads the stages' outputs: it runs under the pipeline's run-directory lock
        pipeline.run_pipeline(raw, path, then=lambda records: print(report.report(records, raw, path), flush=True))
    except pipeline.PipelineError as e:
        raise TrainError(f"pipeline {path}: {e}") from None
    return 0


def _plan(run_cfg: TrainConfig, target: str | None = None) -> int:
    from lopd_jax.plan import planner as plan
    from lopd_jax.plan import targets

    try:
        return plan.main(run_cfg, target)
    except targets.TargetError as e:
        raise ConfigError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lopd_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML training config (or a pipeline config with stages)")
    p.add_argument("--plan", action="store_true", help="compile the step on abstract shapes and print memory")
    p.add_argument("--target", help="with --plan: compile for an accelerator absent here, e.g. tpu-v5p-8")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-5 train.steps=10")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with one ``error:`` line for any invalid input)."""
    args = parse_args(argv)
    try:
        raw = config_lib.read_yaml(args.config)
        if config_lib.is_pipeline(raw):
            return _run_pipeline(raw, args.config, args.overrides)
        cfg = config_lib.load_config(args.config, args.overrides)
        if cfg.refresh.active and cfg.refresh.generation is None and not args.plan:
            final = refresh.run_loop(cfg, args.config, args.overrides, validated)  # the generations, each a subprocess
            print("done: " + " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)), flush=True)
            return 0
        if args.target and not args.plan:
            raise ConfigError(f"--target {args.target} needs --plan (it only compiles; nothing runs there)")
        if args.plan:
            return _plan(cfg, args.target)
        distributed.initialize()  # several processes (LOPD_* / JAX_* variables, SLURM, MPI): one runtime
        setup = validated(cfg)
        final = train(cfg, setup)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # a full disk or a vanished directory while writing metrics, plots or the export
        where = f" {e.filename}" if e.filename else ""
        print(
            f"error: cannot write{where} ({e.strerror or e}); the run keeps its last checkpoint: fix the cause and "
            "rerun with resume: true",
            file=sys.stderr,
            flush=True,
        )
        return 2
    keys = ("train/loss", "eval/pass@1", "eval/avg@k")
    print("done: " + " ".join(f"{k}={final[k]:.4g}" for k in keys if k in final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
