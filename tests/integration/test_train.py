"""The trainer CLI end to end on tiny models: sft / lightning_opd / opd, export, kill + resume, refusals.

One tiny student and teacher (transformers, save_pretrained) and the synthetic task's tokenizer are shared by the
module. Stores are written with RolloutStore's writer; their behaviour / teacher log-probs come from the torch
models. Runs go through ``python -m lopd_jax.train`` in subprocesses (the CLI a user types); validation failures,
which compile nothing, call ``main`` in-process.
"""

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.runs import (
    ROOT,
    ok,
    reproducible,
    run_config,
    token_logprobs,
    train_cli,
    train_env,
    write_config,
    write_store,
)
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from lopd_jax import train
from lopd_jax.data import prompts
from lopd_jax.inference.sampling import SampleOutput
from lopd_jax.models import qwen3
from lopd_jax.store import provenance
from lopd_jax.training import online_opd
from lopd_jax.training.metrics import read_metrics


def _kill_when(cfg_path: Path, marker: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI and SIGKILL it from outside as soon as ``marker`` exists (orbax renames a checkpoint's
    directory to its step number only once the checkpoint is complete), like a preemption right after a save.

    Where exactly the kill lands (still in step 3, or in step 4) varies; the test's claim does not depend on it:
    a resume from the latest complete checkpoint must reach the uninterrupted run's numbers bit for bit.
    """
    cmd = [sys.executable, "-m", "lopd_jax.train", "--config", str(cfg_path)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: a full pipe would block
        proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while not marker.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


_fwd = jax.jit(qwen3.forward, static_argnames=("cfg",))


def _same_logits_as_transformers(hf_dir: Path, params, cfg) -> np.ndarray:
    """Asserts the exported checkpoint, loaded by transformers, gives our logits for ``params``."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = np.random.default_rng(0).integers(0, 100, (2, 11))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(_fwd(params, jnp.asarray(tokens), cfg=cfg))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    return ref


def _restored_params(ckpt_dir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(ckpt_dir / str(step) / "state")
    return jax.tree.map(np.asarray, state["params"])


# ----------------------------------------------------------------------------------------------------------------
# sft (from scratch), export, kill + resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    scratch = {"init": "scratch", "config": str(world["root"] / "student" / "config.json"),
               "tokenizer": str(world["root"] / "tok")}  # fmt: skip
    cfg = run_config(world, run_dir, model=scratch)
    proc = train_cli(write_config(cfg, run_dir.parent / "sft.yaml"))
    ok(proc)
    return cfg, run_dir


def test_sft_from_scratch_exports_the_trained_params_with_provenance(world, sft_run):
    _, run_dir = sft_run
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["mode"] == "sft" and "teacher_inconsistency" not in r for r in records)
    # Trains: the SFT loss on fresh batches of the same small set falls from ln(V)-ish.
    assert records[-1]["sft/nll"] < records[0]["sft/nll"] - 0.1
    assert records[-1]["data/samples"] > records[0]["data/samples"] > 0
    cfg, params = qwen3.load_hf(str(run_dir / "hf"))
    trained = _restored_params(run_dir / "checkpoints", 4)
    _same_logits_as_transformers(run_dir / "hf", trained, cfg)
    prov = provenance.read_provenance(run_dir / "hf")
    assert prov["sft_teacher"] == world["fp"]["teacher"] and prov["training_mode"] == "sft"
    assert prov["weights"] == provenance.fingerprint_weights(run_dir / "hf")
    assert (run_dir / "hf" / "tokenizer.json").exists() and (run_dir / "curves.png").exists()
    assert any((run_dir / "tensorboard").iterdir())


def test_kill_after_checkpoint_then_resume_is_bit_identical(world, sft_run, tmp_path):
    cfg, ref_dir = sft_run
    run_dir = tmp_path / "run"
    cfg = dict(cfg, logging={**cfg["logging"], "run_dir": str(run_dir)})
    path = write_config(cfg, tmp_path / "sft.yaml")
    killed = _kill_when(path, run_dir / "checkpoints" / "2")
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill: {killed.stderr[-2000:]}"
    assert (run_dir / "checkpoints" / "2").is_dir() and not (run_dir / "hf").exists()
    ok(train_cli(path, "resume=true"))
    want, got = load_file(ref_dir / "hf" / "model.safetensors"), load_file(run_dir / "hf" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ref, res = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in res] == [1, 2, 3, 4]
    assert reproducible(res) == reproducible(ref)


# ----------------------------------------------------------------------------------------------------------------
# lightning_opd: teacher consistency
# ----------------------------------------------------------------------------------------------------------------


def _lightning(world, run_dir: Path, store: str, steps: int = 3, **extra) -> dict:
    return run_config(world, run_dir, mode="lightning_opd", data={"store": str(world["stores"][store])},
                   train={"steps": steps}, optimizer={"lr": 1e-3}, **extra)  # fmt: skip


def test_lightning_opd_runs_from_the_consistent_sft_checkpoint(world, tmp_path):
    run_dir = tmp_path / "run"
    ok(train_cli(write_config(_lightning(world, run_dir, "opd"), tmp_path / "c.yaml")))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) == 3 and all("teacher_inconsistency" not in r for r in records)
    first = records[0]
    # Step 1 runs at the init weights, which sampled (behaviour) the rollouts: KL to the behaviour policy is ~0,
    # and the advantage is log p_T - log pi_theta of the same tokens.
    assert abs(first["opd/kl_behavior_k1"]) < 1e-4 and abs(first["opd/iw_mean"] - 1) < 1e-4
    assert first["opd/adv_mean"] == pytest.approx(first["opd/teacher_student_gap"], abs=1e-6)
    cfg, params = qwen3.load_hf(str(run_dir / "hf"))
    _same_logits_as_transformers(run_dir / "hf", _restored_params(run_dir / "checkpoints", 3), cfg)
    prov = provenance.read_provenance(run_dir / "hf")
    assert prov["sft_teacher"] == world["fp"]["teacher"] and prov["init_weights"] == world["fp"]["student"]
    assert prov["weights"] != world["fp"]["student"]


def test_lightning_opd_refuses_a_store_scored_by_another_teacher(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = train.main(["--config", str(write_config(_lightning(world, run_dir, "wrong_teacher"), tmp_path / "c.yaml"))])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert world["fp"]["student"] in err and world["fp"]["teacher"] in err and "allow_teacher_inconsistency" in err
    assert not run_dir.exists()


def test_lightning_opd_with_allow_teacher_inconsistency_says_so_on_every_record(world, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _lightning(world, run_dir, "wrong_teacher", steps=2, allow_teacher_inconsistency=True)
    cfg["logging"]["progress"] = True
    proc = train_cli(write_config(cfg, tmp_path / "c.yaml"))
    ok(proc)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) == 2
    for r in records:
        assert (
            world["fp"]["student"] in r["teacher_inconsistency"]
            and world["fp"]["teacher"] in r["teacher_inconsistency"]
        )
    assert "TEACHER INCONSISTENCY ALLOWED" in proc.stderr  # the progress bar's description
    assert provenance.read_provenance(run_dir / "hf")["teacher_inconsistency"]


# ----------------------------------------------------------------------------------------------------------------
# opd (online)
# ----------------------------------------------------------------------------------------------------------------


def test_teacher_scoring_of_online_samples_matches_transformers(world):
    """samples_to_batch + the jitted teacher scorer give torch's teacher log-probs on every response token."""
    tok, teacher = world["tok"], world["teacher"]
    prompt_ids = [prompts.encode_prompt(tok, {"prompt": p}) for p in ("Add: 1+2", "Add: 33+4+5")]
    rng = np.random.default_rng(0)
    lp = [-np.abs(rng.normal(size=n)).astype(np.float32) for n in (7, 12)]  # log-probs: <= 0
    outs = [SampleOutput(rng.integers(4, 100, len(x)).astype(np.int32), x, "length") for x in lp]
    batch, stats = online_opd.samples_to_batch(prompt_ids, outs, seq_len=64)
    tcfg, tparams = qwen3.load_hf(str(world["root"] / "teacher"))
    got = np.asarray(online_opd.make_teacher_scorer(tcfg, chunk_size=16)(tparams, batch))
    for r, (p, o) in enumerate(zip(prompt_ids, outs)):
        tokens = np.concatenate([p, o.token_ids])
        want = token_logprobs(teacher, tokens)[len(p) :]
        n = len(tokens) - 1
        np.testing.assert_array_equal(batch.loss_mask[r, :n], (np.arange(1, n + 1) >= len(p)).astype(np.float32))
        np.testing.assert_allclose(got[r, len(p) - 1 : n], want, atol=2e-5)
        np.testing.assert_allclose(batch.behavior_logprobs[r, len(p) - 1 : n], o.logprobs)
        assert (got[r, n:] == 0).all() and (batch.segment_ids[r, n:] == 0).all()
    assert stats["opd/response_len_mean"] == 9.5


def test_online_opd_runs_with_sampler_teacher_and_eval(world, tmp_path):
    run_dir = tmp_path / "run"
    same_sampler = {"temperature": 1.0, "top_p": 1.0}
    cfg = run_config(
        world,
        run_dir,
        mode="opd",
        model={"teacher": str(world["root"] / "teacher")},
        data={"store": "", "prompts": str(world["prompts"]["opd"])},
        train={"steps": 2},
        sampling={"max_new_tokens": 24, **same_sampler},
        # The eval sampler settings equal the rollouts': one compiled sampler serves both.
        eval=dict(prompts=str(world["prompts"]["eval"]), k=2, grading="exact", max_new_tokens=24, **same_sampler),
        optimizer={"lr": 1e-3},
    )
    ok(train_cli(write_config(cfg, tmp_path / "c.yaml")))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("time/sample_s", "time/teacher_s", "time/update_s", "opd/teacher_student_gap"):
        assert all(np.isfinite(r[key]) for r in records), key
    # Rollouts come from the current student: at step 1 the behaviour log-probs are its own.
    assert abs(records[0]["opd/kl_behavior_k1"]) < 1e-4 and records[0]["data/tokens"] > 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 2 and 0.0 <= result["eval/pass@1"] <= 1.0 and "eval/avg@k" in records[-1]
    prov = provenance.read_provenance(run_dir / "hf")
    assert prov["opd_teacher"] == world["fp"]["teacher"] and prov["training_mode"] == "opd"
    cfg, _ = qwen3.load_hf(str(run_dir / "hf"))
    _same_logits_as_transformers(run_dir / "hf", _restored_params(run_dir / "checkpoints", 2), cfg)


# ----------------------------------------------------------------------------------------------------------------
# Bad configs: exit 2, one line naming the problem, nothing written
# ----------------------------------------------------------------------------------------------------------------


def _bad_vocab_config(world, tmp_path) -> dict:
    small = json.loads((world["root"] / "student" / "config.json").read_text()) | {"vocab_size": 64}
    (tmp_path / "small.json").write_text(json.dumps(small))
    return {"init": "scratch", "config": str(tmp_path / "small.json"), "tokenizer": str(world["root"] / "tok")}


def _store_vocab_world(world, tmp_path) -> dict:
    """A model whose vocab (100) fits the tokenizer but not a store holding id 120."""
    arch = json.loads((world["root"] / "student" / "config.json").read_text()) | {"vocab_size": 100}
    (tmp_path / "v100.json").write_text(json.dumps(arch))
    tokens = np.array([1, 5, 6, 120, 2], np.int32)
    sample = dict(tokens=tokens, prompt_length=2, finish_reason="stop", prompt_index=0, behavior_logprobs=None)
    store = write_store(tmp_path / "s", [sample], {"policy": "x"})
    model = {"init": "scratch", "config": str(tmp_path / "v100.json"), "tokenizer": str(world["root"] / "tok")}
    return {"model": model, "data": {"store": str(store)}}


def _triton_on_cpu(world, tmp_path) -> dict:
    """An MoE student (scratch) whose experts are to run as the Pallas-Triton kernels, on this CPU backend."""
    moe = json.loads((world["root"] / "student" / "config.json").read_text()) | {
        "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    }  # fmt: skip
    (tmp_path / "moe.json").write_text(json.dumps(moe))
    model = {"init": "scratch", "config": str(tmp_path / "moe.json"), "tokenizer": str(world["root"] / "tok")}
    return {"model": {**model, "moe_impl": "triton"}}


BAD = {
    "unknown key": (lambda w, t: {"train": {"stepz": 3}}, ["train.stepz", "unknown key"]),
    "wrong type": (lambda w, t: {"optimizer": {"lr": "fast"}}, ["optimizer.lr", "expected float"]),
    "missing store": (lambda w, t: {"data": {"store": str(t / "nowhere")}}, ["data.store", "nowhere"]),
    "unscored store": (
        lambda w, t: {"mode": "lightning_opd", "data": {"store": str(w["stores"]["unscored"])}},
        ["teacher columns", "unscored_store"],
    ),
    "no behaviour log-probs": (
        lambda w, t: {
            "mode": "lightning_opd",
            "loss": {"old_policy": "behavior"},
            "data": {"store": str(w["stores"]["no_behavior"])},
        },
        ["nobehavior_store", "no behaviour log-probs", "loss.old_policy"],
    ),
    "tokenizer vocab": (lambda w, t: {"model": _bad_vocab_config(w, t)}, ["vocab size mismatch", "100 tokens", "64"]),
    "store vocab": (_store_vocab_world, ["vocab size mismatch", "token id 120", "vocab_size is 100"]),
    "moe_impl the backend cannot run": (_triton_on_cpu, ["model.moe_impl", "'triton'", "backend is 'cpu'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_exit_nonzero_naming_the_problem_and_write_nothing(world, tmp_path, capsys, case):
    make, needles = BAD[case]
    run_dir = tmp_path / "run"
    cfg = run_config(world, run_dir, **make(world, tmp_path))
    rc = train.main(["--config", str(write_config(cfg, tmp_path / "c.yaml"))])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not run_dir.exists()


def test_override_error_names_the_command_line(world, tmp_path, capsys):
    path = write_config(run_config(world, tmp_path / "run"), tmp_path / "c.yaml")
    assert train.main(["--config", str(path), "train.steps=many"]) == 2
    err = capsys.readouterr().err
    assert "command-line override 'train.steps=many'" in err and "train.steps" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    cfg = train.config_lib.build(train.TrainConfig, {"mode": "sft", "model": {"init": "x"}, "train": {"steps": 9}})
    logger = train.Logger(cfg, None, None, start_time=0.0)
    logger.push(3, {"train/loss": jnp.float32(1.5)}, {"_tokens": 10.0})
    logger.push(4, {"train/loss": jnp.float32(np.nan)}, {"_tokens": 10.0})  # writes step 3: fine
    with pytest.raises(train.TrainError, match="non-finite loss nan at step 4"):
        logger.flush()


def test_prompt_stream_visits_every_prompt_once_per_epoch_and_reshuffles():
    stream = online_opd.PromptStream(num_prompts=10, batch_size=4, seed=0)
    order = [i for s in range(5) for i in stream.indices(s)]  # 20 positions = 2 epochs
    assert sorted(order[:10]) == sorted(order[10:]) == list(range(10)) and order[:10] != order[10:]
    assert online_opd.PromptStream(10, 4, seed=0).indices(3) == stream.indices(3)  # a resumed run: same prompts


def test_a_fresh_run_refuses_a_directory_holding_another_run(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    path = write_config(run_config(world, run_dir), tmp_path / "c.yaml")
    assert train.main(["--config", str(path)]) == 2
    assert "already holds checkpoints; set resume: true" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]
