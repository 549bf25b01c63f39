"""Which shard of a precompute job this process is: ``--num-shards N --shard-index i``, or the launcher's variables.

The cluster's launcher is the scheduler (docs/design.md "Scale-out"): N independent processes, each told its index by
flags or by the environment it was started in. Sources, first match wins:

  1. the flags ``--num-shards N --shard-index i`` (both or neither); they override the environment;
  2. ``LOPD_PROCESS_ID`` / ``LOPD_NUM_PROCESSES`` (the trainer's launch variables, ``lopd_jax.parallel.distributed``);
  3. SLURM: a job array (``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN``, divided by ``SLURM_ARRAY_TASK_STEP``,
     of ``SLURM_ARRAY_TASK_COUNT``) and/or the tasks of one ``srun`` (``SLURM_PROCID`` of ``SLURM_NTASKS``); an array
     of multi-task steps gives shard ``array_index * ntasks + procid`` of ``array_count * ntasks``;
  4. JAX's multi-process runtime (``jax.process_index()`` of ``jax.process_count()``), only when this process has
     already initialised ``jax.distributed`` (a TPU pod launcher that did): the tools never initialise it themselves,
     because each shard is an independent single-process computation on this host's devices.

Sources 2-4 that are all set must name the same shard (an error naming both otherwise). Otherwise the job is one
shard (index 0 of 1), and the tools write a plain store (no ``shard`` entry in its manifest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Mapping

from precompute.common import PrecomputeError


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` and where that came from (for the log line and the manifest)."""

    index: int = 0
    count: int = 1
    source: str = "default"

    def record(self) -> dict:
        return {"index": self.index, "count": self.count}


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="split the work into N shards (default: from LOPD_NUM_PROCESSES, SLURM, JAX; else 1)",
    )
    p.add_argument("--shard-index", type=int, default=None, help="which shard this process does (0-based)")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise PrecomputeError(f"{name}={env[name]!r}: expected an integer (the shard index / count)") from None


def _lopd(env: Mapping[str, str]) -> Shard | None:
    if not env.get("LOPD_NUM_PROCESSES") and not env.get("LOPD_PROCESS_ID"):
        return None
    if not (env.get("LOPD_NUM_PROCESSES") and env.get("LOPD_PROCESS_ID")):
        raise PrecomputeError("LOPD_PROCESS_ID and LOPD_NUM_PROCESSES must be set together (the shard of this process)")
    return Shard(_int(env, "LOPD_PROCESS_ID"), _int(env, "LOPD_NUM_PROCESSES"), "LOPD_PROCESS_ID/LOPD_NUM_PROCESSES")


def _slurm(env: Mapping[str, str]) -> Shard | None:
    array = None
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        first = _int(env, "SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") else 0
        array = ((_int(env, "SLURM_ARRAY_TASK_ID") - first) // max(step, 1), _int(env, "SLURM_ARRAY_TASK_COUNT"))
    tasks = None
    if env.get("SLURM_PROCID") and env.get("SLURM_NTASKS") and _int(env, "SLURM_NTASKS") > 1:
        tasks = (_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"))
    if array and tasks:
        return Shard(array[0] * tasks[1] + tasks[0], array[1] * tasks[1], "SLURM_ARRAY_TASK_* x SLURM_PROCID/NTASKS")
    if array:
        return Shard(*array, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    if tasks:
        return Shard(*tasks, "SLURM_PROCID/SLURM_NTASKS")
    return None


def _jax() -> Shard | None:
    jax = sys.modules.get("jax")  # never imported (let alone initialised) just to ask
    if jax is None or not jax.distributed.is_initialized():
        return None
    return Shard(jax.process_index(), jax.process_count(), "jax.process_index/process_count")


def _from_launchers(env: Mapping[str, str]) -> Shard:
    """The shard the launcher's variables name. Two launchers that both name one (``LOPD_*`` left in the
    environment of a SLURM array, say) must agree: a disagreement is an error naming both, never a silent choice
    (the losing source's shards would collide or go missing)."""
    found = [s for s in (_lopd(env), _slurm(env), _jax()) if s is not None]
    for other in found[1:]:
        if (other.index, other.count) != (found[0].index, found[0].count):
            raise PrecomputeError(
                f"the launcher's variables disagree: {found[0].source} say shard {found[0].index} of "
                f"{found[0].count}, {other.source} say shard {other.index} of {other.count}; unset one of them "
                "(or give --num-shards N --shard-index i)"
            )
    return found[0] if found else Shard()


def resolve(num_shards: int | None, shard_index: int | None, env: Mapping[str, str] | None = None) -> Shard:
    """This process's shard from the flags, else the launcher (see the module docstring); PrecomputeError naming
    the flag or variable when it is incomplete or out of range."""
    env = os.environ if env is None else env
    if (num_shards is None) != (shard_index is None):
        raise PrecomputeError("--num-shards and --shard-index go together (or set neither: the launcher's are used)")
    if num_shards is not None:
        shard = Shard(shard_index, num_shards, "--shard-index/--num-shards")
    else:
        shard = _from_launchers(env)
    if shard.count < 1 or not 0 <= shard.index < shard.count:
        raise PrecomputeError(f"shard index {shard.index} of {shard.count} (from {shard.source}): need 0 <= i < N")
    if shard.count > 1:
        print(f"precompute: shard {shard.index} of {shard.count} (from {shard.source})", file=sys.stderr, flush=True)
    return shard


def split(total: int, shard: Shard) -> tuple[int, int]:
    """The contiguous part [lo, hi) of ``total`` items that ``shard`` does; parts differ in size by at most one
    and concatenated in shard order they are 0..total-1 (the order one process would have used)."""
    return total * shard.index // shard.count, total * (shard.index + 1) // shard.count


def join(out: str, name: str) -> str:
    """``out``/``name`` for a local path or a kvstore URL."""
    return out.rstrip("/") + "/" + name if "://" in out else os.path.join(out, name)


def shard_store(out: str, shard: Shard) -> str:
    """Where this shard's store goes: ``out`` itself for one shard (a plain store, as without sharding), else
    ``out/shard-XXXXX-of-YYYYY``. Refuses (naming ``out``) a plain store or other files at ``out`` for a sharded
    run, a dataset at ``out`` for a one-shard run, and shards of another count: nothing is written then."""
    from lopd_jax.store.dataset import shard_dirs, shard_name
    from lopd_jax.store.layout import has_manifest, kvstore_spec

    present = shard_dirs(out)
    counts = sorted({int(n.rsplit("-", 1)[1]) for n in present})
    if shard.count == 1:
        if present:
            raise PrecomputeError(
                f"--out {out}: is a dataset of {counts[0]} shards; this run is one process "
                f"(give --num-shards {counts[0]} --shard-index i to add to it, or a new --out)"
            )
        return out
    if has_manifest(kvstore_spec(out)):
        raise PrecomputeError(
            f"--out {out}: is a single store; a sharded run (--num-shards {shard.count}) needs a "
            "dataset directory (a new path)"
        )
    if counts and counts != [shard.count]:
        raise PrecomputeError(
            f"--out {out}: holds shards of a {counts[0]}-shard run ({present[0]}); this run has "
            f"--num-shards {shard.count}: use a new --out or the same count"
        )
    if "://" not in out and os.path.isdir(out):
        other = sorted(n for n in os.listdir(out) if n not in present and not n.startswith("."))
        if other:
            raise PrecomputeError(
                f"--out {out}: exists and is not a sharded dataset (it holds {other[0]}); "
                "nothing was written: choose a new path"
            )
    if "://" not in out:
        claim(out, shard.count)
    return join(out, shard_name(shard.index, shard.count))


DATASET_CLAIM = ".lopd_dataset.json"


def claim(out: str, count: int) -> None:
    """Claim the local dataset directory ``out`` for runs of ``count`` shards, atomically: the first run writes
    ``out/.lopd_dataset.json`` (a hard link of a finished file, so it appears whole or not at all, and a second
    creator fails); a run of another count started at the same moment is refused here instead of writing shards of
    its own count beside the first's (a dataset no reader accepts)."""
    marker = os.path.join(out, DATASET_CLAIM)
    try:
        os.makedirs(out, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lopd_dataset.", dir=out)
        with os.fdopen(fd, "w") as f:
            json.dump({"count": count}, f)
        try:
            os.link(tmp, marker)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(marker, encoding="utf-8") as f:
            claimed = json.load(f).get("count")
    except (OSError, ValueError) as e:
        raise PrecomputeError(f"--out {out}: cannot claim the dataset directory ({e})") from None
    if claimed != count:
        raise PrecomputeError(
            f"--out {out}: is claimed by a {claimed}-shard run ({marker}); this run has --num-shards {count}: use "
            "a new --out or the same count (nothing was written)"
        )


__all__ = ["Shard", "add_shard_args", "join", "resolve", "shard_store", "split"]
