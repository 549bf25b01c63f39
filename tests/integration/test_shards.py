"""Sharded precompute (precompute.shards, lopd_jax.store.dataset): N processes, one dataset, no merge step.

The reference is one process writing one store (rollouts, then teacher scoring) in-process; the sharded runs are
real command lines in concurrent subprocesses (JAX engine, the tiny random Qwen3 of helpers.precompute), and the
dataset they leave must equal the reference array for array, after a kill -9 and rerun too, and train to the same
bits.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.precompute import build_model

from lopd_jax import train
from lopd_jax.store import RolloutStore, StoreError
from lopd_jax.store.dataset import RolloutDataset
from precompute import common, rollouts, shards, teacher_logprobs
from precompute.common import PrecomputeError
from precompute.validate import validate

REPO = Path(__file__).resolve().parents[2]
# 7 prompts, 2 per batch, 2 samples each: batches of 4, 4, 4, 2 samples; 2 shards take batches [0, 2) and [2, 4),
# so shard 1 starts at sample 8, a multiple of the scoring window (4): the same scoring batches as one process.
ROLL = ("--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.95", "--n", "2", "--batch-size", "2")
WINDOW = ("--window", "4")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    build_model(root / "policy", 0, eos_bias=0.17)
    build_model(root / "teacher", 1)
    rows = [{"prompt": f"Add: {i}+{i * 7}", "answer": str(8 * i)} for i in range(7)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = {"root": root, "policy": root / "policy", "teacher": root / "teacher", "prompts": root / "prompts.jsonl"}
    assert rollouts.main(roll_argv(e, root / "single")) == 0  # the reference: one process, one store
    assert teacher_logprobs.main(score_argv(e, root / "single")) == 0
    return e


def roll_argv(env, out: Path, *extra: str) -> list[str]:
    return ["--policy", str(env["policy"]), "--prompts", str(env["prompts"]), "--out", str(out), *ROLL, *extra]


def score_argv(env, store: Path, *extra: str) -> list[str]:
    return ["--teacher", str(env["teacher"]), "--store", str(store), *WINDOW, *extra]


def launch(module: str, argv: list[str], **env_extra: str) -> subprocess.Popen:
    """``python -m module argv`` in a subprocess importing this worktree, with the tests' compile cache."""
    import jax

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_DEFAULT_MATMUL_PRECISION": "highest", **env_extra}
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    cmd = [sys.executable, "-m", module, *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        out.append((p.returncode, err))
    return out


def assert_same_samples(ref: Path, got: Path) -> None:
    a, b = RolloutStore.open(ref), RolloutStore.open(got)
    assert isinstance(b, RolloutDataset) and len(a) == len(b) > 0
    assert b.teacher_committed == a.teacher_committed
    for i in range(len(a)):
        sa, sb = a.sample(i), b.sample(i)
        assert sa.keys() == sb.keys()
        for k in sa:
            np.testing.assert_array_equal(np.asarray(sb[k]), np.asarray(sa[k]), err_msg=f"sample {i} {k}")
    np.testing.assert_array_equal(b.lengths, a.lengths)
    np.testing.assert_array_equal(
        b.read_array("tokens", 3, b.num_tokens - 2), a.read_array("tokens", 3, a.num_tokens - 2)
    )


# ------------------------------------------------------------------------------------------------ launcher


@pytest.mark.parametrize(
    "env_vars, want",
    [
        ({}, (0, 1)),
        ({"LOPD_PROCESS_ID": "3", "LOPD_NUM_PROCESSES": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (3, 4)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (5, 8)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, (6, 8)),
    ],
)
def test_the_shard_comes_from_the_launcher(env_vars, want):
    got = shards.resolve(None, None, env_vars)
    assert (got.index, got.count) == want
    assert (shards.resolve(2, 1, env_vars).index, shards.resolve(2, 1, env_vars).count) == (1, 2)  # flags win


@pytest.mark.parametrize(
    "flags, env_vars, needle",
    [
        ((2, None), {}, "go together"),
        ((2, 2), {}, "index 2 of 2"),
        ((None, None), {"LOPD_PROCESS_ID": "1"}, "set together"),
        ((None, None), {"LOPD_PROCESS_ID": "x", "LOPD_NUM_PROCESSES": "2"}, "LOPD_PROCESS_ID='x'"),
        ((None, None), {"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID/SLURM_NTASKS"),
    ],
)
def test_a_bad_shard_is_refused_naming_its_source(flags, env_vars, needle):
    with pytest.raises(PrecomputeError, match=needle):
        shards.resolve(*flags, env_vars)


def test_split_parts_concatenate_to_the_whole():
    for total in range(0, 12):
        for n in range(1, 5):
            parts = [shards.split(total, shards.Shard(i, n)) for i in range(n)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


# ------------------------------------------------------------------------------------------------ end to end


def test_two_concurrent_shard_processes_equal_one_process(env):
    ds = env["root"] / "ds"
    procs = [launch("precompute.rollouts", roll_argv(env, ds, "--num-shards", "2", "--shard-index", str(i)))
             for i in range(2)]  # fmt: skip
    res = finish(procs)
    assert all(rc == 0 for rc, _ in res), [e[-2000:] for _, e in res]
    # Scoring: the launcher's variables (as SLURM / LOPD_* set them), each process scoring its own shard in place.
    procs = [launch("precompute.teacher_logprobs", score_argv(env, ds), LOPD_PROCESS_ID=str(i), LOPD_NUM_PROCESSES="2")
             for i in range(2)]  # fmt: skip
    res = finish(procs)
    assert all(rc == 0 for rc, _ in res), [e[-2000:] for _, e in res]
    assert "shard 1 of 2 (from LOPD_PROCESS_ID/LOPD_NUM_PROCESSES)" in res[1][1]
    assert sorted(p.name for p in ds.iterdir()) == [
        shards.DATASET_CLAIM,
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    m = RolloutStore.open(ds / "shard-00001-of-00002").manifest
    assert m["shard"] == {"index": 1, "count": 2, "batches": [2, 4], "of": 4, "expected": 6}
    assert m["prompts"]["sha256"] == "sha256:" + hashlib.sha256(env["prompts"].read_bytes()).hexdigest()
    assert m["args"]["shard_index"] == 1
    assert_same_samples(env["root"] / "single", ds)
    summary = validate(ds, require_teacher=True)
    assert summary["shards"] == 2 and summary["samples"] == 14 and summary["teacher_committed"] == 14


def test_kill9_of_one_shard_then_its_rerun_gives_the_same_dataset(env):
    ds = env["root"] / "ds_killed"
    argv = [roll_argv(env, ds, "--num-shards", "2", "--shard-index", str(i)) for i in range(2)]
    res = finish(
        [launch("precompute.rollouts", argv[0], **{common.KILL_ENV: "1"}), launch("precompute.rollouts", argv[1])]
    )
    assert res[0][0] == -signal.SIGKILL and res[1][0] == 0, res[0][1][-2000:]
    assert len(RolloutStore.open(ds / "shard-00000-of-00002")) == 4  # one of its two batches committed
    with pytest.raises(StoreError, match="shard-00000-of-00002: 4 of its 8 samples are committed"):
        validate(ds)
    assert rollouts.main(argv[0]) == 0  # the rerun continues at its first uncommitted batch
    score = [score_argv(env, ds, "--num-shards", "2", "--shard-index", str(i)) for i in range(2)]
    res = finish([launch("precompute.teacher_logprobs", score[0]),
                  launch("precompute.teacher_logprobs", score[1], **{common.KILL_ENV: "1"})])  # fmt: skip
    assert res[0][0] == 0 and res[1][0] == -signal.SIGKILL, res[1][1][-2000:]
    assert RolloutStore.open(ds / "shard-00001-of-00002").teacher_committed == 4
    assert teacher_logprobs.main(score[1]) == 0
    assert_same_samples(env["root"] / "single", ds)


def test_one_store_scored_by_two_processes_into_a_dataset(env):
    out = env["root"] / "split"
    argv = [score_argv(env, env["root"] / "single", "--out", str(out), "--num-shards", "2", "--shard-index", str(i))
            for i in range(2)]  # fmt: skip
    assert all(teacher_logprobs.main(a) == 0 for a in argv)
    assert_same_samples(env["root"] / "single", out)
    assert RolloutStore.open(out / "shard-00001-of-00002").manifest["shard"]["samples"] == [7, 14]


def _train_config(env, store: Path, run_dir: Path) -> Path:
    cfg = {
        "mode": "lightning_opd",
        "allow_teacher_inconsistency": True,  # the tiny policy was not SFT'd on this teacher
        "model": {"init": str(env["policy"])},
        "data": {"store": str(store), "seed": 3},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 48, "seed": 0},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "checkpoint": {"every_steps": 100},
        "logging": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_trainer_on_the_dataset_and_on_the_store_gives_bit_identical_params(env, tmp_path):
    from safetensors.numpy import load_file

    ds = env["root"] / "split"
    if not ds.exists():
        test_one_store_scored_by_two_processes_into_a_dataset(env)
    for name, store in (("store", env["root"] / "single"), ("dataset", ds)):
        assert train.main(["--config", str(_train_config(env, store, tmp_path / name))]) == 0
    a, b = (load_file(tmp_path / n / "hf" / "model.safetensors") for n in ("store", "dataset"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    init = load_file(env["policy"] / "model.safetensors")
    assert any(not np.array_equal(a[k], init[k]) for k in a if k in init)  # it trained


# ------------------------------------------------------------------------------------------------ refusals


def _copy_dataset(env, name: str) -> Path:
    src = env["root"] / "split"
    if not src.exists():
        test_one_store_scored_by_two_processes_into_a_dataset(env)
    dst = env["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".writer.lock"))
    return dst


def _edit_manifest(store: Path, **fields) -> None:
    m = json.loads((store / "manifest.json").read_text())
    for k, v in fields.items():
        if v is None:
            m.pop(k, None)
        elif isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k] = {**m[k], **v}
        else:
            m[k] = v
    (store / "manifest.json").write_text(json.dumps(m))


S0, S1 = "shard-00000-of-00002", "shard-00001-of-00002"


def _missing(d):
    shutil.rmtree(d / S1)


def _duplicate(d):
    shutil.rmtree(d / S1)
    shutil.copytree(d / S0, d / S1)


def _other_count(d):
    os.rename(d / S1, d / "shard-00001-of-00003")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_missing, f"{S1} is missing .*--shard-index 1 --num-shards 2"),
        (_duplicate, f"duplicate shard index 0: {S0} and {S1}"),
        (_other_count, "shard-00001-of-00003 is a shard of 3, but shard-00000-of-00002 is a shard of 2"),
        (lambda d: _edit_manifest(d / S1, policy="sha256:" + "0" * 64), f"{S1} disagrees with {S0} on policy"),
        (lambda d: _edit_manifest(d / S1, sampling={"temperature": 0.5}), f"{S1} disagrees .* sampling.temperature"),
        (lambda d: _edit_manifest(d / S1, prompts={"sha256": "sha256:" + "1" * 64}), f"{S1} .* prompts.sha256"),
        (lambda d: _edit_manifest(d / S1, teacher="sha256:" + "2" * 64), f"{S1} is scored by another teacher"),
        (lambda d: _edit_manifest(d / S1, shard={"count": 3}), f"{S1}: its manifest says shard count 3"),
        (lambda d: _edit_manifest(d / S1, shard=None), f"{S1} has no 'shard' field"),
    ],
)
def test_a_dataset_whose_shards_disagree_is_refused_naming_the_shard(env, damage, needle, capsys):
    d = _copy_dataset(env, "bad")
    damage(d)
    with pytest.raises(StoreError, match=needle):
        RolloutStore.open(d)
    assert teacher_logprobs.main(score_argv(env, d)) == 2  # the CLI: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(d) in err[0]


def test_the_trainer_refuses_an_incomplete_dataset(env, tmp_path, capsys):
    d = _copy_dataset(env, "incomplete")
    _edit_manifest(d / S1, shard={"expected": 8})
    assert train.main(["--config", str(_train_config(env, d, tmp_path / "run"))]) == 2
    assert f"data.store: {d}/{S1}: 7 of its 8 samples are committed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_second_writer_of_the_same_shard_fails(env, capsys):
    """A mis-set launcher giving two processes the same index: the second finds the shard's lock held."""
    d = _copy_dataset(env, "locked")
    holder = RolloutStore.open_for_append(d / S1)
    try:
        assert teacher_logprobs.main(score_argv(env, d, "--num-shards", "2", "--shard-index", "1")) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "another writer holds this store" in err and S1 in err
        # Rollouts too (before any sampling: the store is opened first).
        ds = env["root"] / "ds"
        if (ds / S1).exists():
            with RolloutStore.open_for_append(ds / S1):
                assert rollouts.main(roll_argv(env, ds, "--num-shards", "2", "--shard-index", "1")) == 2
            assert "another writer holds this store" in capsys.readouterr().err
    finally:
        holder.release()


@pytest.mark.parametrize(
    "make_out, argv_extra, needle",
    [
        ("store", ("--num-shards", "2", "--shard-index", "0"), "is a single store"),
        ("dataset", (), "is a dataset of 2 shards; this run is one process"),
        ("dataset", ("--num-shards", "3", "--shard-index", "0"), "holds shards of a 2-shard run"),
        ("file", ("--num-shards", "2", "--shard-index", "0"), "is not a sharded dataset .*notes.txt"),
        (None, ("--num-shards", "5", "--shard-index", "0"), "some shards would be empty"),
        (None, ("--num-shards", "2"), "go together"),
    ],
)
def test_rollouts_refuse_a_bad_out_or_shard_and_write_nothing(env, tmp_path, capsys, make_out, argv_extra, needle):
    out = tmp_path / "out"
    if make_out == "store":
        shutil.copytree(env["root"] / "single", out)
    elif make_out == "dataset":
        shutil.copytree(_copy_dataset(env, "for_out"), out)
    elif make_out == "file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*")) if out.exists() else []
    assert rollouts.main(roll_argv(env, out, *argv_extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and re.search(needle, err[-1]), err
    assert (sorted(str(p) for p in tmp_path.rglob("*")) if out.exists() else []) == before


def test_scoring_one_store_with_several_processes_needs_out(env, capsys):
    argv = score_argv(env, env["root"] / "single", "--num-shards", "2", "--shard-index", "0")
    assert teacher_logprobs.main(argv) == 2
    assert "needs --out DATASET" in capsys.readouterr().err
