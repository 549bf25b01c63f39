"""The trainer side of the adversarial pass: each bad input or crash ends as one line (exit 2) or a safe
recovery, and nothing a user wrote is lost. Validation failures call ``train.main`` in-process (nothing compiles);
docs/failure-modes.md lists every case with what the user sees and what is kept.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from helpers.fs import read_only_view
from helpers.runs import run_config, write_config, write_store

from lopd_jax import train
from lopd_jax.data.batch import LOGPROB_MAX, DataError, shift_sample
from lopd_jax.models import hf, qwen3
from lopd_jax.store import provenance
from lopd_jax.training import config as config_lib
from lopd_jax.training import run_dir as run_dir_lib
from lopd_jax.training import setup as train_setup
from lopd_jax.training.checkpoint import CheckpointConfig, Checkpointer


def _main_fails(capsys, cfg_path: Path, *overrides: str) -> str:
    """Runs the CLI in-process; asserts exit 2 with exactly one ``error:`` line and returns it."""
    rc = train.main(["--config", str(cfg_path), *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# 1. Config values
# ----------------------------------------------------------------------------------------------------------------

BAD_VALUES = {
    "optimizer.lr=-1e-3": "optimizer.lr: must be > 0",
    "optimizer.lr=0": "optimizer.lr: must be > 0",
    "optimizer.lr=.nan": "optimizer.lr: must be a finite number",
    "train.batch_size=-4": "train.batch_size: must be >= 1",
    "train.steps=0": "train.steps: must be >= 1",
    "train.seq_len=-1": "train.seq_len: must be >= 1",
    "train.eval_every=-1": "train.eval_every: must be >= 0",
    "optimizer.warmup_steps=-2": "optimizer.warmup_steps: must be >= 0",
    "optimizer.weight_decay=-0.1": "optimizer.weight_decay: must be >= 0",
    "optimizer.b2=1.0": "optimizer.b2: must be >= 0 and < 1",
    "optimizer.grad_clip=.inf": "optimizer.grad_clip: must be a finite number",
    "loss.clip_eps_low=1.5": "loss.clip_eps_low: must be >= 0 and < 1",
    "loss.tis_cap=0": "loss.tis_cap: must be > 0",
    "sampling.temperature=-1": "sampling.temperature: must be >= 0",
    "eval.temperature=.nan": "eval.temperature: must be a finite number",
    "eval.top_p=1.5": "eval.top_p: must be > 0 and <= 1",
    "data.seed=-1": "data.seed: must be >= 0",
    "checkpoint.keep=-1": "checkpoint.keep: must be >= 0",
    "mesh.tensor=0": "mesh.tensor: must be -1 (all remaining devices) or >= 1",
    "plan.device_memory_gb=0": "plan.device_memory_gb: must be > 0",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_out_of_range_values_are_refused_at_load_naming_the_override_and_key(world, tmp_path, capsys, override):
    run_dir = tmp_path / "run"
    err = _main_fails(capsys, write_config(run_config(world, run_dir), tmp_path / "c.yaml"), override)
    assert f"command-line override {override!r}" in err and BAD_VALUES[override] in err, err
    assert not run_dir.exists()


def test_every_numeric_config_key_has_a_range():
    """A new numeric field without a range would accept any value: the table must grow with the schema."""
    cfg = config_lib.build(config_lib.TrainConfig, {"mode": "sft", "model": {"init": "x"}})
    flat = config_lib.flatten(config_lib.to_dict(cfg))
    numeric = {k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric |= {"data.num_epochs", "loss.tis_cap"}  # None by default
    mesh = {f"mesh.{a}" for a in ("data", "fsdp", "tensor", "expert")}
    assert numeric - mesh - set(config_lib.RANGES) == set()


def test_misspelled_section_override_names_the_command_line(world, tmp_path, capsys):
    err = _main_fails(capsys, write_config(run_config(world, tmp_path / "run"), tmp_path / "c.yaml"), "trian.steps=3")
    assert "command-line override 'trian.steps=3'" in err and "trian: unknown key" in err
    assert "c.yaml" not in err


def test_yaml_with_invalid_utf8_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"mode: sft\nmodel: {init: caf\xe9}\n")
    err = _main_fails(capsys, path)
    assert str(path) in err and "not UTF-8" in err


def test_resume_may_change_names_real_keys(world, tmp_path, capsys):
    err = _main_fails(
        capsys, write_config(run_config(world, tmp_path / "run"), tmp_path / "c.yaml"), "resume_may_change=[x.y]"
    )
    assert "resume_may_change[0]: 'x.y' is not a config key" in err


# ----------------------------------------------------------------------------------------------------------------
# 2. Tokenizer fingerprint in the store checks
# ----------------------------------------------------------------------------------------------------------------


def _swapped_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of the tokenizer with two vocabulary ids swapped in tokenizer.json (same size, other meaning)."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (20, 21)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


@pytest.fixture(scope="module")
def swapped_stores(world, tmp_path_factory):
    """The world's sft and opd stores, re-made with the swapped tokenizer's fingerprint (same samples)."""
    root = tmp_path_factory.mktemp("swapped")
    other = provenance.fingerprint_tokenizer(_swapped_tokenizer(world["root"] / "tok", root / "tok"))
    out = {}
    for name in ("sft", "opd"):
        src = train_setup.RolloutStore.open(world["stores"][name])
        samples = [dict(src.sample(i), prompt_index=i) for i in range(len(src))]
        scored = [s.pop("teacher_logprobs") for s in samples]
        for s in samples:
            s.pop("prompt_length_", None)
        manifest = {k: src.manifest[k] for k in ("policy", "teacher", "sft_teacher") if k in src.manifest}
        out[name] = write_store(
            root / name, samples, {**manifest, "tokenizer": other}, scored if name == "opd" else None
        )
    return other, out


@pytest.mark.parametrize("mode", ["sft", "lightning_opd"])
def test_store_of_another_tokenizer_is_refused_naming_both_fingerprints(world, swapped_stores, tmp_path, capsys, mode):
    other, stores = swapped_stores
    ours = provenance.fingerprint_tokenizer(world["root"] / "student")
    assert ours != other
    store = stores["sft" if mode == "sft" else "opd"]
    cfg = run_config(world, tmp_path / "run", mode=mode, data={"store": str(store)})
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert "tokenizer mismatch" in err and ours in err and other in err and str(store) in err
    assert not (tmp_path / "run").exists()


def test_store_with_another_chat_template_is_refused(world, tmp_path, capsys):
    src = train_setup.RolloutStore.open(world["stores"]["sft"])
    samples = [dict(src.sample(i), prompt_index=i) for i in range(4)]
    for s in samples:
        s.pop("teacher_logprobs")
    manifest = {**src.manifest, "chat_template": provenance.fingerprint_text("{{ other }}")}
    manifest = {k: manifest[k] for k in ("policy", "sft_teacher", "tokenizer", "chat_template")}
    store = write_store(tmp_path / "s", samples, manifest)
    err = _main_fails(
        capsys, write_config(run_config(world, tmp_path / "run", data={"store": str(store)}), tmp_path / "c.yaml")
    )
    assert "chat template mismatch" in err and provenance.fingerprint_text("{{ other }}") in err


# ----------------------------------------------------------------------------------------------------------------
# 3. Store values checked where they are read
# ----------------------------------------------------------------------------------------------------------------


def _sample(teacher_last: float = -1.0, behavior_last: float = -2.0) -> dict:
    t = np.array([np.nan, np.nan, -0.5, teacher_last], np.float32)
    b = np.array([np.nan, np.nan, -0.7, behavior_last], np.float32)
    return {"tokens": np.arange(4, dtype=np.int32), "prompt_length": 2, "teacher_logprobs": t, "behavior_logprobs": b,
            "index": 7}  # fmt: skip


@pytest.mark.parametrize("field", ["teacher", "behavior"])
@pytest.mark.parametrize("value", [5.0, np.inf, -np.inf, 2 * LOGPROB_MAX])
def test_impossible_logprobs_are_refused_naming_sample_and_token(field, value):
    s = _sample(**{f"{field}_last": value})
    with pytest.raises(DataError, match=r"store sample 7: token 3 \(response token\) has an impossible"):
        shift_sample(s, seq_len=8)


def test_rounding_above_zero_within_the_tolerance_is_accepted():
    x = shift_sample(_sample(teacher_last=LOGPROB_MAX / 2, behavior_last=1e-6), seq_len=8, require_teacher=True)
    assert x["teacher_logprobs"][-1] == np.float32(LOGPROB_MAX / 2) and x["behavior_logprobs"][-1] == np.float32(1e-6)


def test_nan_behaviour_logprob_is_refused_when_the_loss_reads_it():
    s = _sample(behavior_last=np.nan)
    with pytest.raises(DataError, match=r"store sample 7: token 3 .* has no behaviour log-prob"):
        shift_sample(s, seq_len=8, require_behavior=True)
    assert shift_sample(s, seq_len=8)["behavior_logprobs"][-1] == 0.0  # old_policy current: never read


def test_behavior_old_policy_requires_behaviour_logprobs_in_lightning_opd(world, tmp_path):
    cfg = run_config(world, tmp_path / "run", mode="lightning_opd", loss={"old_policy": "behavior"})
    c = config_lib.load_config(write_config(cfg, tmp_path / "c.yaml"))
    assert c.data.require_behavior and c.data.require_teacher
    assert not config_lib.load_config(tmp_path / "c.yaml", ["loss.old_policy=current"]).data.require_behavior


def test_trainer_refuses_a_positive_teacher_logprob_with_one_line(world, tmp_path, capsys):
    src = train_setup.RolloutStore.open(world["stores"]["opd"])
    samples = [dict(src.sample(i), prompt_index=i) for i in range(len(src))]
    scored = [s.pop("teacher_logprobs") for s in samples]
    for lp in scored:
        lp[-1] = 5.0
    manifest = {k: src.manifest[k] for k in ("policy", "teacher", "tokenizer")}
    store = write_store(tmp_path / "s", samples, manifest, scored)
    cfg = run_config(world, tmp_path / "run", mode="lightning_opd", data={"store": str(store)}, train={"steps": 1})
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert "impossible teacher log-prob (5.0" in err and "store sample" in err


# ----------------------------------------------------------------------------------------------------------------
# 4. resume with a changed config
# ----------------------------------------------------------------------------------------------------------------


def _started_run(world, tmp_path) -> tuple[dict, Path]:
    """A run directory as a started run leaves it (config recorded), without training."""
    cfg = run_config(world, tmp_path / "run")
    loaded = config_lib.load_config(write_config(cfg, tmp_path / "c.yaml"))
    (tmp_path / "run").mkdir()
    train._record_config(loaded, train_setup.Setup(None, None, {}, ""), tmp_path / "run")
    return cfg, tmp_path / "run"


def test_resume_with_changed_config_is_refused_naming_every_key(world, tmp_path, capsys):
    cfg, run_dir = _started_run(world, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    path = write_config({**cfg, "resume": True}, tmp_path / "r.yaml")
    err = _main_fails(capsys, path, "optimizer.lr=1e-2", "data.seed=9", "mode=lightning_opd")
    for key in ("optimizer.lr", "data.seed", "mode", "data.require_teacher"):
        assert key in err, err
    assert "saved 0.003, now 0.01" in err and "resume_may_change" in err
    assert (run_dir / "config.yaml").read_text() == before
    record = json.loads((run_dir / "checkpoints" / run_dir_lib.CONFIG_RECORD).read_text())
    assert record["fingerprint"].startswith("sha256:") and record["config"]["optimizer"]["lr"] == 0.003


def test_resume_may_change_the_listed_keys_and_keeps_the_original_config(world, tmp_path):
    cfg, run_dir = _started_run(world, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    path = write_config({**cfg, "resume": True, "resume_may_change": ["train.steps"]}, tmp_path / "r.yaml")
    loaded = config_lib.load_config(path, ["train.steps=6", "logging.progress=true"])
    setup = train_setup.validated(loaded)
    assert setup.resume_changes == {"train.steps": [4, 6]}  # logging.progress is always free
    train._record_config(loaded, setup, run_dir)
    assert (run_dir / "config.yaml").read_text() == before
    assert yaml.safe_load((run_dir / "config.resume-1.yaml").read_text())["train"]["steps"] == 6
    assert train._lineage(loaded, setup)["resumed_with_changes"] == {"train.steps": [4, 6]}


def test_resume_over_an_unreadable_saved_config_is_one_line_naming_it(world, tmp_path, capsys):
    """A run from before the config record has only config.yaml; broken YAML or a file that is not a mapping is one
    line naming that file, and the file is left as it is."""
    cfg, run_dir = _started_run(world, tmp_path)
    (run_dir / "checkpoints" / run_dir_lib.CONFIG_RECORD).unlink()
    path = write_config({**cfg, "resume": True}, tmp_path / "r.yaml")
    for text, want in (("a: [1,\n", "cannot read the saved config"), ("- 1\n- 2\n", "is not a mapping")):
        (run_dir / "config.yaml").write_text(text)
        err = _main_fails(capsys, path)
        assert want in err and str(run_dir / "config.yaml") in err, err
        assert (run_dir / "config.yaml").read_text() == text


def test_resume_of_a_run_saved_before_a_section_existed(world, tmp_path, capsys):
    """A saved config without the (later) prompt section resumes when the section is at its defaults, and is
    refused, naming the key, when it is not."""
    cfg, run_dir = _started_run(world, tmp_path)
    record_path = run_dir / "checkpoints" / run_dir_lib.CONFIG_RECORD
    record = json.loads(record_path.read_text())
    assert record["config"].pop("prompt") == {"chat_template": True, "enable_thinking": None}
    record_path.write_text(json.dumps(record))
    path = write_config({**cfg, "resume": True}, tmp_path / "r.yaml")
    setup = train_setup.validated(config_lib.load_config(path))
    assert setup.resume_changes == {}
    err = _main_fails(capsys, path, "prompt.enable_thinking=false")
    assert "prompt.enable_thinking: saved '<unset>', now False" in err


def test_a_fresh_run_keeps_a_users_config_yaml_found_in_its_directory(world, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("# my notes\n")
    loaded = config_lib.load_config(write_config(run_config(world, run_dir), tmp_path / "c.yaml"))
    train._record_config(loaded, train_setup.Setup(None, None, {}, ""), run_dir)
    assert (run_dir / "config.prev-1.yaml").read_text() == "# my notes\n"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 0.003


# ----------------------------------------------------------------------------------------------------------------
# 5. A corrupt latest checkpoint
# ----------------------------------------------------------------------------------------------------------------


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(every_steps=1, keep=0, async_save=False))
    for step in (1, 2):
        ckpt.save(step, jax.tree.map(lambda x, s=step: jax.numpy.asarray(x * s), state))
    ckpt.close()
    for f in (tmp_path / "c" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(every_steps=1, keep=0, async_save=False))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, step = ckpt.restore_latest(abstract)
    err = capsys.readouterr().err
    assert step == 1 and np.array_equal(np.asarray(restored["w"]), state["w"])
    assert "WARNING: checkpoint" in err and str(tmp_path / "c" / "2") in err and str(tmp_path / "c" / "1") in err
    assert (tmp_path / "c" / "2.corrupt").is_dir()  # kept for inspection, out of the way of step 2's next save
    assert ckpt.save(2, state) and ckpt.latest_step() == 2
    ckpt.close()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(every_steps=1, async_save=False))
    ckpt.save(1, {"w": jax.numpy.ones(3)})
    ckpt.close()
    shutil.rmtree(tmp_path / "c" / "1" / "state")
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(every_steps=1, async_save=False))
    with pytest.raises(train_setup.CheckpointCorruptError, match="no readable checkpoint in .*/c: .*/c/1"):
        ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), np.float32)})
    assert isinstance(train_setup.CheckpointCorruptError("x"), train_setup.USER_ERRORS)


# ----------------------------------------------------------------------------------------------------------------
# 6. The HF export is atomic
# ----------------------------------------------------------------------------------------------------------------


def test_export_killed_before_the_rename_leaves_the_old_hf(world, tmp_path, monkeypatch):
    cfg = config_lib.load_config(write_config(run_config(world, tmp_path / "run"), tmp_path / "c.yaml"))
    model_cfg = hf.load_config(str(world["root"] / "student"))
    setup = train_setup.Setup(model_cfg, None, {}, str(world["root"] / "tok"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    params = qwen3.init_params(model_cfg, jax.random.key(0))
    train.export(cfg, setup, params, run_dir)
    first = provenance.fingerprint_weights(run_dir / "hf")

    def killed(path, **fields):  # the export is complete in its temporary directory, not yet renamed
        write_provenance(path, **fields)
        raise KeyboardInterrupt("killed mid-export")

    write_provenance = provenance.write_provenance
    monkeypatch.setattr(train.provenance, "write_provenance", killed)
    with pytest.raises(KeyboardInterrupt):
        train.export(cfg, setup, jax.tree.map(lambda x: x + 1, params), run_dir)
    assert provenance.fingerprint_weights(run_dir / "hf") == first  # the complete old export, untouched
    monkeypatch.undo()
    train.export(cfg, setup, jax.tree.map(lambda x: x + 1, params), run_dir)
    assert provenance.fingerprint_weights(run_dir / "hf") != first
    assert sorted(p.name for p in run_dir.iterdir()) == ["hf"]  # no temporary or old copies left
    assert provenance.read_provenance(run_dir / "hf")["config"] == config_lib.config_fingerprint(cfg)


# ----------------------------------------------------------------------------------------------------------------
# 7. Unwritable run directory, broken model directories
# ----------------------------------------------------------------------------------------------------------------


def test_run_dir_that_cannot_be_created_is_one_line(world, tmp_path, capsys):
    (tmp_path / "afile").write_text("user data")
    run_dir = tmp_path / "afile" / "run"
    err = _main_fails(capsys, write_config(run_config(world, run_dir), tmp_path / "c.yaml"))
    assert "logging.run_dir" in err and "cannot be created or written" in err
    assert (tmp_path / "afile").read_text() == "user data"


def test_read_only_run_dir_location_is_one_line(world, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    undo = read_only_view(tmp_path / "src", tmp_path / "ro")  # chmod, or a read-only bind mount as root (CI)
    if undo is None:
        pytest.skip("root without mount privileges: no read-only directory can be made")
    try:
        err = _main_fails(capsys, write_config(run_config(world, tmp_path / "ro" / "run"), tmp_path / "c.yaml"))
        assert "logging.run_dir" in err and "ro" in err
        assert not any((tmp_path / "ro").iterdir())
    finally:
        undo()


def _sharded_copy(world, dst: Path) -> Path:
    model_cfg, params = qwen3.load_hf(str(world["root"] / "student"))
    hf.save_hf(str(dst), model_cfg, params, max_shard_bytes=40_000)
    for name in ("tokenizer.json", "tokenizer_config.json", provenance.PROVENANCE_FILE):
        if (world["root"] / "student" / name).exists():
            shutil.copy2(world["root"] / "student" / name, dst / name)
    return dst


def test_missing_safetensors_shard_is_one_line_naming_file_and_tensor(world, tmp_path, capsys):
    model = _sharded_copy(world, tmp_path / "m")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    cfg = run_config(world, tmp_path / "run", model={"init": str(model)})
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert "model.init" in err and str(shards[1]) in err and "missing" in err and "model.layers." in err


def test_config_sizes_that_disagree_with_the_weights_name_file_and_tensor(world, tmp_path, capsys):
    model = _sharded_copy(world, tmp_path / "m")
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "intermediate_size": 48}))
    cfg = run_config(world, tmp_path / "run", model={"init": str(model)})
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert "mlp.gate_proj.weight" in err and "shape [64, 32]" in err and "implies [48, 32]" in err
    assert ".safetensors" in err and "broadcast" not in err
    with pytest.raises(hf.CheckpointError, match="gate_proj"):  # the public loader says the same
        qwen3.load_hf(str(model))


# ----------------------------------------------------------------------------------------------------------------
# 8. Two trainers on one run directory
# ----------------------------------------------------------------------------------------------------------------


_HOLD_RUN_LOCK = """
import sys, time
from pathlib import Path
from lopd_jax.training import run_dir as run_dir_lib
lock = run_dir_lib.acquire_run_lock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_second_trainer_on_a_locked_run_dir_refuses_naming_the_holder(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN_LOCK, str(run_dir)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"held"
        lock = run_dir / run_dir_lib.LOCK_FILE
        before = lock.read_text()
        cfg = run_config(world, run_dir, resume=True)
        err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
        assert f"another trainer holds this run directory: pid {holder.pid} on host" in err and str(lock) in err
        assert lock.read_text() == before  # the holder's record is untouched
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_trainer_is_taken_over_and_released(tmp_path, capsys):
    """A killed trainer's record stays in the file, but the kernel dropped its flock: the next trainer (of any host:
    a record naming another host whose lock is not held is as stale) takes over, warning with the old holder."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for host, pid in ((socket.gethostname(), dead.pid), ("elsewhere", 1)):
        (tmp_path / run_dir_lib.LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid}))
        lock = run_dir_lib.acquire_run_lock(tmp_path)
        assert json.loads((tmp_path / run_dir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert f"took over the trainer lock of pid {pid} on host {host}" in capsys.readouterr().err
        with pytest.raises(
            train_setup.TrainError, match=f"another trainer holds this run directory: pid {os.getpid()}"
        ):
            run_dir_lib.acquire_run_lock(tmp_path)  # held: even this very process cannot take it twice
        run_dir_lib.release_run_lock(lock)
        assert (tmp_path / run_dir_lib.LOCK_FILE).read_text() == ""  # released: emptied, never deleted


# ----------------------------------------------------------------------------------------------------------------
# --plan: bad inputs are one line before anything compiles
# ----------------------------------------------------------------------------------------------------------------

PLAN_BAD = {
    "model.init=qwen3-999b": "model.init: 'qwen3-999b' is neither an HF checkpoint directory",
    "mesh.data=3": "mesh: ",
    "train.batch_size=3": "train.batch_size: 3 rows",
}


@pytest.mark.parametrize("override", list(PLAN_BAD))
def test_plan_with_bad_inputs_is_one_line(world, tmp_path, capsys, override):
    cfg = run_config(world, tmp_path / "run", model={"init": "qwen3-0.6b"}, mesh={"fsdp": -1})
    path = write_config(cfg, tmp_path / "c.yaml")
    rc = train.main(["--config", str(path), "--plan", override])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert PLAN_BAD[override] in err, err
    assert not (tmp_path / "run").exists()


def test_garbled_single_file_checkpoint_is_one_line(world, tmp_path, capsys):
    """A model.safetensors that is not one (a truncated download, a wrong file) fails in safetensors' own error type
    when its header is read: still one line naming the file."""
    model = tmp_path / "m"
    shutil.copytree(world["root"] / "student", model)
    (model / hf.SINGLE_FILE).write_bytes(b"\xff" * 64)
    cfg = run_config(world, tmp_path / "run", model={"init": str(model)})
    err = _main_fails(capsys, write_config(cfg, tmp_path / "c.yaml"))
    assert "model.init" in err and hf.SINGLE_FILE in err and "unreadable" in err
