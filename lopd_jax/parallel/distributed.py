"""Multi-process (multi-host) start-up: ``initialize()`` joins the JAX processes of one run into one runtime.

Call it first thing in a launcher, before anything touches a device. A run is multi-process when either
  * the explicit variables are set (any launcher, and the loopback test):
      LOPD_COORDINATOR=host:port  LOPD_NUM_PROCESSES=N  LOPD_PROCESS_ID=i  [LOPD_LOCAL_DEVICE_IDS=0,1,...]
    (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are accepted as the same three),
  * or a cluster JAX detects by itself launched several tasks (SLURM with SLURM_NTASKS > 1, Open MPI with
    OMPI_COMM_WORLD_SIZE > 1, multi-host Cloud TPU); then ``jax.distributed.initialize()`` reads the cluster.
Otherwise (one process) it does nothing, so the same command runs on a laptop and on a cluster.

After it, ``jax.devices()`` lists every device of every process and one ``Mesh`` spans them all; each process
feeds its own rows of the global batch (``global_batch``), as ``lopd_jax.data.loader`` reads only its slice of the
store.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

ENV_COORDINATOR = "LOPD_COORDINATOR"
ENV_NUM_PROCESSES = "LOPD_NUM_PROCESSES"
ENV_PROCESS_ID = "LOPD_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LOPD_LOCAL_DEVICE_IDS"
ENV_TIMEOUT = "LOPD_INIT_TIMEOUT_S"


class DistributedError(RuntimeError):
    """A malformed multi-process launch (bad or incomplete LOPD_* variables)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was launched: ``mode`` is "single", "explicit" (LOPD_* variables) or "cluster"."""

    mode: str
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: int = 300


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r}: expected an integer") from None


def _cluster_size(env: Mapping[str, str]) -> int:
    """Tasks launched by a cluster manager JAX auto-detects (SLURM, Open MPI, multi-host TPU); 1 if none."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(name, "").isdigit() and int(env[name]) > 1:
            return int(env[name])
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts)


_ALIASES = {
    ENV_COORDINATOR: "JAX_COORDINATOR_ADDRESS",
    ENV_NUM_PROCESSES: "JAX_NUM_PROCESSES",
    ENV_PROCESS_ID: "JAX_PROCESS_ID",
}


def _with_aliases(env: Mapping[str, str]) -> dict[str, str]:
    out = dict(env)
    for ours, theirs in _ALIASES.items():
        if not out.get(ours) and out.get(theirs):
            out[ours] = out[theirs]
    return out


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read the launch from the environment (``os.environ`` by default); raises DistributedError when the
    LOPD_* variables are incomplete or inconsistent."""
    env = _with_aliases(os.environ if env is None else env)
    timeout = _int_env(env, ENV_TIMEOUT) if ENV_TIMEOUT in env else 300
    explicit = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if env.get(n)]
    if explicit:
        n = _int_env(env, ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else 0
        if n > 1 and len(explicit) < 3:
            missing = sorted({ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID} - set(explicit))
            raise DistributedError(f"multi-process launch: {', '.join(missing)} not set (got {explicit})")
        if n > 1:
            pid = _int_env(env, ENV_PROCESS_ID)
            if not 0 <= pid < n:
                raise DistributedError(f"{ENV_PROCESS_ID}={pid} is outside [0, {ENV_NUM_PROCESSES}={n})")
            ids = env.get(ENV_LOCAL_DEVICE_IDS)
            local = tuple(int(i) for i in ids.split(",")) if ids else None
            return Launch("explicit", env[ENV_COORDINATOR], n, pid, local, timeout)
    if _cluster_size(env) > 1:
        return Launch("cluster", num_processes=_cluster_size(env), timeout_s=timeout)
    return Launch("single")


def initialize(env: Mapping[str, str] | None = None) -> Launch:
    """Join the run's processes (see module doc); a no-op for a single process or when already initialized.

    Returns the detected Launch. Must run before the first device use of this process.
    """
    launch = detect_launch(env)
    if launch.mode == "single" or jax.distributed.is_initialized():
        return launch
    if launch.mode == "explicit":
        jax.distributed.initialize(
            coordinator_address=launch.coordinator,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None,
            initialization_timeout=launch.timeout_s,
        )
    else:
        jax.distributed.initialize(initialization_timeout=launch.timeout_s)
    return launch


def global_batch(local: Any, sharding: Sharding, global_rows: int | None = None) -> Any:
    """One global array per leaf from this process's rows: ``local`` leaves are [B / P, ...] numpy arrays.

    Process p's rows become rows [p * B / P, (p + 1) * B / P) of the global [B, ...] array (with a sharding that
    splits the batch dim in process-major order, as ``sharding.batch_sharding`` over ``make_mesh`` does).
    """

    def one(x: np.ndarray) -> jax.Array:
        rows = global_rows or x.shape[0] * jax.process_count()
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), (rows, *x.shape[1:]))

    return jax.tree.map(one, local)
