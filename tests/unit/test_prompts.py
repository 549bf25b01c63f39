"""lopd_jax.data.prompts: the one prompt encoder. Lightning OPD's rollouts (precompute), online OPD and evaluation must
see the same prompt ids and stop on the same ids for the same prompt file and model; a second encoder with other
rules would bias exactly the comparison the project makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.prompts import model_dir

from lopd_jax.data import prompts
from lopd_jax.data.prompts import PromptError
from lopd_jax.inference import evaluation, sampling
from lopd_jax.models import hf
from lopd_jax.training import config as config_lib
from lopd_jax.training import online_opd
from lopd_jax.training import setup as train_setup
from lopd_jax.training.config import ConfigError, TrainConfig
from precompute import rollouts
from precompute.common import PrecomputeError

ROWS = [
    {"prompt": "Add: 1+2", "answer": "3"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add: 4+5"}], "answer": "9"},
    {"prompt": "Add: 33+4+5", "answer": "42"},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rollouts_path(policy: Path, file: Path, chat: bool, thinking: bool | None):
    """What ``precompute.rollouts`` hands its sampler: prompt ids, stop ids, the stop set the sampler applies."""
    flags = ["--chat-template" if chat else "--no-chat-template"]
    flags += [] if thinking is None else ["--enable-thinking" if thinking else "--no-enable-thinking"]
    args = rollouts.parse_args(["--policy", str(policy), "--prompts", str(file), "--out", "unused", *flags])
    kept, skipped, stops, _ = rollouts.load_prompts(args)
    applied = sampling._stop_ids(hf.load_config(str(policy)), rollouts.sampler_config(args, stops))
    return [p["ids"] for p in kept], stops, applied


def trainer_cfg(policy: Path, file: Path, chat: bool, thinking: bool | None) -> TrainConfig:
    raw = {
        "mode": "opd",
        "model": {"init": str(policy), "teacher": str(policy)},
        "data": {"prompts": str(file)},
        "eval": {"prompts": str(file)},
        "prompt": {"chat_template": chat, "enable_thinking": thinking},
    }
    return config_lib.build(TrainConfig, raw)


def trainer_path(policy: Path, file: Path, chat: bool, thinking: bool | None):
    """What the trainer hands online OPD's sampler and the Evaluator (train_setup's own checks fill the Setup)."""
    cfg = trainer_cfg(policy, file, chat, thinking)
    setup = train_setup.Setup(hf.load_config(str(policy)), None, {}, str(policy))
    train_setup._check_prompts(cfg, setup)
    train_setup._check_stop_ids(cfg, setup)
    applied = sampling._stop_ids(setup.model_cfg, online_opd.sampler_config(cfg.sampling, setup.stop_ids))
    ev = evaluation.Evaluator(
        cfg.eval, setup.tokenizer, setup.model_cfg, mesh=None, seed=0, batch_size=1,
        stop_ids=setup.stop_ids, prompt_cfg=cfg.prompt,
    )  # fmt: skip
    assert ev.prompts == setup.prompts
    assert sampling._stop_ids(setup.model_cfg, ev.scfg) == applied
    return setup.prompts, setup.stop_ids, applied


CASES = {
    # (chat_template, tokenizer has a template, enable_thinking, generation_config eos ids, rows)
    "chat template, messages row": (True, True, None, None, ROWS),
    "chat template, enable_thinking=False": (True, True, False, None, ROWS),
    "chat template, generation config adds eos ids": (True, True, None, [2, 5], ROWS),
    "raw text": (False, False, None, None, [r for r in ROWS if "prompt" in r]),
    "raw text, generation config": (False, True, None, [7, 2], [r for r in ROWS if "prompt" in r]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rollouts_and_online_opd_encode_and_stop_identically(tmp_path, case):
    chat, template, thinking, generation_eos, rows = CASES[case]
    policy = model_dir(tmp_path / "policy", template=template, generation_eos=generation_eos)
    file = write_rows(tmp_path / "prompts.jsonl", rows)
    ids_r, stops_r, applied_r = rollouts_path(policy, file, chat, thinking)
    ids_t, stops_t, applied_t = trainer_path(policy, file, chat, thinking)
    assert ids_r == ids_t and len(ids_r) == len(rows)
    assert stops_r == stops_t and applied_r == applied_t
    # The ids are the ones the rules name, not merely equal to each other.
    tok = prompts.load_tokenizer(policy)
    want_eos = [2] + (generation_eos if generation_eos is not None else [0])
    assert list(stops_r) == list(dict.fromkeys(want_eos))
    first = rows[0]["prompt"]
    if chat:
        assert (
            ids_r[0]
            == tok.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True)["input_ids"]
        )
    else:
        assert ids_r[0] == tok(first)["input_ids"]


def test_enable_thinking_reaches_the_template(tmp_path):
    """A template that reads enable_thinking encodes differently with it set: both paths pass it through."""
    policy = model_dir(tmp_path / "policy", template=True, generation_eos=None)
    tok = prompts.load_tokenizer(policy)
    tok.chat_template = "{% if enable_thinking is false %}N{% endif %}" + tok.chat_template
    tok.save_pretrained(policy)
    file = write_rows(tmp_path / "p.jsonl", ROWS[:1])
    off, _, _ = rollouts_path(policy, file, True, False)
    default, _, _ = rollouts_path(policy, file, True, None)
    assert off[0] != default[0] and off == trainer_path(policy, file, True, False)[0]


def test_extra_stop_ids_come_last(tmp_path):
    policy = model_dir(tmp_path / "policy", template=True, generation_eos=[5])
    tok = prompts.load_tokenizer(policy)
    assert prompts.stop_ids(policy, tok, extra=(9, 2)) == (2, 5, 9)


def test_a_tokenizer_without_chat_template_is_refused_not_silently_raw(tmp_path):
    policy = model_dir(tmp_path / "policy", template=False, generation_eos=None)
    file = write_rows(tmp_path / "prompts.jsonl", ROWS[:1])
    with pytest.raises(PrecomputeError, match="prompts.jsonl:1: the tokenizer has no chat template"):
        rollouts_path(policy, file, True, None)
    with pytest.raises(ConfigError, match="data.prompts: .*no chat template"):
        trainer_path(policy, file, True, None)


def test_messages_rows_need_the_chat_template(tmp_path):
    policy = model_dir(tmp_path / "policy", template=True, generation_eos=None)
    file = write_rows(tmp_path / "prompts.jsonl", ROWS[:2])
    with pytest.raises(PrecomputeError, match="prompts.jsonl:2: 'messages' rows need the chat template"):
        rollouts_path(policy, file, False, None)
    with pytest.raises(ConfigError, match="data.prompts: line 2: 'messages' rows need the chat template"):
        trainer_path(policy, file, False, None)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a"}\n{"answer": "3"}\n', r"p.jsonl:2: each row needs exactly one of 'prompt'"),
        (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', r"p.jsonl:2: not valid UTF-8 \(byte 12 of the line\)"),
        (b'{"prompt": "a"}\n\n{"prompt": \n', r"p.jsonl:3: not valid JSON"),
        (b"[1]\n", r"p.jsonl:1: expected a JSON object, got list"),
        (b'{"messages": []}\n', r"p.jsonl:1: 'messages' must be a non-empty list"),
        (b"\n\n", r"p.jsonl: no rows"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(PromptError, match=message):
        prompts.read_prompts(path)


def test_missing_prompt_file_and_tokenizer_dir(tmp_path):
    with pytest.raises(PromptError, match="nope.jsonl: cannot read"):
        prompts.read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(PromptError, match="not a directory"):
        prompts.load_tokenizer(tmp_path / "nope")
