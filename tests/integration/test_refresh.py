"""Refreshed Lightning OPD end to end on the tiny models of test_train: generations, provenance, kill -9 at every
phase of a refresh (pinned stop, export, rollouts, scoring) resumes to the uninterrupted run's weights."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import ROOT, ok, reproducible, run_config, train_env, write_config
from safetensors.numpy import load_file

from lopd_jax import train
from lopd_jax.store import provenance
from lopd_jax.training import refresh
from lopd_jax.training.metrics import read_metrics

STEPS = 3  # generation 0: steps 1-2, generation 1 (refreshed at step 2): step 3


def _run(cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The CLI as test_train's ``_cli``, with room for the four subprocesses of a refreshed run on a loaded CPU."""
    cmd = [sys.executable, "-m", "lopd_jax.train", "--config", str(cfg_path), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=2400)


def _refreshed(world, run_dir: Path, **refresh_cfg) -> dict:
    r = {"every_steps": 2, "prompts": 8, "prompts_file": str(world["prompts"]["opd"]),
         "teacher": str(world["root"] / "teacher"), "rollout_args": "--batch-size 8", **refresh_cfg}  # fmt: skip
    return run_config(world, run_dir, mode="lightning_opd", data={"store": str(world["stores"]["opd"])},
                   train={"steps": STEPS}, optimizer={"lr": 1e-3}, checkpoint={"every_steps": 0},
                   loss={"old_policy": "behavior"}, sampling={"temperature": 1.0, "max_new_tokens": 12},
                   refresh=r)  # fmt: skip


@pytest.fixture(scope="module")
def refreshed_run(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("refresh") / "run"
    path = write_config(_refreshed(world, run_dir), run_dir.parent / "r.yaml")
    ok(_run(path))
    return path, run_dir


def test_generations_sample_from_the_exported_student_and_continue_the_run(world, refreshed_run):
    _, run_dir = refreshed_run
    rdir = run_dir / refresh.REFRESH_DIR
    gens = json.loads((rdir / refresh.GENERATIONS_FILE).read_text())
    assert [(g["generation"], g["first_step"], g["last_step"]) for g in gens] == [(0, 0, 2), (1, 2, 3)]
    assert gens[0]["policy"] == world["fp"]["student"] and gens[-1]["reason"] == "finished"
    for g in gens[1:]:
        # each new generation was sampled by the student exported at the previous stop, scored by the SFT teacher
        export = rdir / f"gen{g['generation'] - 1}_train" / "policy"
        assert g["policy"] == provenance.fingerprint_weights(export) != world["fp"]["student"]
        assert g["teacher"] == world["fp"]["teacher"] and g["samples"] == 8 and g["teacher_tokens"] > 0
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["refresh/generation"] for r in records] == [0, 0, 1]
    for r in records:
        if r["step"] in (1, 3):  # a generation's first step runs at the weights that sampled its rollouts
            assert abs(r["opd/kl_behavior_k1"]) < 1e-4 and r["opd/iw_ess"] == pytest.approx(1.0, abs=1e-4)
        else:
            assert r["opd/kl_behavior_k3"] > 1e-7  # one update later the student has moved
    # The optimizer state and step count continue across generations: Adam's count is the run's step count.
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(STEPS) / "state")
    assert int(np.asarray(state["step"])) == STEPS
    counts = [int(np.asarray(v)) for k, v in _leaves(state["opt_state"]) if k.endswith("count")]
    assert counts and all(c == STEPS for c in counts)
    assert (run_dir / "hf" / "model.safetensors").exists() and (run_dir / "curves.png").exists()


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def _kill_group_when(cfg_path: Path, ready, *overrides: str, timeout: float = 2400) -> int:
    """Run the CLI in its own process group and SIGKILL the whole group (the loop and the stage it runs) as soon
    as ``ready()`` is true; returns the exit status (-9 when the kill landed)."""
    cmd = [sys.executable, "-m", "lopd_jax.train", "--config", str(cfg_path), *overrides]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        assert proc.returncode in (0, -signal.SIGKILL), out.read()[-3000:]
        return proc.returncode


def test_kill_at_every_refresh_phase_resumes_to_the_same_run(world, refreshed_run, tmp_path):
    ref_path, ref_dir = refreshed_run
    run_dir = tmp_path / "run"
    path = write_config(_refreshed(world, run_dir), tmp_path / "r.yaml")
    rdir = run_dir / refresh.REFRESH_DIR
    phases = {  # where each kill lands: the first moment the phase has started writing
        "pinned stop": lambda: (rdir / "stop-gen0.json").exists(),
        "export": lambda: any((rdir / "gen0_train").glob(".policy.tmp-*")),
        "rollouts": lambda: (rdir / "gen1_rollouts" / "store").exists(),
        "scoring": lambda: (rdir / "gen1_teacher" / "store").exists(),
        "generation 1 training": lambda: (rdir / "gen1_train" / "stage.log").exists(),
    }
    landed = []
    for i, (name, ready) in enumerate(phases.items()):
        code = _kill_group_when(path, ready, *(["resume=true"] if i else []))
        landed.append((name, code))
    assert sum(code == -signal.SIGKILL for _, code in landed) >= 3, landed  # most phases were really interrupted
    ok(_run(path, "resume=true"))
    want, got = load_file(ref_dir / "hf" / "model.safetensors"), load_file(run_dir / "hf" / "model.safetensors")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ref, res = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert reproducible(res) == reproducible(ref)
    gens = [json.loads((d / refresh.GENERATIONS_FILE).read_text()) for d in (ref_dir / "refresh", rdir)]
    assert [g["policy"] for g in gens[0]] == [g["policy"] for g in gens[1]]
    assert not list(run_dir.rglob(".*.tmp-*"))  # nothing half-written was left behind for a reader


def test_refresh_refusals_are_one_line(world, tmp_path, capsys):
    base = _refreshed(world, tmp_path / "run")
    cases = {
        "refresh.teacher: required": dict(teacher=None),
        "was SFT'd on answers of teacher": dict(teacher=str(world["root"] / "student")),
        "holds only 16": dict(prompts=40),
        "refresh.when: ess is computed from the rollouts' behaviour log-probs": dict(when="ess < 0.5"),
        "needs train.log_every: 1": dict(when="kl_k3 > 0.1"),
    }
    for expect, change in cases.items():
        cfg = dict(base, refresh={**base["refresh"], **change})
        if "behaviour log-probs" in expect:
            cfg["data"] = {**cfg["data"], "store": str(world["stores"]["no_behavior"])}
            cfg["loss"] = {"old_policy": "current"}
            cfg["train"] = {**cfg["train"], "log_every": 1}
        if "log_every" in expect:
            cfg["train"] = {**cfg["train"], "log_every": 2}
        assert train.main(["--config", str(write_config(cfg, tmp_path / "bad.yaml"))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], (expect, err)
        assert not (tmp_path / "run").exists()
