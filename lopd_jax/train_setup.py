"""What a training run needs, validated before it writes anything: model config, mesh, tokenizer, store,
provenance (teacher consistency), prompts and eval set. ``lopd_jax.train`` calls ``validated(cfg)`` before it
creates the run directory, so any invalid input ends as one ``error:`` line and an untouched disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lopd_jax import config as config_lib
from lopd_jax import distributed, drift, prompts, provenance, refresh, sharding
from lopd_jax.batch import DataError
from lopd_jax.checkpoint import CheckpointCorruptError
from lopd_jax.config import ConfigError, TrainConfig
from lopd_jax.models import hf, presets, qwen3
from lopd_jax.prompts import PromptError
from lopd_jax.provenance import ProvenanceError
from lopd_jax.store import RolloutStore, StoreError
from lopd_jax.store_lock import pid_alive

SCRATCH = "scratch"  # model.init value: random weights of model.config


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad inputs, a non-finite loss); the message names the cause."""


# Errors that mean "bad input": reported as one line with exit status 2, never as a traceback.
USER_ERRORS = (
    ConfigError,
    ProvenanceError,
    StoreError,
    DataError,
    TrainError,
    CheckpointCorruptError,
    distributed.DistributedError,
)


# ----------------------------------------------------------------------------------------------------------------
# Validation: everything that can fail before the run directory exists
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What ``prepare`` found; nothing here has touched the run directory."""

    model_cfg: qwen3.Qwen3Config
    mesh: Any
    rules: dict
    tokenizer_dir: str
    store: RolloutStore | None = None
    manifest: dict = dataclasses.field(default_factory=dict)
    init_fingerprint: str | None = None
    init_provenance: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    resume_changes: dict = dataclasses.field(default_factory=dict)  # {dotted key: [saved, now]} allowed on resume
    prompts: list[list[int]] | None = None  # opd
    stop_ids: tuple[int, ...] = ()  # opd and evaluation: where sampling stops (lopd_jax.prompts.stop_ids)
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use (online OPD prompts, evaluation)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer


def runtime_knobs(m: config_lib.ModelConfig, **overrides: Any) -> dict[str, Any]:
    """The Qwen3Config runtime knobs ``model.*`` sets, with ``overrides`` (``--plan``'s attention / MoE choice)."""
    knobs = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        attention=m.attention,
        scan_layers=m.scan_layers,
        matmuls=m.matmuls,
        decode_attention=m.decode_attention,
    )
    return {**knobs, **overrides}


def architecture(init: str, **knobs: Any) -> qwen3.Qwen3Config:
    """An HF checkpoint directory (its config.json only, never the weights) or a preset name (``qwen3-8b``)
    -> Qwen3Config with ``knobs``; ConfigError naming ``model.init`` when it is neither."""
    if (Path(init) / hf.CONFIG_FILE).is_file():
        return hf.load_config(init, **knobs)
    try:
        return presets.get_preset(init, **knobs)
    except KeyError:
        raise ConfigError(
            f"model.init: {init!r} is neither an HF checkpoint directory (no {hf.CONFIG_FILE}) nor a preset "
            f"({sorted(presets.PRESETS)})"
        ) from None


def model_config(cfg: TrainConfig, **overrides: Any) -> qwen3.Qwen3Config:
    """The student's Qwen3Config with the config's runtime knobs (and ``overrides``): ``model.config`` (file or
    dir) for scratch, else ``model.init``'s config.json, or a preset's architecture (``--plan`` only; ``prepare``
    refuses to train one). The one resolution the trainer, ``--plan`` and the lowering tests share."""
    m = cfg.model
    knobs = runtime_knobs(m, **overrides)
    if m.init == SCRATCH:
        if not m.config:
            raise ConfigError("model.config: required when model.init is 'scratch' (an HF config.json)")
        path = Path(m.config)
        file = path / hf.CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"model.config: {file} does not exist")
        return hf.config_from_hf(json.loads(file.read_text()), where=str(file), **knobs)
    return architecture(m.init, **knobs)


def _check_not_preset(cfg: TrainConfig) -> None:
    """A preset names an architecture without weights: ``--plan`` compiles it, training cannot start from it."""
    m = cfg.model
    if m.init != SCRATCH and not (Path(m.init) / hf.CONFIG_FILE).is_file():
        raise ConfigError(
            f"model.init: {m.init!r} is a preset (an architecture, no weights), which only --plan takes; train from "
            "an HF checkpoint directory, or from 'scratch' with model.config"
        )


def _tokenizer_dir(cfg: TrainConfig) -> str:
    tok_dir = cfg.model.tokenizer or (cfg.model.init if cfg.model.init != SCRATCH else None)
    if not tok_dir:
        raise ConfigError("model.tokenizer: required when model.init is 'scratch'")
    if not Path(tok_dir).is_dir():
        raise ConfigError(f"model.tokenizer: {tok_dir} is not a directory")
    return tok_dir


def load_tokenizer(tok_dir: str) -> Any:
    """The HF tokenizer in ``tok_dir`` (``prompts.load_tokenizer``: never runs repository code)."""
    try:
        return prompts.load_tokenizer(tok_dir)
    except PromptError as e:
        raise ConfigError(f"model.tokenizer: {e}") from None


def tokenizer_size(tok_dir: str) -> int:
    """Number of token ids the tokenizer can produce (added tokens included).

    Read with the ``tokenizers`` library from tokenizer.json when there is one: importing transformers costs
    seconds that sft / lightning_opd runs without evaluation never need."""
    file = Path(tok_dir) / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
        except Exception as e:  # the Rust library raises its own exception type for a malformed file
            raise ConfigError(f"model.tokenizer: {file} is not a valid tokenizer.json ({e})") from None
    return len(load_tokenizer(tok_dir))


def _max_token_id(store: RolloutStore, block: int = 1 << 24) -> tuple[int, int]:
    """(largest token id in the store, index of a sample holding it), reading the tokens array in blocks."""
    best, where = -1, 0
    for lo in range(0, store.num_tokens, block):
        hi = min(lo + block, store.num_tokens)
        tokens = store.read_array("tokens", lo, hi)  # a damaged chunk: StoreError naming array and sample
        if tokens.size and int(tokens.max()) > best:
            best = int(tokens.max())
            where = int(np.searchsorted(store.offsets, lo + int(tokens.argmax()), side="right") - 1)
    return best, where


def _check_store(cfg: TrainConfig, setup: Setup) -> None:
    try:
        store = RolloutStore.open(cfg.data.store)  # a store, or a sharded dataset (lopd_jax.store_dataset)
    except StoreError as e:
        raise StoreError(f"data.store: {e}") from None
    if (problem := store.incomplete()) is not None:  # a dataset's shard still being written
        raise StoreError(f"data.store: {problem}")
    m = store.manifest
    if len(store) == 0:
        raise StoreError(f"data.store: {store.path} has no committed samples")
    if cfg.mode == "lightning_opd" and (m.get("teacher") is None or store.teacher_committed < len(store)):
        raise StoreError(
            f"data.store: {store.path} has no teacher columns for every sample (teacher_committed "
            f"{store.teacher_committed} of {len(store)}, teacher {m.get('teacher')}): mode lightning_opd needs "
            "teacher log-probs; run precompute.teacher_logprobs on it"
        )
    if cfg.mode == "lightning_opd" and cfg.loss.old_policy == "behavior" and m.get("behavior_logprobs") == "none":
        raise StoreError(
            f"data.store: {store.path} has no behaviour log-probs (manifest behavior_logprobs: none), but "
            "loss.old_policy: behavior takes the PPO ratio against them; use rollouts with recorded log-probs "
            "(precompute.rollouts) or loss.old_policy: current"
        )
    top, sample = _max_token_id(store)
    if top >= setup.model_cfg.vocab_size:
        raise StoreError(
            f"vocab size mismatch: data.store {store.path} sample {sample} has token id {top}, but the model's "
            f"vocab_size is {setup.model_cfg.vocab_size}"
        )
    setup.store, setup.manifest = store, m
    _check_store_tokenizer(store.path, m, setup.tokenizer_dir)


def _check_store_tokenizer(store_path: str, manifest: dict, tok_dir: str) -> None:
    """The store's token ids mean what the trainer's tokenizer says they mean: same vocabulary, merges and special
    tokens (``tokenizer`` fingerprint) and, when the prompts were chat-encoded, the same chat template (the
    exported model ships this tokenizer's template, so a different one would serve another prompt format)."""
    ours = provenance.fingerprint_tokenizer(tok_dir)
    theirs = manifest.get("tokenizer")
    if theirs != ours:
        raise ProvenanceError(
            f"tokenizer mismatch: data.store {store_path} was made with tokenizer {theirs}, but the tokenizer in "
            f"{tok_dir} is {ours}; its token ids would be read with another vocabulary"
        )
    template = manifest.get("chat_template")
    ours_template = provenance.fingerprint_chat_template(tok_dir)
    if template is not None and template != ours_template:
        raise ProvenanceError(
            f"chat template mismatch: data.store {store_path} encoded its prompts with chat template {template}, "
            f"but the tokenizer in {tok_dir} has chat template {ours_template}"
        )


def _check_teacher_consistency(cfg: TrainConfig, setup: Setup) -> None:
    """Lightning OPD's rules (DESIGN.md, Provenance): raise ProvenanceError, or collect the allowed warnings."""
    allow = cfg.allow_teacher_inconsistency
    for warning in (
        provenance.check_teacher_consistency(setup.manifest, setup.init_provenance, allow),
        # pi_ref for the first generation; a refreshed generation's rollouts come from the exported student
        provenance.check_rollout_policy(setup.manifest, refresh.rollout_policy(cfg, setup.init_fingerprint), allow),
    ):
        if warning:
            setup.warnings.append(warning)


def _check_teacher_model(cfg: TrainConfig, setup: Setup) -> None:
    teacher = cfg.model.teacher
    if not (Path(teacher) / hf.CONFIG_FILE).is_file():
        raise ConfigError(f"model.teacher: {teacher} is not an HF checkpoint directory")
    tcfg = hf.load_config(teacher)
    if tcfg.vocab_size != setup.model_cfg.vocab_size:
        raise ConfigError(
            f"vocab size mismatch: model.teacher {teacher} has vocab_size {tcfg.vocab_size}, the student "
            f"{setup.model_cfg.vocab_size}"
        )
    _check_weights(teacher, tcfg, "model.teacher")
    provenance.check_same_tokenizer(
        provenance.fingerprint_tokenizer(teacher),
        provenance.fingerprint_tokenizer(setup.tokenizer_dir),
        f"model.teacher {teacher}",
        f"student ({setup.tokenizer_dir})",
    )


def _check_weights(path: str, model_cfg: qwen3.Qwen3Config, key: str) -> None:
    """Every tensor the model needs is in a present safetensors file with the shape config.json implies."""
    try:
        hf.check_checkpoint(path, model_cfg)
    except hf.CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None


def _generation_dir(cfg: TrainConfig, setup: Setup) -> str:
    """The directory whose generation_config.json / config.json names the student's eos ids (``prompts.stop_ids``):
    the init checkpoint, or the tokenizer's directory for a student trained from scratch."""
    return cfg.model.init if cfg.model.init != SCRATCH else setup.tokenizer_dir


def _check_prompts(cfg: TrainConfig, setup: Setup) -> None:
    """Online OPD's prompts, encoded with ``lopd_jax.prompts`` (the precompute rollouts' encoder)."""
    try:
        rows = prompts.read_prompts(cfg.data.prompts)
        setup.prompts = prompts.encode_prompts(setup.tokenizer, rows, cfg.prompt)
    except (OSError, ValueError) as e:  # PromptError, or the chat template's own error
        raise ConfigError(f"data.prompts: {e}") from None


def _check_stop_ids(cfg: TrainConfig, setup: Setup) -> None:
    """Where online OPD and evaluation stop sampling: ``prompts.stop_ids`` plus ``sampling.stop_token_ids``."""
    try:
        setup.stop_ids = prompts.stop_ids(_generation_dir(cfg, setup), setup.tokenizer, cfg.sampling.stop_token_ids)
    except PromptError as e:
        raise ConfigError(f"model.init: {e}") from None


def _check_eval_set(cfg: TrainConfig, setup: Setup) -> None:
    from lopd_jax import eval as evaluation

    try:
        rows = evaluation.load_eval_set(cfg.eval.prompts)
        rows = rows[: cfg.eval.num_prompts] if cfg.eval.num_prompts > 0 else rows
        prompts.encode_prompts(setup.tokenizer, rows, cfg.prompt)  # a row the tokenizer cannot encode fails now
    except (OSError, ValueError) as e:  # PromptError, or the chat template's own error
        raise ConfigError(f"eval.prompts: {e}") from None


def _check_shapes(cfg: TrainConfig, setup: Setup) -> None:
    shards = sharding.batch_shard_count(setup.mesh, setup.rules)
    if cfg.train.batch_size % shards or cfg.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} must be a multiple of the batch shards ({shards}) and of the "
            f"JAX processes ({jax.process_count()})"
        )
    if (cfg.train.batch_size // cfg.train.grad_accum) % shards:
        raise ConfigError(
            f"train.grad_accum: micro-batches of {cfg.train.batch_size // cfg.train.grad_accum} rows do not split "
            f"over the {shards} batch shards"
        )


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint.directory or Path(cfg.logging.run_dir) / "checkpoints")


CONFIG_RECORD = "lopd_config.json"  # in the checkpoint directory: the resolved config the checkpoints belong to
# Keys that change how a run is watched, never what it computes: a resume may always change them.
RESUME_FREE = (
    "resume",
    "resume_may_change",
    "logging.progress",
    "logging.plots",
    "logging.tensorboard",
    "checkpoint.async_save",
    "plan.device_memory_gb",
)


def saved_config(cfg: TrainConfig) -> tuple[dict, Path] | None:
    """The config the run being resumed was started with: ``CONFIG_RECORD`` beside its checkpoints, else (runs
    from before the record) its ``config.yaml``; None when neither exists."""
    import yaml

    record, yaml_file = checkpoint_dir(cfg) / CONFIG_RECORD, Path(cfg.logging.run_dir) / "config.yaml"
    where = record if record.is_file() else yaml_file if yaml_file.is_file() else None
    if where is None:
        return None
    try:
        text = where.read_text(encoding="utf-8")
        saved = json.loads(text)["config"] if where == record else yaml.safe_load(text)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"resume: cannot read the saved config {where}: {reason}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"resume: the saved config {where} is not a mapping of keys")
    return saved, where


def _check_resume_config(cfg: TrainConfig, setup: Setup) -> None:
    """resume=true continues the run that was saved, not another one: refuse any difference outside
    ``resume_may_change`` (and RESUME_FREE), naming every differing key; remember the allowed ones."""
    found = saved_config(cfg)
    if found is None:
        return
    saved, where = config_lib.flatten(found[0]), found[1]
    now = config_lib.flatten(config_lib.to_dict(cfg))
    allowed = (*RESUME_FREE, *cfg.resume_may_change)
    # A key the saved config lacks (added to the schema after the run started, e.g. the prompt section) that is
    # at its default now computes what the run computed then: not a difference.
    defaults = config_lib.flatten(config_lib.to_dict(TrainConfig(mode=cfg.mode, model=cfg.model)))
    differ = sorted(
        k
        for k in set(saved) | set(now)
        if saved.get(k, "<unset>") != now.get(k, "<unset>")
        and not (k not in saved and k in defaults and now.get(k) == defaults[k])
    )
    refused = [k for k in differ if not any(k == a or k.startswith(a + ".") for a in allowed)]
    if refused:
        shown = "; ".join(f"{k}: saved {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in refused)
        raise ConfigError(
            f"resume: this config differs from the run's saved config {where} at {', '.join(refused)} ({shown}); "
            "resume with the saved config, list the keys in resume_may_change, or start a new run_dir"
        )
    setup.resume_changes = {k: [saved.get(k), now.get(k)] for k in differ if k not in RESUME_FREE}


def _check_run_dir(cfg: TrainConfig) -> None:
    """A fresh run never mixes with an old one (orbax would silently skip saving steps that already exist)."""
    if cfg.resume:
        return
    run_dir, ckpt = Path(cfg.logging.run_dir), checkpoint_dir(cfg)
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "hf").exists():
        raise ConfigError(f"logging.run_dir: {run_dir} already holds a run; set resume: true or pick a new run_dir")
    if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
        raise ConfigError(f"checkpoint.directory: {ckpt} already holds checkpoints; set resume: true or clear it")


# ----------------------------------------------------------------------------------------------------------------
# The run directory: opened writable and locked, one trainer at a time
# ----------------------------------------------------------------------------------------------------------------

LOCK_FILE = ".lopd_train.lock"


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # half-written by a holder killed mid-write: treated as unknown (not stale)


def acquire_run_lock(run_dir: Path) -> Path:
    """Creates ``run_dir`` and its lock file (O_EXCL, holding host and pid) or raises TrainError naming the holder.

    A lock whose holder is a dead process of this host (a killed run) is stale and taken over; a lock of another
    host, or one that cannot be read, is never broken automatically (the message says which file to remove)."""
    lock = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(lock)
                if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0)) or -1):
                    print(f"WARNING: removing the stale lock {lock} of dead pid {holder['pid']}", file=sys.stderr)
                    lock.unlink(missing_ok=True)
                    continue
                raise TrainError(
                    f"logging.run_dir: {run_dir} is in use by pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')} (lock file {lock}); wait for it, or remove the lock file if that "
                    "trainer is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
            return lock
    except OSError as e:
        raise TrainError(f"logging.run_dir: cannot write to {run_dir}: {e.strerror or e}") from None
    raise TrainError(f"logging.run_dir: cannot take the lock {lock} (it keeps reappearing)")


def release_run_lock(lock: Path) -> None:
    """Removes the lock if it is still ours."""
    if _read_lock(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _check_writable(cfg: TrainConfig) -> None:
    """The run directory (or its nearest existing parent) is writable, checked before anything is computed."""
    for where, key in ((Path(cfg.logging.run_dir), "logging.run_dir"), (checkpoint_dir(cfg), "checkpoint.directory")):
        probe = where.absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {where} cannot be created or written ({probe} is not a writable directory)")


def prepare(cfg: TrainConfig) -> Setup:
    """Validates the whole run (config, mesh, model, tokenizer, store, provenance) without writing anything."""
    model_cfg = model_config(cfg)
    _check_not_preset(cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    tok_dir = _tokenizer_dir(cfg)
    setup = Setup(model_cfg, mesh, cfg.mesh.logical_rules(), tok_dir)
    n_tokens = tokenizer_size(tok_dir)
    if n_tokens > model_cfg.vocab_size:
        raise ConfigError(
            f"vocab size mismatch: the tokenizer in {tok_dir} has {n_tokens} tokens, the model's vocab_size "
            f"is {model_cfg.vocab_size}"
        )
    _check_shapes(cfg, setup)
    _check_writable(cfg)
    _check_run_dir(cfg)
    if cfg.resume:
        _check_resume_config(cfg, setup)
    if cfg.model.init != SCRATCH:
        _check_weights(cfg.model.init, model_cfg, "model.init")
        setup.init_fingerprint = provenance.fingerprint_weights(cfg.model.init)
        setup.init_provenance = provenance.read_provenance(cfg.model.init)
    if cfg.mode in ("sft", "lightning_opd"):
        _check_store(cfg, setup)
    if cfg.mode == "lightning_opd":
        if setup.init_fingerprint is None:
            raise ConfigError("model.init: lightning_opd starts from the SFT checkpoint, not from scratch")
        _check_teacher_consistency(cfg, setup)
    if cfg.mode == "opd":
        _check_teacher_model(cfg, setup)
        _check_prompts(cfg, setup)
    if cfg.eval.prompts:
        _check_eval_set(cfg, setup)
    drift.check(cfg)
    if cfg.mode == "opd" or cfg.eval.prompts:
        _check_stop_ids(cfg, setup)
    return setup


def validated(cfg: TrainConfig) -> Setup:
    """``prepare`` with any other ValueError / OSError (an unsupported config.json, an unreadable file) turned
    into a ConfigError, so that every invalid input ends as one ``error:`` line."""
    try:
        return prepare(cfg)
    except USER_ERRORS:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"{type(e).__name__}: {e}") from None
