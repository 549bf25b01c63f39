"""Adversarial cases of the precompute tools and the store (the table is in docs/failure-modes.md).

Each test is a case that failed before: a user directory written into, two writers on one store, a damaged zarr
chunk, bad prompt files and models, a read-only store, a failed run blocking its corrected rerun, empty stores,
and import_jsonl's bad rows / reruns / kill -9. Every refusal must be one line, exit 2, nothing of the user's lost.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.fs import read_only_view
from helpers.precompute import (
    REPO,
    assert_same_store,
    build_model,
    killed_subprocess,
    one_error_line,
    rollouts_argv,
    snapshot,
    teacher_cli,
)

from lopd_jax.models import hf
from lopd_jax.store import RolloutStore, StoreError, provenance
from lopd_jax.store.lock import LOCK_FILE
from precompute import common, import_jsonl, rollouts, teacher_logprobs
from precompute.validate import validate


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("failure_modes")
    build_model(root / "policy", 0, eos_bias=0.17)
    rows = [{"prompt": f"Add: {i}+{i * 3}", "answer": str(4 * i)} for i in range(3)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "policy": root / "policy", "prompts": prompts}


@pytest.fixture(scope="module")
def store(env):
    """A small greedy rollout store of the policy (scored in place by the policy itself where a test needs it)."""
    out = env["root"] / "store"
    assert rollouts.main(rollouts_argv(env, out)) == 0
    return out


# ------------------------------------------------------------------------------------------------ 1: user dirs


def test_rollouts_refuse_a_directory_that_is_not_a_store(env, capsys):
    user = env["root"] / "user_dir"
    (user / "tokens").mkdir(parents=True)
    (user / "tokens" / "mydata.txt").write_text("precious")
    model_copy = env["root"] / "model_copy"
    shutil.copytree(env["policy"], model_copy)
    for d in (user, model_copy):
        before = snapshot(d)
        assert rollouts.main(rollouts_argv(env, d)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{d}: exists and is not a RolloutStore" in line and "nothing was written" in line
        assert snapshot(d) == before  # no lock file, no zarr arrays, nothing deleted
    assert not [p for p in env["root"].iterdir() if ".creating-" in p.name]  # no half-made store left beside
    empty = env["root"] / "empty_dir"
    empty.mkdir()
    assert rollouts.main(rollouts_argv(env, empty)) == 0  # an empty directory is a fine place for a store
    assert len(RolloutStore.open(empty)) == 3


# ------------------------------------------------------------------------------------------------ 2: one writer

_HOLD_AND_DIE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from lopd_jax.store import RolloutStore
w = RolloutStore.open_for_append({path!r})
os.kill(os.getpid(), signal.SIGKILL)  # a writer that crashes while it holds the lock
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(env, store, capsys):
    target = env["root"] / "locked"
    shutil.copytree(store, target)
    holder = RolloutStore.open_for_append(target)  # this process is the first writer (mid-run)
    before = snapshot(target)
    proc = teacher_cli(env, target)  # a second, real process scoring the same store in place
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert f"another writer holds this store: pid {os.getpid()} on host" in line and str(target) in line
    assert snapshot(target) == before
    with pytest.raises(StoreError, match="another writer holds this store"):  # in-process too
        RolloutStore.open_for_append(target)
    holder.close()
    assert json.loads(target.joinpath("manifest.json").read_text())["teacher_committed"] == 0

    script = textwrap.dedent(_HOLD_AND_DIE).format(root=str(REPO), path=str(target))
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    dead_pid = json.loads((target / LOCK_FILE).read_text())["pid"]
    capsys.readouterr()
    assert teacher_logprobs.main(["--teacher", str(env["policy"]), "--store", str(target)]) == 0
    err = capsys.readouterr().err
    assert f"took over the writer lock of pid {dead_pid}" in err and "is no longer running" in err
    assert RolloutStore.open(target).teacher_committed == 3
    assert (target / LOCK_FILE).read_text() == ""  # a clean exit leaves no record behind


# ------------------------------------------------------------------------------------------------ 3: damage


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_chunk_is_one_line_in_validate_the_reader_and_the_trainer(env, store, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    _truncate(damaged / "behavior_logprobs" / "c" / "0")
    proc = subprocess.run([sys.executable, "-m", "precompute.validate", str(damaged)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"INVALID: {damaged}: array 'behavior_logprobs' is damaged at sample 0 (" in proc.stderr
    reader = RolloutStore.open(damaged)  # the metadata is intact: the reader opens, the sample read fails
    with pytest.raises(StoreError, match=f"{damaged}: array 'behavior_logprobs' is damaged at sample 2"):
        reader.sample(2)

    _truncate(damaged / "tokens" / "c" / "0")
    cfg = {
        "mode": "sft", "model": {"init": str(env["policy"])}, "data": {"store": str(damaged)},
        "train": {"steps": 1, "batch_size": 8, "seq_len": 96}, "logging": {"run_dir": str(tmp_path / "run")},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "lopd_jax.train", "--config", str(tmp_path / "cfg.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "array 'tokens' is damaged at sample 0" in one_error_line(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_a_damaged_metadata_chunk_names_the_array(env, store, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    _truncate(damaged / "prompt_lengths" / "c" / "0")
    with pytest.raises(StoreError, match="array 'prompt_lengths' is damaged at sample 0"):
        RolloutStore.open(damaged)
    with pytest.raises(StoreError, match="array 'prompt_lengths' is damaged at sample 0"):
        validate(damaged)


# ------------------------------------------------------------------------------------------------ 4: inputs


def test_bad_prompt_files_and_non_qwen3_models_are_one_line(env, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "Add: 1+1"}\n{"prompt": "caf\xe9"}\n')
    cases = [
        (rollouts_argv(env, tmp_path / "a", prompts=bad), f"{bad}:2: not valid UTF-8"),
        (rollouts_argv(env, tmp_path / "b", prompts=tmp_path / "nope.jsonl"), "nope.jsonl: cannot read"),
    ]
    llama = tmp_path / "llama"
    shutil.copytree(env["policy"], llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(
        json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    argv = rollouts_argv(env, tmp_path / "c")
    argv[argv.index("--policy") + 1] = str(llama)
    cases.append((argv, "model_type 'llama'"))
    cases.append((["--engine", "vllm", *rollouts_argv(env, tmp_path / "d")], "vllm is not installed"))
    garbled = tmp_path / "garbled"  # a Qwen3 config.json over weights that are not safetensors
    shutil.copytree(env["policy"], garbled)
    for f in garbled.glob("*.safetensors"):
        f.write_bytes(b"\xff" * 64)
    argv = rollouts_argv(env, tmp_path / "e")
    argv[argv.index("--policy") + 1] = str(garbled)
    cases.append((argv, f"unreadable safetensors file {hf.SINGLE_FILE}"))
    for argv, want in cases:
        assert rollouts.main(argv) == 2
        assert want in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbled", "latin1.jsonl", "llama"]  # no store was made
    assert teacher_logprobs.main(["--teacher", str(llama), "--store", str(env["root"] / "store")]) == 2
    assert "LlamaForCausalLM" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ 5: read-only


def test_a_read_only_store_is_refused_for_in_place_scoring(env, store, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(store, src)
    target = tmp_path / "read_only"
    undo = read_only_view(src, target)
    if undo is None:
        pytest.skip("root without mount privileges: no read-only directory can be made")
    try:
        before = snapshot(target)
        argv = ["--teacher", str(env["policy"]), "--store", str(target)]
        assert teacher_logprobs.main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{target}: cannot write to this store (" in line and "nothing changed" in line
        assert snapshot(target) == before
    finally:
        undo()


# ------------------------------------------------------------------------------------------------ 6: empty stores


def test_a_failed_run_does_not_block_its_corrected_rerun(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def broken_engine(args, stops):
        raise common.PrecomputeError("the engine failed (simulated: out of memory)")

    with monkeypatch.context() as m:
        m.setattr(rollouts, "make_generator", broken_engine)
        assert rollouts.main(rollouts_argv(env, out, "--max-new-tokens", "64")) == 2  # fails after creating it
    assert len(RolloutStore.open(out)) == 0
    capsys.readouterr()
    assert rollouts.main(rollouts_argv(env, out)) == 0  # corrected arguments: the empty store is replaced
    assert "replacing the empty store a failed run left (sampling.max_new_tokens" in capsys.readouterr().err
    assert len(RolloutStore.open(out)) == 3 and RolloutStore.open(out).manifest["sampling"]["max_new_tokens"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # nothing left beside it
    before = snapshot(out)  # a store with samples is never replaced
    assert rollouts.main(rollouts_argv(env, out, "--seed", "5")) == 2
    assert "made with different arguments: sampling.seed" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_all_prompts_too_long_is_refused_and_an_empty_store_is_invalid(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert rollouts.main(rollouts_argv(env, out, "--max-prompt-len", "3")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "all 3 prompts are longer than --max-prompt-len 3 tokens" in line and not out.exists()
    RolloutStore.create(tmp_path / "empty", {}).close()
    with pytest.raises(StoreError, match="no committed samples"):
        validate(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ import_jsonl


def _import_argv(env, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--tokenizer", str(env["policy"]), "--data", str(data), "--out", str(out), *extra]


def test_import_jsonl_bad_rows_reruns_and_other_stores(env, store, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "Add: 1+2", "completion": "3"}\n{"prompt": "Add: 2+2", "completion": 4}\n')
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a")) == 2
    assert f"{data}:2: missing string field 'completion'" in one_error_line(capsys.readouterr().err)
    data.write_bytes(b'{"prompt": "Add: 1+2", "completion": "3"}\n{"prompt": "\xff", "completion": "4"}\n')
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a")) == 2
    assert f"{data}:2: not valid UTF-8" in one_error_line(capsys.readouterr().err)
    data.write_text('{"prompt": "", "completion": "3"}\n')
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a", "--no-chat-template")) == 2
    assert f"{data}:1: the prompt encodes to no tokens" in one_error_line(capsys.readouterr().err)
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a", "--sft-teacher-fingerprint", "sha256:xyz")) == 2
    assert "is not 'sha256:' + 64 lowercase hex digits" in one_error_line(capsys.readouterr().err)
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a", "--tokenizer", str(tmp_path))) == 2
    assert "cannot load its tokenizer" in one_error_line(capsys.readouterr().err)
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a", "--max-len", "2")) == 2
    assert "all 1 rows are longer than --max-len 2 tokens" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists()

    data.write_text('{"prompt": "Add: 1+2", "completion": "3"}\n')
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a")) == 0
    before = snapshot(tmp_path / "a")
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a")) == 0  # the same command again: no-op
    assert snapshot(tmp_path / "a") == before
    data.write_text('{"prompt": "Add: 1+2", "completion": "4"}\n')  # other data into the same store: refused
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "a")) == 2
    assert "made with different arguments: data.sha256" in one_error_line(capsys.readouterr().err)
    before = snapshot(store)  # a rollout store is not SFT data
    assert import_jsonl.main(_import_argv(env, data, store)) == 2
    assert "made with different arguments" in one_error_line(capsys.readouterr().err)
    assert snapshot(store) == before


def test_import_jsonl_resumes_after_kill_9(env, tmp_path, capsys):
    data = tmp_path / "big.jsonl"
    n = import_jsonl.BLOCK + 40  # two commits
    data.write_text("".join(json.dumps({"prompt": f"Add: {i}", "completion": str(i)}) + "\n" for i in range(n)))
    assert import_jsonl.main(_import_argv(env, data, tmp_path / "whole")) == 0
    argv = _import_argv(env, data, tmp_path / "killed")
    proc = killed_subprocess("precompute.import_jsonl", argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(RolloutStore.open(tmp_path / "killed")) == import_jsonl.BLOCK
    capsys.readouterr()
    assert import_jsonl.main(argv) == 0
    assert "took over the writer lock" in capsys.readouterr().err
    assert_same_store(tmp_path / "whole", tmp_path / "killed")
    assert validate(tmp_path / "killed")["samples"] == n
    assert (
        provenance.fingerprint_tokenizer(env["policy"]) == RolloutStore.open(tmp_path / "killed").manifest["tokenizer"]
    )
    np.testing.assert_array_equal(RolloutStore.open(tmp_path / "killed").prompt_index, np.arange(n))
