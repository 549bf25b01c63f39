"""Fixtures the integration modules share."""

import json

import numpy as np
import pytest
from helpers.runs import save_model, token_logprobs, write_store

from lopd_jax.data import prompts
from lopd_jax.demo import synthetic
from lopd_jax.store import provenance


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models, tokenizer, prompt files and stores shared by every test of a module (the trainer tests and the
    trainer's failure modes)."""
    root = tmp_path_factory.mktemp("world")
    tok = synthetic.build_tokenizer(root / "tok")
    student = save_model(root / "student", 0, root / "tok")
    teacher = save_model(root / "teacher", 1, root / "tok")
    fp = {name: provenance.fingerprint_weights(root / name) for name in ("student", "teacher")}
    # The student plays pi_ref: the checkpoint SFT'd on the teacher's answers.
    provenance.write_provenance(root / "student", sft_teacher=fp["teacher"])
    paths = synthetic.write_prompt_sets(root / "prompts", seed=0, n_sft=24, n_opd=16, n_eval=4, difficulty="easy")
    rows = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    samples = []
    for i, row in enumerate(rows):
        prompt = prompts.encode_prompt(tok, row)
        answer = tok(row["completion"])["input_ids"] + [tok.eos_token_id]
        tokens = np.asarray(prompt + answer, np.int32)
        samples.append(dict(tokens=tokens, prompt_length=len(prompt), finish_reason="stop", prompt_index=i,
                            answer=row["answer"], behavior_logprobs=token_logprobs(student, tokens)))  # fmt: skip
    tok_fp = provenance.fingerprint_tokenizer(root / "tok")
    base = {"tokenizer": tok_fp, "policy": fp["student"]}
    scored = [token_logprobs(teacher, s["tokens"]) for s in samples]
    stores = {
        "sft": write_store(
            root / "sft_store", samples, {**base, "policy": fp["teacher"], "sft_teacher": fp["teacher"]}
        ),
        "opd": write_store(root / "opd_store", samples, {**base, "teacher": fp["teacher"]}, scored),
        # Scored by the wrong teacher (the student itself), with the same numbers: only provenance differs.
        "wrong_teacher": write_store(root / "wrong_store", samples, {**base, "teacher": fp["student"]}, scored),
        "unscored": write_store(root / "unscored_store", samples, base),
        # Scored, but without behaviour log-probs (as an imported store): loss.old_policy=behavior has no ratio.
        "no_behavior": write_store(
            root / "nobehavior_store",
            [dict(s, behavior_logprobs=None) for s in samples],
            {**base, "teacher": fp["teacher"], "behavior_logprobs": "none"},
            scored,
        ),
    }
    return dict(root=root, tok=tok, student=student, teacher=teacher, fp=fp, prompts=paths, stores=stores)
