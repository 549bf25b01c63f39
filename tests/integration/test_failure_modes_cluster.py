"""Adversarial cases at cluster scale (docs/failure-modes.md, "Cluster scale"): the lock, unfinished stores, split
scoring, resume over replaced data, prompts from a pipe, launcher variables, positions, full disks, --plan targets.

Each case failed before its fix (work lost silently, or a traceback); each now ends as one line (exit 2) or a safe
recovery with nothing lost. Precompute cases use the tiny policy of helpers.precompute; trainer cases the world
fixture of tests/integration/conftest.py, validated only (nothing compiles) unless a case needs a step.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from helpers.precompute import build_model, killed_subprocess, one_error_line, rollouts_argv, snapshot, teacher_cli
from helpers.runs import run_config, train_cli, write_config, write_store

from lopd_jax import train
from lopd_jax.store import RolloutStore, StoreError
from lopd_jax.store import lock as store_lock
from lopd_jax.store.lock import LOCK_FILE, FileLock, LockError, LockLost
from lopd_jax.training import config as config_lib
from lopd_jax.training import run_dir as run_dir_lib
from lopd_jax.training import setup as train_setup
from precompute import import_jsonl, rollouts, shards, teacher_logprobs
from precompute.common import PrecomputeError
from precompute.validate import validate


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    build_model(root / "policy", 0, eos_bias=0.17)
    rows = [{"prompt": f"Add: {i}+{i * 3}", "answer": str(4 * i)} for i in range(3)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = {"root": root, "policy": root / "policy", "prompts": root / "prompts.jsonl"}
    assert rollouts.main(rollouts_argv(e, root / "store", "--batch-size", "1")) == 0
    return e


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_FILE))
    return dst


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _main_fails(capsys, cfg_path: Path, *overrides: str) -> str:
    rc = train.main(["--config", str(cfg_path), *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.lower().startswith("warning")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ the lock


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_writer_whose_lock_file_was_deleted_or_replaced_publishes_nothing(env, tmp_path, how):
    target = _copy(env["root"] / "store", tmp_path / "s")
    first = RolloutStore.open_for_append(target)
    first.update_manifest(note="first")  # a pending change: the next flush would commit it
    lock = target / LOCK_FILE
    if how == "deleted":
        lock.unlink()
    else:
        (tmp_path / "copy").write_text(lock.read_text())
        os.replace(tmp_path / "copy", lock)
    second = RolloutStore.open_for_append(target)  # the name now names a file nobody holds: the newcomer gets it
    second.update_manifest(note="second")
    second.flush()
    with pytest.raises(LockLost, match="was deleted or replaced while this process held it"):
        first.flush()
    assert _manifest(target)["note"] == "second"  # the first writer published nothing
    second.close()
    first.release()


def test_the_lock_is_refused_on_a_mount_whose_locks_are_node_local(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"srv@tcp:/lustre {tmp_path} lustre rw,localflock 0 0\nnfs:/x {tmp_path}/nfs nfs rw,vers=3,nolock 0 0\n"
    )
    with pytest.raises(LockError, match=r"lustre mount with localflock: its file locks are local to each node"):
        store_lock.check_mount(str(tmp_path / "store"), "where", str(mounts))
    with pytest.raises(LockError, match=r"nfs mount with nolock"):
        store_lock.check_mount(str(tmp_path / "nfs" / "store"), "where", str(mounts))
    mounts.write_text(f"srv@tcp:/lustre {tmp_path} lustre rw,flock 0 0\n")
    store_lock.check_mount(str(tmp_path / "store"), "where", str(mounts))  # cluster-wide flock: fine


def test_a_filesystem_without_flock_is_one_line(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(store_lock.fcntl, "flock", no_flock)
    with pytest.raises(LockError, match="does not support flock .*nothing was written"):
        FileLock.acquire(tmp_path / "x.lock", "where")


def test_a_second_trainer_after_the_run_lock_was_deleted_stops_the_first(tmp_path):
    first = run_dir_lib.acquire_run_lock(tmp_path)
    with pytest.raises(train_setup.TrainError, match="another trainer holds this run directory: pid"):
        run_dir_lib.acquire_run_lock(tmp_path)
    (tmp_path / run_dir_lib.LOCK_FILE).unlink()
    second = run_dir_lib.acquire_run_lock(tmp_path)
    second.verify()
    with pytest.raises(LockLost, match="deleted or replaced"):
        first.verify("save the checkpoint of step 4")
    # The trainer asks before every metric row, checkpoint and export: the Logger writes nothing after a loss.
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(log_every=1, steps=10))
    logger = train.Logger(cfg, _Rows(), None, 0.0, first.verify)
    logger.pending = (1, {"train/loss": np.float32(1.0)}, {})
    with pytest.raises(LockLost):
        logger.flush()
    assert logger.writer.rows == []
    second.release()
    first.release()


class _Rows:
    def __init__(self):
        self.rows = []

    def write(self, step, record):
        self.rows.append(step)


# ------------------------------------------------------------------------------------------------ unfinished stores


@pytest.fixture(scope="module")
def killed(env):
    """Rollouts killed after 1 of its 3 batches (1 prompt each): a consistent store, but not a finished one."""
    out = env["root"] / "killed"
    proc = killed_subprocess("precompute.rollouts", rollouts_argv(env, out, "--batch-size", "1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(RolloutStore.open(out)) == 1
    return out


def test_an_unfinished_plain_store_is_refused_by_scoring_validate_and_training(env, killed, tmp_path, capsys):
    before = snapshot(killed)
    proc = teacher_cli(env, killed)
    assert proc.returncode == 2 and "1 of its 3 samples are committed" in one_error_line(proc.stderr)
    proc = teacher_cli(env, killed, "--out", str(tmp_path / "copy"))
    assert proc.returncode == 2 and not (tmp_path / "copy").exists()
    proc = teacher_cli(env, killed, "--out", str(tmp_path / "split"), "--num-shards", "2", "--shard-index", "0")
    assert proc.returncode == 2 and not (tmp_path / "split").exists()
    assert snapshot(killed) == before
    for require in (False, True):
        with pytest.raises(StoreError, match="1 of its 3 samples are committed .*rerun the same command"):
            validate(killed, require_teacher=require)
    cfg = {
        "mode": "sft",
        "model": {"init": str(env["policy"])},
        "data": {"store": str(killed)},
        "train": {"steps": 1, "batch_size": 8, "seq_len": 32},
        "logging": {"run_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert f"data.store: {killed}: 1 of its 3 samples are committed" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ split scoring


def test_scorers_with_different_windows_tile_the_store_exactly(env, tmp_path):
    src, out = env["root"] / "store", tmp_path / "split"
    for i, window in ((0, "1"), (1, "2")):  # flags that differ between the processes must not move the boundary
        argv = ["--teacher", str(env["policy"]), "--store", str(src), "--out", str(out), "--batch-tokens", "64"]
        argv += ["--window", window, "--num-shards", "2", "--shard-index", str(i)]
        assert teacher_logprobs.main(argv) == 0
    ds, ref = RolloutStore.open(out), RolloutStore.open(src)
    assert len(ds) == len(ref) == 3 and validate(out, require_teacher=True)["samples"] == 3
    for i in range(3):
        np.testing.assert_array_equal(ds.sample(i)["tokens"], ref.sample(i)["tokens"])
    assert [ds.stores[k].manifest["shard"]["samples"] for k in range(2)] == [[0, 1], [1, 3]]


def test_a_dataset_whose_parts_leave_a_gap_is_refused(env, tmp_path):
    out = tmp_path / "split"
    for i in range(2):
        argv = ["--teacher", str(env["policy"]), "--store", str(env["root"] / "store"), "--out", str(out)]
        assert teacher_logprobs.main([*argv, "--batch-tokens", "64", "--num-shards", "2", "--shard-index", str(i)]) == 0
    shard1 = out / "shard-00001-of-00002"
    m = _manifest(shard1)
    m["shard"]["samples"] = [2, 3]  # what a scorer that cut its part elsewhere records: sample 1 is in no shard
    (shard1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"shard-00001-of-00002 holds samples \[2, 3\] .*starting at 1.* gap"):
        validate(out)


def test_more_shards_than_samples_or_batches_is_refused_by_every_shard(env, tmp_path, capsys):
    for i in range(4):  # 3 batches of 1 prompt: shard 0 and shard 3 alike refuse, nothing is written
        argv = rollouts_argv(env, tmp_path / "ds", "--batch-size", "1", "--num-shards", "4", "--shard-index", str(i))
        assert rollouts.main(argv) == 2
        assert "some shards would be empty" in one_error_line(capsys.readouterr().err)
        argv = ["--teacher", str(env["policy"]), "--store", str(env["root"] / "store"), "--out", str(tmp_path / "sc")]
        assert teacher_logprobs.main([*argv, "--num-shards", "4", "--shard-index", str(i)]) == 2
        assert "has only 3 samples to share" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "sc").exists()


def test_the_trainer_refuses_one_shard_of_a_dataset(env, tmp_path, capsys):
    out = tmp_path / "split"
    for i in range(2):
        argv = ["--teacher", str(env["policy"]), "--store", str(env["root"] / "store"), "--out", str(out)]
        assert teacher_logprobs.main([*argv, "--batch-tokens", "64", "--num-shards", "2", "--shard-index", str(i)]) == 0
    capsys.readouterr()
    cfg = {
        "mode": "sft",
        "model": {"init": str(env["policy"])},
        "data": {"store": str(out / "shard-00000-of-00002")},
        "train": {"steps": 1, "batch_size": 8, "seq_len": 32},
        "logging": {"run_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert f"is shard 0 of 2 of the dataset {out}" in err and f"set data.store: {out}" in err


# ------------------------------------------------------------------------------------------------ launcher


def test_launcher_variables_that_disagree_are_an_error_naming_both():
    env = {"LOPD_PROCESS_ID": "0", "LOPD_NUM_PROCESSES": "2", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    with pytest.raises(PrecomputeError, match=r"LOPD_PROCESS_ID/LOPD_NUM_PROCESSES say shard 0 of 2, SLURM_ARRAY"):
        shards.resolve(None, None, env)
    agree = {**env, "LOPD_PROCESS_ID": "3", "LOPD_NUM_PROCESSES": "4"}
    assert shards.resolve(None, None, agree).index == 3
    assert shards.resolve(4, 1, env).index == 1  # the flags are explicit: they win


# ------------------------------------------------------------------------------------------------ inputs


def test_prompts_from_a_pipe_are_hashed_as_read(env, tmp_path):
    data = env["prompts"].read_bytes()
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        argv = rollouts_argv(env, tmp_path / "s", prompts=Path(f"/dev/fd/{r}"))
        assert rollouts.main(argv) == 0
    finally:
        writer.join()
        os.close(r)
    m = RolloutStore.open(tmp_path / "s").manifest
    assert m["prompts"]["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert m["prompts"]["sha256"] != "sha256:" + hashlib.sha256(b"").hexdigest()


# Qwen3's chat template raises on a role it does not know; the tiny policy's template renders any role.
QWEN3_ROLE_CHECK = (
    "{%- for message in messages %}{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unexpected message role.') }}{%- endif %}{%- endfor %}"
)


def test_an_empty_prompt_and_an_unknown_role_name_the_file_line(env, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "Add: 1+1"}\n{"prompt": ""}\n')
    assert rollouts.main(rollouts_argv(env, tmp_path / "a", "--no-chat-template", prompts=bad)) == 2
    assert f"{bad}:2: the prompt encodes to no tokens" in one_error_line(capsys.readouterr().err)
    bad.write_text('{"prompt": "Add: 1+1"}\n{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    policy = tmp_path / "policy"  # with a template that refuses unknown roles, as Qwen3's does
    shutil.copytree(env["policy"], policy)
    template = (policy / "chat_template.jinja").read_text()
    (policy / "chat_template.jinja").write_text(QWEN3_ROLE_CHECK + template)
    assert rollouts.main(rollouts_argv({**env, "policy": policy}, tmp_path / "a", prompts=bad)) == 2
    assert f"{bad}:2: the chat template cannot render this row" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


def test_positions_past_max_position_embeddings_are_refused(env, tmp_path, capsys):
    assert rollouts.main(rollouts_argv(env, tmp_path / "a", "--max-new-tokens", "250")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{env['prompts']}:" in line and "exceeds the policy's max_position_embeddings 256" in line
    data = tmp_path / "long.jsonl"  # SFT data longer than the teacher's positions (the tokenizer has no limit)
    data.write_text(json.dumps({"prompt": "Add: 1+1", "completion": "7" * 300}) + "\n")
    assert (
        import_jsonl.main(["--tokenizer", str(env["policy"]), "--data", str(data), "--out", str(tmp_path / "l")]) == 0
    )
    argv = ["--teacher", str(env["policy"]), "--store", str(tmp_path / "l")]
    before = snapshot(tmp_path / "l")
    assert teacher_logprobs.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "sample 0 has" in line and "more than the teacher's max_position_embeddings 256" in line
    assert snapshot(tmp_path / "l") == before


def test_top_k_larger_than_the_vocabulary_is_refused_before_the_copy(env, tmp_path, capsys):
    argv = ["--teacher", str(env["policy"]), "--store", str(env["root"] / "store"), "--out", str(tmp_path / "c")]
    assert teacher_logprobs.main([*argv, "--top-k", "500"]) == 2
    assert "--top-k 500 is larger than the teacher's vocabulary (128 tokens" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()
    assert teacher_logprobs.main([*argv, "--top-k", "3", "--batch-tokens", "64"]) == 0  # the corrected rerun


# ------------------------------------------------------------------------------------------------ full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped elsewhere), grown with ``grow()``; unmounted at the end."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=16m", str(where)], check=True)

    yield where, grow
    subprocess.run(["umount", str(where)])


def test_a_full_disk_during_rollouts_is_one_line_and_the_rerun_finishes(env, small_disk, capsys):
    disk, grow = small_disk
    out = disk / "s"
    argv = rollouts_argv(env, out, "--batch-size", "1", "--max-new-tokens", "64", "--n", "64")
    assert rollouts.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "rerun the same command" in line
    assert not [p for p in disk.rglob("*") if p.name.startswith(".manifest.") or ".creating-" in p.name]
    if out.exists():
        validate_ok = _manifest(out)["committed"] % 64 == 0  # whole batches only
        assert validate_ok
    grow()
    assert rollouts.main(argv) == 0
    assert validate(out)["samples"] == 3 * 64


# ------------------------------------------------------------------------------------------------ trainer


def _recorded_run(world, tmp_path, store: Path) -> tuple[dict, Path]:
    """A run directory as a started run on ``store`` leaves it (its config and store identity recorded)."""
    cfg = run_config(world, tmp_path / "run", data={"store": str(store)})
    loaded = config_lib.load_config(write_config(cfg, tmp_path / "c.yaml"))
    setup = train_setup.validated(loaded)
    (tmp_path / "run").mkdir()
    train._record_config(loaded, setup, tmp_path / "run")
    return cfg, tmp_path / "run"


def test_resume_over_replaced_data_is_refused(world, tmp_path, capsys):
    store = _copy(world["stores"]["sft"], tmp_path / "s")
    cfg, _ = _recorded_run(world, tmp_path, store)
    src = RolloutStore.open(store)
    other = [dict(src.sample(i), prompt_index=i) for i in reversed(range(len(src)))]  # other rollouts, same path
    for s in other:
        s.pop("teacher_logprobs")
    manifest = {k: v for k, v in src.manifest.items() if k in ("policy", "tokenizer", "sft_teacher")}
    manifest["rollouts"] = "another run"  # a field of its own: the manifest differs even within the same second
    shutil.rmtree(store)
    write_store(store, other, manifest)
    err = _main_fails(capsys, write_config({**cfg, "resume": True}, tmp_path / "r.yaml"))
    assert f"resume: data.store {store} is not the data this run trained on" in err
    assert "manifest: saved sha256:" in err and "content: saved sha256:" in err
    allowed = {**cfg, "resume": True, "resume_may_change": ["data.store"]}
    # the user's explicit choice
    train_setup.validated(config_lib.load_config(write_config(allowed, tmp_path / "a.yaml")))


def test_resume_on_a_run_whose_checkpoints_were_deleted_is_refused(world, tmp_path, capsys):
    cfg, run_dir = _recorded_run(world, tmp_path, Path(world["stores"]["sft"]))
    (run_dir / "metrics.jsonl").write_text('{"step": 2, "train/loss": 1.0}\n')
    before = snapshot(run_dir)
    err = _main_fails(capsys, write_config({**cfg, "resume": True}, tmp_path / "r.yaml"))
    assert f"resume: {run_dir} holds metrics.jsonl of a run but" in err and "has no checkpoint" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "target, mesh, needle",
    [
        ("", {"fsdp": -1}, "--target '': unknown target"),
        ("tpu-v5p-8", {"fsdp": 8}, "(data=1, fsdp=8, tensor=1, expert=1) cannot be laid over --target tpu-v5p-8's 4"),
    ],
)
def test_plan_target_errors_are_one_line(world, tmp_path, capsys, target, mesh, needle):
    cfg = run_config(world, tmp_path / "run", model={"init": "qwen3-0.6b"}, mesh=mesh)
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"), "--plan", "--target", target)
    assert needle in err, err


def test_training_positions_past_max_position_embeddings_are_refused(world, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(world["root"] / "student", student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    cfg = run_config(world, tmp_path / "run", model={"init": str(student)})
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert "exceed the model's max_position_embeddings 16; lower train.seq_len" in err


def test_a_full_disk_during_training_is_one_line_and_resume_finishes(world, small_disk, tmp_path):
    disk, grow = small_disk
    # Room for the checkpoint of step 2 (0.6 MiB on disk, 1.3 MiB asked), not for a second one: refused at step 4.
    subprocess.run(["mount", "-o", "remount,size=1600k", str(disk)], check=True)
    cfg = run_config(world, disk / "run", train={"steps": 4}, logging={"tensorboard": False})
    proc = train_cli(write_config(cfg, tmp_path / "c.yaml"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]  # no flood of orbax's thread tracebacks
    assert "MiB free, the checkpoint of step 4 needs about" in line, line
    assert "the checkpoint of step 2 is kept: free space, then rerun with resume: true" in line
    grow()
    proc = train_cli(write_config({**cfg, "resume": True}, tmp_path / "r.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (disk / "run" / "hf" / "model.safetensors").is_file()


def test_a_checkpoint_write_failure_in_orbax_is_one_line(tmp_path):
    from lopd_jax.training.checkpoint import CheckpointConfig, Checkpointer, CheckpointWriteError

    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, async_save=False))

    def full(*args, **kwargs):  # what orbax raises from its writer threads when the disk is full
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/.zarray": No space left on device [28]\n  more')

    ckpt._manager.save = full
    with pytest.raises(
        CheckpointWriteError, match=r"cannot write the checkpoint of step 1 .*: No space left on device;"
    ):
        ckpt.save(1, {"w": np.zeros(3, np.float32)})
    ckpt._manager.wait_until_finished = full
    with pytest.raises(CheckpointWriteError, match="no checkpoint was written yet"):
        ckpt.close()


def test_a_new_store_is_readable_by_the_group_as_the_umask_says(env, tmp_path):
    """mkdtemp / mkstemp make 0o700 / 0o600: a store built that way was unreadable to the rest of a shared group."""
    old = os.umask(0o022)
    try:
        w = RolloutStore.create(tmp_path / "s", {"kind": "test"})
        w.close()
    finally:
        os.umask(old)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "s" / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_a_rewritten_weight_file_with_the_same_size_and_mtime_is_fingerprinted_again(env, tmp_path):
    """A clock that jumps back (or cp -p, rsync -t, a coarse NFS mtime) can give new weights the old size and mtime."""
    from lopd_jax.store import provenance

    model = tmp_path / "m"
    shutil.copytree(env["policy"], model)
    first = provenance.fingerprint_weights(model)
    other = tmp_path / "other"
    build_model(other, 5)
    f = model / "model.safetensors"
    st = f.stat()
    assert (other / "model.safetensors").stat().st_size == st.st_size
    shutil.copyfile(other / "model.safetensors", f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime back
    assert provenance.fingerprint_weights(model) != first


def test_two_jobs_with_different_shard_counts_cannot_share_a_dataset_directory(tmp_path):
    """Started at the same moment into an empty directory, both pass the count check of the shards present (none);
    the directory's claim lets the first one in and refuses the other before it writes a shard."""
    out = str(tmp_path / "ds")
    assert shards.shard_store(out, shards.Shard(0, 2)).endswith("shard-00000-of-00002")
    with pytest.raises(PrecomputeError, match=r"is claimed by a 2-shard run .*this run has --num-shards 3"):
        shards.shard_store(out, shards.Shard(1, 3))
    assert shards.shard_store(out, shards.Shard(1, 2)).endswith("shard-00001-of-00002")
    assert sorted(os.listdir(out)) == [shards.DATASET_CLAIM]  # no temp file left
