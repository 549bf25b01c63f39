"""Multi-process readiness: two CPU processes over loopback form one 8-device mesh and take the same sharded
update step as one process with 8 devices. Also the launch detection of ``lopd_jax.parallel.distributed``.

Run as a script (``python tests/integration/test_distributed.py worker``) this file is the worker of one process.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS, SEQ, LOCAL_DEVICES = 8, 16, 4


def _tiny_cfg():
    from lopd_jax.models import qwen3

    return qwen3.Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip


def _full_batch() -> dict[str, np.ndarray]:
    """The global batch, identical in every process (each then keeps only its own rows)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (ROWS, SEQ + 1)).astype(np.int32)
    mask = (np.arange(SEQ) >= 4).astype(np.float32)[None].repeat(ROWS, 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
        "segment_ids": np.ones((ROWS, SEQ), np.int32),
        "loss_mask": mask,
        "teacher_logprobs": (rng.normal(size=(ROWS, SEQ)).astype(np.float32) - 5.0) * mask,
        "behavior_logprobs": (rng.normal(size=(ROWS, SEQ)).astype(np.float32) - 5.0) * mask,
    }


def step_result(process_index: int, process_count: int) -> dict[str, float]:
    """One sharded OPD update step (fsdp over every device of every process) on this process's rows."""
    import jax
    import jax.numpy as jnp

    from lopd_jax import losses, update
    from lopd_jax.data.loader import Batch
    from lopd_jax.models import qwen3
    from lopd_jax.parallel import distributed, sharding

    cfg = _tiny_cfg()
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    p_sh = qwen3.param_shardings(cfg, mesh)
    params = jax.jit(qwen3.init_params, static_argnums=0, out_shardings=p_sh)(cfg, jax.random.key(0))
    opt = update.make_optimizer(update.OptimizerConfig(lr=1e-2))
    state = update.init_train_state(params, opt, jax.random.key(1))
    state_sh = update.state_shardings(state, mesh, param_shardings=p_sh)
    batch_sh = sharding.batch_sharding(mesh)
    rows = ROWS // process_count
    local = {k: v[process_index * rows : (process_index + 1) * rows] for k, v in _full_batch().items()}
    batch = Batch(**distributed.global_batch(local, batch_sh, ROWS))
    loss_fn = functools.partial(losses.opd_loss, cfg=cfg, loss_cfg=losses.LossConfig())
    step = update.make_update_step(loss_fn, opt, mesh=mesh, state_shardings=state_sh, batch_sharding=batch_sh)
    state, metrics = step(state, batch)
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))(state.params)
    return {
        "loss": float(metrics["train/loss"]),
        "grad_norm": float(metrics["train/grad_norm"]),
        "param_abs_sum": float(checksum),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
    }


def _worker() -> None:
    from lopd_jax.parallel import distributed

    launch = distributed.initialize()
    import jax

    out = step_result(jax.process_index(), jax.process_count())
    print("RESULT " + json.dumps({**out, "process": jax.process_index(), "mode": launch.mode}), flush=True)
    jax.distributed.shutdown()  # both processes leave together; without it exit waits on the coordinator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_loopback_match_one_process():
    port = _free_port()
    base = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
        "LOPD_COORDINATOR": f"127.0.0.1:{port}",
        "LOPD_NUM_PROCESSES": "2",
        "LOPD_INIT_TIMEOUT_S": "120",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker"],
            env={**base, "LOPD_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
        results.append(json.loads(next(ln for ln in text.splitlines() if ln.startswith("RESULT "))[7:]))
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["mode"] == "explicit" and r["devices"] == 8 and r["local_devices"] == 4 for r in results)
    # Both processes print the same global result ...
    for key in ("loss", "grad_norm", "param_abs_sum"):
        assert results[0][key] == results[1][key], key
    # ... which is the single-process result on 8 local devices (conftest), up to reduction order.
    import jax

    assert len(jax.devices()) == 8 and jax.process_count() == 1
    ref = step_result(0, 1)
    for key in ("loss", "grad_norm", "param_abs_sum"):
        np.testing.assert_allclose(results[0][key], ref[key], rtol=2e-5, err_msg=key)
    assert ref["grad_norm"] > 0 and np.isfinite(ref["loss"])


def test_detect_launch_modes():
    from lopd_jax.parallel.distributed import DistributedError, detect_launch

    assert detect_launch({}).mode == "single"
    assert detect_launch({"LOPD_NUM_PROCESSES": "1"}).mode == "single"
    launch = detect_launch(
        {"LOPD_COORDINATOR": "10.0.0.1:1234", "LOPD_NUM_PROCESSES": "4", "LOPD_PROCESS_ID": "3",
         "LOPD_LOCAL_DEVICE_IDS": "0,1"}
    )  # fmt: skip
    assert (launch.mode, launch.coordinator, launch.num_processes, launch.process_id) == (
        "explicit",
        "10.0.0.1:1234",
        4,
        3,
    )
    assert launch.local_device_ids == (0, 1)
    alias = detect_launch({"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    assert (alias.mode, alias.coordinator, alias.process_id) == ("explicit", "h:2", 1)
    assert detect_launch({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}).mode == "cluster"
    assert detect_launch({"SLURM_NTASKS": "1"}).mode == "single"
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "a,b"}).num_processes == 2
    with pytest.raises(DistributedError, match="LOPD_COORDINATOR"):
        detect_launch({"LOPD_NUM_PROCESSES": "2", "LOPD_PROCESS_ID": "0"})
    with pytest.raises(DistributedError, match="outside"):
        detect_launch({"LOPD_COORDINATOR": "h:1", "LOPD_NUM_PROCESSES": "2", "LOPD_PROCESS_ID": "2"})
    with pytest.raises(DistributedError, match="expected an integer"):
        detect_launch({"LOPD_COORDINATOR": "h:1", "LOPD_NUM_PROCESSES": "two", "LOPD_PROCESS_ID": "0"})


def test_initialize_is_a_noop_for_one_process():
    import jax

    from lopd_jax.parallel.distributed import initialize

    assert initialize({}).mode == "single"
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()
