"""precompute.rollouts / teacher_logprobs / import_jsonl end to end on a tiny random Qwen3 (JAX engine).

Most runs call the tools' ``main`` in-process (no import cost); the SIGKILL tests run the real command line in a
subprocess that kills itself after its first commit (the LOPD_TEST_KILL_AFTER_BATCHES hook), then resume in-process
and compare with an uninterrupted run array for array.
"""

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from helpers.precompute import MAX_NEW, assert_same_store, build_model, killed_subprocess, run_rollouts

from lopd_jax.data import prompts
from lopd_jax.store import RolloutStore, provenance
from precompute import import_jsonl, rollouts, teacher_logprobs
from precompute.validate import validate

VOCAB = 128


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    policy, teacher, other = root / "policy", root / "teacher", root / "other_tok"
    models = {"policy_model": build_model(policy, 0, eos_bias=0.17), "teacher_model": build_model(teacher, 1)}
    shutil.copytree(teacher, other)  # same weights, a tokenizer with two ids swapped
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    rows = [{"prompt": f"Add: {i}+{i * 7}", "answer": str(8 * i)} for i in range(4)]
    rows.insert(2, {"prompt": "Add: " + "9+" * 60 + "1", "answer": "541"})  # too long: skipped and counted
    rows.append({"messages": [{"role": "user", "content": "Add: 5+6"}], "answer": "11"})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "policy": policy, "teacher": teacher, "other": other, "prompts": prompts, **models}


SAMPLED = ("--temperature", "1.0", "--top-p", "0.95", "--n", "2", "--batch-size", "2")


def torch_token_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    """[L] log p(tokens[j] | tokens[:j]) from transformers (NaN at 0)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    return np.concatenate([[np.nan], lp[np.arange(len(tokens) - 1), tokens[1:]]])


# ------------------------------------------------------------------------------------------------ rollouts


def test_greedy_rollouts_equal_transformers_generate(env):
    assert run_rollouts(env, "greedy", "--temperature", "0", "--batch-size", "4") == 0
    store = RolloutStore.open(env["root"] / "greedy")
    m = store.manifest
    assert len(store) == 5 and m["prompts"]["skipped"] == 1 and m["prompts"]["kept"] == 5
    assert m["policy"] == provenance.fingerprint_weights(env["policy"]) and m["sft_teacher"] is None
    assert m["tokenizer"] == provenance.fingerprint_tokenizer(env["policy"]) and m["sampling"]["stop_token_ids"] == [2]
    tok = prompts.load_tokenizer(env["policy"])
    for i in range(len(store)):
        s = store.sample(i)
        p = s["prompt_length"]
        row = json.loads(env["prompts"].read_text().splitlines()[s["prompt_index"]])
        assert s["answer"] == row["answer"]
        msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        prompt = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
        np.testing.assert_array_equal(s["tokens"][:p], prompt)
        out = (
            env["policy_model"]
            .generate(
                torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=[2], pad_token_id=0
            )[0, p:]
            .numpy()
        )
        np.testing.assert_array_equal(s["tokens"][p:], out)
        assert s["finish_reason"] == ("stop" if out[-1] == 2 else "length")
        lp = torch_token_logprobs(env["policy_model"], s["tokens"])
        np.testing.assert_allclose(s["behavior_logprobs"][p:], lp[p:], atol=1e-4, rtol=0)
        assert np.isnan(s["behavior_logprobs"][:p]).all()
    finish = [store.sample(i)["finish_reason"] for i in range(len(store))]
    assert "stop" in finish and "length" in finish  # both ends of a rollout are exercised
    validate(env["root"] / "greedy")


def test_sampled_rollouts_resume_after_sigkill_and_depend_on_seed(env):
    root = env["root"]
    assert run_rollouts(env, "sampled", *SAMPLED, "--seed", "0") == 0
    argv = ["--policy", str(env["policy"]), "--prompts", str(env["prompts"]), "--out", str(root / "killed")]
    argv += ["--max-new-tokens", str(MAX_NEW), "--max-prompt-len", "64", *SAMPLED, "--seed", "0"]
    proc = killed_subprocess("precompute.rollouts", argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(RolloutStore.open(root / "killed")) == 4  # one batch: 2 prompts x 2 samples
    assert rollouts.main(argv) == 0  # the same command resumes
    assert_same_store(root / "sampled", root / "killed")

    assert run_rollouts(env, "seed1", *SAMPLED, "--seed", "1") == 0
    a, b = RolloutStore.open(root / "sampled"), RolloutStore.open(root / "seed1")
    assert len(a) == len(b) == 10
    assert any(not np.array_equal(a.sample(i)["tokens"], b.sample(i)["tokens"]) for i in range(10))
    s0, s1 = a.sample(0), a.sample(1)  # the two samples of one prompt differ too
    assert s0["prompt_index"] == s1["prompt_index"] and not np.array_equal(s0["tokens"], s1["tokens"])
    validate(root / "sampled")


def test_rollouts_refuse_a_store_made_with_other_arguments(env, capsys):
    if not (env["root"] / "sampled").exists():
        assert run_rollouts(env, "sampled", *SAMPLED, "--seed", "0") == 0
    assert run_rollouts(env, "sampled", *SAMPLED, "--seed", "7") == 2
    assert "sampling.seed (store: 0, this run: 7)" in capsys.readouterr().err


def test_bad_prompt_file_names_file_and_line(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Add: 1+1"}\n{"answer": "3"}\n')
    with pytest.raises(prompts.PromptError, match=r"bad.jsonl:2: .*'prompt'"):
        prompts.read_prompts(bad)


# ------------------------------------------------------------------------------------------------ teacher


def teacher_argv(env, store: str, out: str | None, *extra: str) -> list[str]:
    argv = ["--teacher", str(env["teacher"]), "--store", str(env["root"] / store)]
    return argv + (["--out", str(env["root"] / out)] if out else []) + ["--batch-tokens", "64", *extra]


def test_teacher_logprobs_match_transformers_and_resume_after_sigkill(env):
    root = env["root"]
    if not (root / "sampled").exists():
        assert run_rollouts(env, "sampled", *SAMPLED, "--seed", "0") == 0
    topk = ("--top-k", "3", "--window", "4")
    assert teacher_logprobs.main(teacher_argv(env, "sampled", "scored", *topk)) == 0
    scored = RolloutStore.open(root / "scored")
    assert scored.manifest["teacher"] == provenance.fingerprint_weights(env["teacher"])
    assert scored.manifest["policy"] == RolloutStore.open(root / "sampled").manifest["policy"]
    assert scored.teacher_committed == len(scored) == 10 and scored.topk == 3
    for i in (0, 7):
        s = scored.sample(i)
        p = s["prompt_length"]
        want = torch_token_logprobs(env["teacher_model"], s["tokens"])
        np.testing.assert_allclose(s["teacher_logprobs"][p:], want[p:], atol=1e-4, rtol=0)
        assert np.isnan(s["teacher_logprobs"][:p]).all()
        assert np.all(s["teacher_topk_logprobs"][p:, 0] >= s["teacher_logprobs"][p:] - 1e-6)
    validate(root / "scored", require_teacher=True)

    argv = teacher_argv(env, "sampled", "scored_killed", *topk)
    proc = killed_subprocess("precompute.teacher_logprobs", argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert RolloutStore.open(root / "scored_killed").teacher_committed == 4
    assert teacher_logprobs.main(argv) == 0
    assert_same_store(root / "scored", root / "scored_killed")


def test_teacher_scores_in_place_and_refuses_another_tokenizer(env, capsys):
    root = env["root"]
    assert run_rollouts(env, "inplace", "--temperature", "0", "--batch-size", "4") == 0
    assert teacher_logprobs.main(teacher_argv(env, "inplace", None)) == 0
    store = RolloutStore.open(root / "inplace")
    s = store.sample(3)
    want = torch_token_logprobs(env["teacher_model"], s["tokens"])
    np.testing.assert_allclose(s["teacher_logprobs"][s["prompt_length"] :], want[s["prompt_length"] :], atol=1e-4)
    validate(root / "inplace", require_teacher=True)

    capsys.readouterr()  # one column comes from one computation: another dtype may not continue it
    assert teacher_logprobs.main(teacher_argv(env, "inplace", None, "--dtype", "bfloat16")) == 2
    assert "teacher_args.dtype (store: 'float32', this run: 'bfloat16')" in capsys.readouterr().err
    argv = ["--teacher", str(env["other"]), "--store", str(root / "inplace"), "--out", str(root / "never")]
    assert teacher_logprobs.main(argv) == 2
    err = capsys.readouterr().err
    assert provenance.fingerprint_tokenizer(env["policy"]) in err
    assert provenance.fingerprint_tokenizer(env["other"]) in err
    assert not (root / "never").exists()


# ------------------------------------------------------------------------------------------------ import


def test_import_jsonl_builds_sft_data_that_teachers_can_score(env):
    root = env["root"]
    data = root / "sft.jsonl"
    rows = [{"prompt": "Add: 1+2", "completion": "1+2=3\n#### 3", "answer": "3"},
            {"messages": [{"role": "user", "content": "Add: 4+4"}], "completion": "#### 8"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--tokenizer", str(env["policy"]), "--data", str(data), "--out", str(root / "sft")]
    assert import_jsonl.main(argv + ["--sft-teacher", str(env["teacher"])]) == 0
    store = RolloutStore.open(root / "sft")
    assert store.manifest["sft_teacher"] == provenance.fingerprint_weights(env["teacher"])
    tok = prompts.load_tokenizer(env["policy"])
    s = store.sample(0)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Add: 1+2"}], add_generation_prompt=True)
    want = [*prompt["input_ids"], *tok("1+2=3\n#### 3", add_special_tokens=False)["input_ids"], 2]
    np.testing.assert_array_equal(s["tokens"], want)
    assert s["prompt_length"] == len(prompt["input_ids"]) and s["finish_reason"] == "stop" and s["answer"] == "3"
    assert np.isnan(s["behavior_logprobs"]).all() and store.sample(1)["answer"] is None
    validate(root / "sft")
    assert teacher_logprobs.main(teacher_argv(env, "sft", "sft_scored")) == 0
    validate(root / "sft_scored", require_teacher=True)
