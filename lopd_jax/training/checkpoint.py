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

import dataclasses
import sys
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

_STATE, _DATA = "state", "data"


class CheckpointCorruptError(ValueError):
    """No checkpoint of a directory could be restored; the message names each one and its error."""


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
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
