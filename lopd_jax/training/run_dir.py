"""A training run's directory: one trainer at a time (its lock), the config record beside its checkpoints, and
the checks that keep a fresh run from mixing with an old one and a resume from continuing another run or other
data. ``lopd_jax.training.setup.validated`` runs the checks before anything is written; ``lopd_jax.train`` takes
the lock and writes the record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from lopd_jax.config.errors import TrainError
from lopd_jax.store.lock import FileLock, LockError
from lopd_jax.training import config as config_lib
from lopd_jax.training.config import ConfigError, TrainConfig


def checkpoint_dir(run_cfg: TrainConfig) -> Path:
    return Path(run_cfg.checkpoint.directory or Path(run_cfg.logging.run_dir) / "checkpoints")


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


def saved_config(run_cfg: TrainConfig) -> tuple[dict, Path] | None:
    """The config the run being resumed was started with: ``CONFIG_RECORD`` beside its checkpoints, else (runs
    from before the record) its ``config.yaml``; None when neither exists."""

    record, yaml_file = checkpoint_dir(run_cfg) / CONFIG_RECORD, Path(run_cfg.logging.run_dir) / "config.yaml"
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


def check_resume_config(run_cfg: TrainConfig) -> dict:
    """resume=true continues the run that was saved, not another one: refuse any difference outside
    ``resume_may_change`` (and RESUME_FREE), naming every differing key; return the allowed ones as
    ``{key: [saved, now]}``."""
    found = saved_config(run_cfg)
    if found is None:
        return {}
    saved, where = config_lib.flatten(found[0]), found[1]
    now = config_lib.flatten(config_lib.to_dict(run_cfg))
    allowed = (*RESUME_FREE, *run_cfg.resume_may_change)
    # A key the saved config lacks (added to the schema after the run started, e.g. the prompt section) that is
    # at its default now computes what the run computed then: not a difference.
    defaults = config_lib.flatten(config_lib.to_dict(TrainConfig(mode=run_cfg.mode, model=run_cfg.model)))
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
    return {k: [saved.get(k), now.get(k)] for k in differ if k not in RESUME_FREE}


def check_resume_store(run_cfg: TrainConfig, identity: dict | None) -> None:
    """resume=true continues on the data the run trained on: the store at data.store must have the identity the
    run recorded (``store_identity``), unless ``data.store`` is in resume_may_change."""
    saved = saved_store_identity(run_cfg)
    now = identity
    if saved is None or now is None or any(a in ("data", "data.store") for a in run_cfg.resume_may_change):
        return
    differ = [k for k in ("manifest", "content", "samples") if saved.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: saved {saved.get(k)}, now {now.get(k)}" for k in differ)
        raise ConfigError(
            f"resume: data.store {run_cfg.data.store} is not the data this run trained on ({shown}); its iterator "
            "position would index other samples: restore that store, start a new run_dir, or list data.store in "
            "resume_may_change"
        )


def saved_store_identity(run_cfg: TrainConfig) -> dict | None:
    """The store identity recorded beside the checkpoints (``CONFIG_RECORD``), or None."""
    try:
        record = json.loads((checkpoint_dir(run_cfg) / CONFIG_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no record (a fresh run dir), or unreadable: ``saved_config`` reports that
    return record.get("store") if isinstance(record, dict) and isinstance(record.get("store"), dict) else None


def store_identity(manifest: dict, content: str, samples: int) -> dict:
    """What identifies a store's data: its manifest (all but the time of its last commit) and its content."""
    fields = {k: v for k, v in manifest.items() if k != "updated_at"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return {"manifest": "sha256:" + digest, "content": content, "samples": samples}


def check_run_dir(run_cfg: TrainConfig) -> None:
    """A fresh run never mixes with an old one (orbax would silently skip saving steps that already exist)."""
    run_dir, ckpt = Path(run_cfg.logging.run_dir), checkpoint_dir(run_cfg)
    if run_cfg.resume:
        # A generation of the refresh loop (refresh.generation set by the loop) killed before its first checkpoint
        # restarts from its start: the loop resumes its own generations, and read_metrics keeps the later rows.
        if run_cfg.refresh.generation is None:
            _check_resumable(run_dir, ckpt)
        return
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "hf").exists():
        raise ConfigError(f"logging.run_dir: {run_dir} already holds a run; set resume: true or pick a new run_dir")
    if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
        raise ConfigError(f"checkpoint.directory: {ckpt} already holds checkpoints; set resume: true or clear it")


def _check_resumable(run_dir: Path, ckpt: Path) -> None:
    """resume=true on a run that wrote metrics or an export needs its checkpoints: without them it would train
    from step 0 again, append a second copy of every metric row and replace hf/."""
    if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
        return
    ran = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "hf") if p.exists()]
    if ran:
        raise ConfigError(
            f"resume: {run_dir} holds {' and '.join(ran)} of a run but {ckpt} has no checkpoint to resume from "
            "(deleted?); restore the checkpoints, or start a new run_dir (nothing was changed)"
        )


LOCK_FILE = ".lopd_train.lock"


def acquire_run_lock(run_dir: Path) -> FileLock:
    """Creates ``run_dir`` and locks its ``LOCK_FILE`` (``lopd_jax.store.lock.FileLock``: flock, verified by inode
    before every publication) or raises TrainError naming the holder. A lock left by a dead trainer is free (the
    kernel dropped it) and taken over with a warning; the lock file is never deleted."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"logging.run_dir: cannot write to {run_dir}: {e.strerror or e}") from None
    try:
        return FileLock.acquire(run_dir / LOCK_FILE, f"logging.run_dir {run_dir}", "trainer", "this run directory")
    except LockError as e:
        raise TrainError(str(e)) from None


def release_run_lock(lock: FileLock) -> None:
    lock.release()


def check_writable(run_cfg: TrainConfig) -> None:
    """The run directory (or its nearest existing parent) is writable, checked before anything is computed."""
    for where, key in (
        (Path(run_cfg.logging.run_dir), "logging.run_dir"),
        (checkpoint_dir(run_cfg), "checkpoint.directory"),
    ):
        probe = where.absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {where} cannot be created or written ({probe} is not a writable directory)")
