"""Orbax checkpoints of the training state (params, optimizer state, step, RNG) plus the Grain iterator state.

One orbax ``CheckpointManager`` step directory holds two items:

- ``state``: the TrainState pytree through ``StandardSave``/``StandardRestore``. Arrays keep their
  ``NamedSharding``: every process writes its own shards, and a restore onto an abstract state (shapes, dtypes,
  shardings from ``jax.eval_shape``) reads each shard straight onto its device.
- ``data``: the data iterator's position through Grain's own orbax handler (``grain.checkpoint``), one JSON
  file per JAX process, so each process resumes its own slice of the store.

Saves are asynchronous by default: ``save`` returns once the arrays are copied off the devices and the files
are written in the background; ``close`` (or leaving the ``with`` block) waits for the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

_STATE, _DATA = "state", "data"


class CheckpointCorruptError(ValueError):
    """No checkpoint of a directory could be restored; the message names each one and its error."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint cannot be written (a full disk, a quota, a read-only directory); the message says which step,
    why, and that the checkpoints before it are kept."""


# A write failure as orbax / TensorStore report it (their own exception types, with the OS error in the text).
_WRITE_FAILURES = ("RESOURCE_EXHAUSTED", "No space left", "Disk quota", "Read-only file system", "Permission denied")
# A save needs its state's bytes free (orbax writes beside, then renames) plus its metadata: per-array files and
# the OCDBT manifest, ~0.3 MiB for the tests' 0.3 MiB model, a rounding error for a real one.
SPACE_MARGIN, SPACE_FIXED = 1.1, 1 << 20


class _DropWriteFailureLogs(logging.Filter):
    """Orbax's background threads log each write failure with a traceback (hundreds of lines for one full disk);
    the failure reaches the trainer as one CheckpointWriteError line that names it, so those records are dropped.
    Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
        return not any(k in text for k in _WRITE_FAILURES) and "Save Finalize thread" not in text


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The ``checkpoint`` section of the config."""

    every_steps: int = 100  # save when step % every_steps == 0 (0: only the final save)
    keep: int = 3  # most recent checkpoints kept (0: keep all)
    async_save: bool = True  # write in a background thread while training continues
    directory: str = ""  # "" = <logging.run_dir>/checkpoints

    def __post_init__(self):
        if self.every_steps < 0 or self.keep < 0:
            raise ValueError(f"checkpoint.every_steps and checkpoint.keep must be >= 0, got {self}")


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs under one directory.

    Usage::

        with Checkpointer(run_dir / "checkpoints", cfg.checkpoint) as ckpt:
            restored = ckpt.restore_latest(abstract_state, data_iter) if cfg.resume else None
            ...
            ckpt.save(step, state, data_iter)          # no-op unless step is a save step
        # leaving the block waits for the last asynchronous save
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep or None,
            save_interval_steps=cfg.every_steps or 1,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: grain.checkpoint.CheckpointHandler()}
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        absl_log = logging.getLogger("absl")  # orbax logs through absl
        if not any(isinstance(f, _DropWriteFailureLogs) for f in absl_log.filters):
            absl_log.addFilter(_DropWriteFailureLogs())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write (the interval rule; final saves pass ``force``)."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def save(
        self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None, *, force: bool = False
    ) -> bool:
        """Saves ``state`` (any pytree of jax.Arrays, sharded or not) and the iterator position at ``step``.

        ``data_iter`` must be the iterator whose next batch is the one for ``step``'s update (its state is read
        now, synchronously). Returns whether a checkpoint was started.
        """
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        with self._write_failures(f"the checkpoint before step {step}"):
            self._manager.wait_until_finished()  # orbax waits for it anyway; the free space is known only after it
        self._check_space(step, state)
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        with self._write_failures(f"the checkpoint of step {step} (or the asynchronous save before it)"):
            return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse a save the directory's free space cannot hold, before orbax starts it: a save that runs out of
        space fails in background threads whose tracebacks would flood the terminal."""
        need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)) * SPACE_MARGIN + SPACE_FIXED
        free = shutil.disk_usage(self.directory if self.directory.exists() else self.directory.parent).free
        if free < need:
            raise CheckpointWriteError(
                f"checkpoint.directory {self.directory}: {free / 2**20:.1f} MiB free, the checkpoint of step {step} "
                f"needs about {need / 2**20:.1f} MiB; {self._kept()}"
            )

    def _kept(self) -> str:
        steps = self._manager.all_steps()
        if not steps:
            return "no checkpoint was written yet: free space, then start the run again in a new logging.run_dir"
        return f"the checkpoint of step {max(steps)} is kept: free space, then rerun with resume: true"

    @contextlib.contextmanager
    def _write_failures(self, what: str):
        """A write failure of ``what`` as one CheckpointWriteError line (other errors pass through)."""
        try:
            yield
        except Exception as e:
            text = str(e)
            if not isinstance(e, OSError) and not any(k in text for k in _WRITE_FAILURES):
                raise
            os_errors = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")
            reason = next((k for k in os_errors if k in text), (text.strip().splitlines() or [type(e).__name__])[0])
            raise CheckpointWriteError(
                f"checkpoint.directory {self.directory}: cannot write {what}: {reason[:300]}; {self._kept()}"
            ) from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(
        self, abstract_state: Any, data_iter: grain.DatasetIterator | None = None
    ) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint, or returns None when there is none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays with the
        target structure; the result has the same structure and shardings. ``data_iter`` is set in place to
        the saved position. Returns ``(state, step)``.

        A checkpoint that fails to restore (a truncated or deleted file) is moved aside to ``<step>.corrupt``
        (kept for inspection, and out of the way of the step's next save) and the previous one is tried, with a
        warning naming both; CheckpointCorruptError when none is readable.
        """
        failed: list[str] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._restore(step, abstract_state, data_iter)
            except Exception as e:  # orbax / tensorstore / grain each raise their own types for a damaged file
                failed.append(f"{self.directory / str(step)} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            if failed:
                self._set_aside(failed)
                print(
                    f"WARNING: checkpoint {'; '.join(failed)} is unreadable (moved aside to <step>.corrupt); "
                    f"resuming from {self.directory / str(step)}",
                    file=sys.stderr,
                    flush=True,
                )
            return restored, step
        if failed:
            raise CheckpointCorruptError(f"no readable checkpoint in {self.directory}: {'; '.join(failed)}")
        return None

    def _restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator | None) -> Any:
        items = {_STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            if not (self.directory / str(step) / _DATA).exists():
                raise ValueError(f"checkpoint {self.directory / str(step)} has no data-iterator state to restore")
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._manager.restore(step, args=ocp.args.Composite(**items))[_STATE]

    def _set_aside(self, failed: list[str]) -> None:
        """Renames the unreadable step directories so orbax neither lists them nor skips their steps' saves."""
        for entry in failed:
            step_dir = Path(entry.split(" (", 1)[0])
            target = step_dir.with_name(step_dir.name + ".corrupt")
            n = 1
            while target.exists():
                n += 1
                target = step_dir.with_name(f"{step_dir.name}.corrupt{n}")
            step_dir.rename(target)
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        with self._write_failures("the last checkpoint"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._write_failures("the last checkpoint"):
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
