"""The synthetic column-addition task: problems, worked solutions, prompt sets, tokenizer, grading."""

import json
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from lopd_jax.demo import synthetic as syn
from lopd_jax.inference.evaluation import extract_answer, grade


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    syn.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


# --- problems ---------------------------------------------------------------------------------------------


def _operands(prompt: str) -> list[int]:
    assert prompt.startswith("Add: ")
    return [int(x) for x in prompt[len("Add: ") :].split("+")]


def _problems(seed: int, n: int, difficulty="medium") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [syn.make_problem(rng, difficulty) for _ in range(n)]


def test_problems_are_deterministic_per_seed():
    assert _problems(3, 20) == _problems(3, 20)
    assert _problems(3, 20) != _problems(4, 20)


def _check_column_line(line: str, expected_terms: list[int], chain: bool) -> int:
    """Parse one column line independently of the generator; check its terms and sums; return its total."""
    if not chain:
        lhs, rhs = line.split("=")
        terms = [int(t) for t in lhs.split("+")]
        assert int(rhs) == sum(terms), line
    else:  # "a+b=s1+c=s2+...": each "=" closes one addition onto the running sum
        first, *rest = line.split("=")
        a, b = (int(t) for t in first.split("+"))
        terms, running = [a, b], None
        for piece in rest:
            value, *nxt = piece.split("+")
            running = int(value)
            assert running == sum(terms), line
            terms += [int(t) for t in nxt]
        rhs = running
    assert terms == expected_terms, (line, expected_terms)
    return int(rhs)


DIFFICULTIES = ["easy", "medium", "hard", syn.Difficulty(9, 9, 9, 9), syn.Difficulty(2, 5, 1, 4, chain=True)]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_worked_solution_is_correct_arithmetic(difficulty):
    diff = syn.DIFFICULTIES[difficulty] if isinstance(difficulty, str) else difficulty
    for p in _problems(0, 200, difficulty):
        operands = _operands(p["prompt"])
        assert diff.min_operands <= len(operands) <= diff.max_operands
        assert all(diff.min_digits <= len(str(x)) <= diff.max_digits for x in operands)
        assert p["answer"] == str(sum(operands))  # Python int arithmetic, independent of the generator
        *steps, last = p["solution"].split("\n")
        assert last == f"#### {p['answer']}" and extract_answer(p["solution"]) == p["answer"]
        # Each line adds column c's digits (plus the carry, from the second column on) correctly.
        carry = 0
        for col, step in enumerate(steps):
            expected = [x // 10**col % 10 for x in operands] + ([carry] if col else [])
            carry = _check_column_line(step, expected, diff.chain) // 10
        assert len(steps) == max(len(str(x)) for x in operands)


def test_worked_solution_examples():
    assert syn.worked_solution([99, 99, 99]) == "9+9+9=27\n9+9+9+2=29\n#### 297"
    assert syn.worked_solution([99, 99, 99], chain=True) == "9+9=18+9=27\n9+9=18+9=27+2=29\n#### 297"
    assert syn.worked_solution([5, 7]) == "5+7=12\n#### 12"
    # reverse: each column from the last term (the carry first from the second column on)
    assert syn.worked_solution([19, 28, 6], chain=True, order="reverse") == "6+8=14+9=23\n2+0=2+2=4+1=5\n#### 53"
    with pytest.raises(ValueError, match="order"):
        syn.worked_solution([5, 7], order="backwards")


def test_difficulty_validation():
    with pytest.raises(ValueError, match="min_operands"):
        syn.Difficulty(1, 3, 1, 2)
    with pytest.raises(ValueError, match="min_digits"):
        syn.Difficulty(2, 3, 3, 2)
    with pytest.raises(ValueError, match="unknown difficulty"):
        syn.make_problem(np.random.default_rng(0), "impossible")


def test_harder_problems_need_more_steps():
    def mean_len(d):
        return np.mean([len(p["solution"]) for p in _problems(1, 100, d)])

    assert mean_len("easy") < mean_len("medium") < mean_len("hard")


# --- prompt sets ------------------------------------------------------------------------------------------


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_sets_are_disjoint_deterministic_and_well_formed(tmp_path):
    paths = syn.write_prompt_sets(tmp_path / "a", seed=7, n_sft=300, n_opd=200, n_eval=100, n_teacher=150)
    again = syn.write_prompt_sets(tmp_path / "b", seed=7, n_sft=300, n_opd=200, n_eval=100, n_teacher=150)
    assert set(paths) == {"teacher", "sft", "opd", "eval"}
    sets = {name: _read(path) for name, path in paths.items()}
    assert {k: len(v) for k, v in sets.items()} == {"teacher": 150, "sft": 300, "opd": 200, "eval": 100}
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
    prompts = [r["prompt"] for rows in sets.values() for r in rows]
    assert len(set(prompts)) == len(prompts)  # no prompt in two sets (nor twice in one)
    for name, rows in sets.items():
        keys = {"prompt", "answer", "completion"} if name in ("teacher", "sft") else {"prompt", "answer"}
        assert all(set(r) == keys for r in rows), name
        assert all(r["answer"] == str(sum(_operands(r["prompt"]))) for r in rows)
        assert all(extract_answer(r["completion"]) == r["answer"] for r in rows if "completion" in r)
    other_seed = syn.write_prompt_sets(tmp_path / "c", seed=8, n_sft=300, n_opd=200, n_eval=100)
    assert "teacher" not in other_seed and _read(other_seed["eval"]) != sets["eval"]


def test_sft_without_digit_leaves_a_gap_only_in_the_sft_set(tmp_path):
    """No SFT operand contains the digit; the other sets keep the task's own share of it; without the option the
    sets are the ones drawn before it existed (the same problems, in order)."""
    diff = syn.Difficulty(5, 5, 1, 1, chain=True)
    kw = dict(seed=3, n_sft=400, n_opd=300, n_eval=300, n_teacher=200, difficulty=diff)
    gap = {k: _read(v) for k, v in syn.write_prompt_sets(tmp_path / "g", sft_without_digit="9", **kw).items()}
    assert all(9 not in _operands(r["prompt"]) for r in gap["sft"])
    with_nine = [any(9 in _operands(r["prompt"]) for r in rows) for rows in (gap["opd"], gap["eval"])]
    assert all(with_nine)  # 1 - 0.9^5 = 41% of the task has a 9: the OPD and held-out sets are not filtered
    assert 0.3 < np.mean([9 in _operands(r["prompt"]) for r in gap["eval"]]) < 0.52
    prompts = [r["prompt"] for rows in gap.values() for r in rows]
    assert len(set(prompts)) == len(prompts)
    plain = {k: _read(v) for k, v in syn.write_prompt_sets(tmp_path / "p", **kw).items()}
    assert plain["teacher"] == gap["teacher"]  # drawn before the SFT set: unaffected
    assert any(9 in _operands(r["prompt"]) for r in plain["sft"])
    rng, n = np.random.default_rng(3), sum(len(v) for v in plain.values())
    drawn, seen = [], set()
    while len(drawn) < n:  # the plain sets are the generator's first n distinct problems, set after set
        q = syn.make_problem(rng, diff)
        if q["prompt"] not in seen:
            seen.add(q["prompt"])
            drawn.append(q["prompt"])
    assert [r["prompt"] for k in ("teacher", "sft", "opd", "eval") for r in plain[k]] == drawn
    with pytest.raises(ValueError, match="one digit"):
        syn.write_prompt_sets(tmp_path / "x", sft_without_digit="12", **kw)


def test_addition_steps_reads_every_one_digit_addition_of_a_worked_solution():
    """The steps of the chain form are the ones it writes; the stated-at-once form and the reverse order give the
    steps their own lines imply; the answer line adds nothing."""
    assert syn.addition_steps("8+1=9+0=9+8=17+0=17\n#### 17") == [(8, 1), (9, 0), (9, 8), (17, 0)]
    chain, flat = (syn.worked_solution([37, 485, 92, 106], chain=c) for c in (True, False))
    assert syn.addition_steps(chain) == syn.addition_steps(flat)
    assert syn.addition_steps(chain) == [
        (7, 5),
        (12, 2),
        (14, 6),
        (3, 8),
        (11, 9),
        (20, 0),
        (20, 2),
        (0, 4),
        (4, 0),
        (4, 1),
        (5, 2),
    ]  # units, tens (+ carry 2), hundreds (+ carry 2)
    assert syn.addition_steps(syn.worked_solution([3, 4, 5], chain=True, order="reverse")) == [(5, 4), (9, 3)]


def test_sft_without_sum_digit_leaves_every_sum_ending_in_it_out_of_the_sft_set(tmp_path):
    """No SFT solution reaches a sum ending in 7 (3+4=7, 8+9=17, 12+5=17), though 7s stay among its operands; the
    other sets keep the task's share of such sums; composes with the digit hole; a bad digit is refused."""
    diff = syn.Difficulty(5, 5, 1, 1, chain=True)
    kw = dict(seed=4, n_sft=500, n_opd=300, n_eval=400, n_teacher=100, difficulty=diff)
    sets = {k: _read(v) for k, v in syn.write_prompt_sets(tmp_path / "h", sft_without_sum_digit=7, **kw).items()}

    def sums(row):  # the running sums after each step, recomputed from the prompt
        ops = _operands(row["prompt"])
        return [sum(ops[: i + 1]) for i in range(1, len(ops))]

    assert not any(s % 10 == 7 for r in sets["sft"] for s in sums(r))
    assert any(7 in _operands(r["prompt"]) for r in sets["sft"])  # a 7 to read, never one to write
    carry_seven = [r for r in sets["eval"] if any(s % 10 == 7 and s > 9 for s in sums(r))]
    assert carry_seven  # 8+9=17-style sums are in the held-out set, not only 3+4=7
    assert 0.25 < np.mean([any(s % 10 == 7 for s in sums(r)) for r in sets["eval"]]) < 0.42  # the task's ~34%
    prompts = [r["prompt"] for rows in sets.values() for r in rows]
    assert len(set(prompts)) == len(prompts)
    both = _read(syn.write_prompt_sets(tmp_path / "b", sft_without_sum_digit=7, sft_without_digit="9", **kw)["sft"])
    assert all(not any(s % 10 == 7 for s in sums(r)) and 9 not in _operands(r["prompt"]) for r in both)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="a digit 0-9"):
            syn.write_prompt_sets(tmp_path / "x", sft_without_sum_digit=bad, **kw)
    assert not (tmp_path / "x").exists()


def test_sft_answer_cap_keeps_all_but_a_few_sft_answers_below_it(tmp_path):
    """Every SFT answer is below the cap except exactly `sft_over_cap` of them, spread through the set; the other
    sets keep the task's share of large sums; the draw is deterministic and the sets stay disjoint."""
    diff = syn.Difficulty(5, 5, 1, 1, chain=True)
    kw = dict(seed=5, n_sft=600, n_opd=300, n_eval=400, n_teacher=100, difficulty=diff)
    paths = syn.write_prompt_sets(tmp_path / "c", sft_answer_cap=30, sft_over_cap=6, **kw)
    sets = {k: _read(v) for k, v in paths.items()}
    over = [i for i, r in enumerate(sets["sft"]) if int(r["answer"]) >= 30]
    assert len(sets["sft"]) == 600 and len(over) == 6
    assert over[-1] - over[0] > 300  # shuffled in, not appended at the end
    assert all(r["answer"] == str(sum(_operands(r["prompt"]))) for r in sets["sft"])
    assert 0.08 < np.mean([int(r["answer"]) >= 30 for r in sets["eval"]]) < 0.21  # the task's own 14%
    prompts = [r["prompt"] for rows in sets.values() for r in rows]
    assert len(set(prompts)) == len(prompts)
    again = syn.write_prompt_sets(tmp_path / "d", sft_answer_cap=30, sft_over_cap=6, **kw)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
    none_over = _read(syn.write_prompt_sets(tmp_path / "e", sft_answer_cap=30, **kw)["sft"])
    assert all(int(r["answer"]) < 30 for r in none_over)
    both = _read(syn.write_prompt_sets(tmp_path / "f", sft_without_digit="9", sft_answer_cap=30, **kw)["sft"])
    assert all(int(r["answer"]) < 30 and 9 not in _operands(r["prompt"]) for r in both)
    for bad, match in (
        (dict(sft_over_cap=3), "needs sft_answer_cap"),
        (dict(sft_answer_cap=30, sft_over_cap=601), "0..n_sft"),
        (dict(sft_answer_cap=0), "positive"),
    ):
        with pytest.raises(ValueError, match=match):
            syn.write_prompt_sets(tmp_path / "x", **bad, **kw)
    with pytest.raises(ValueError, match="that the SFT filter keeps"):  # no sum of five digits reaches 46
        syn.write_prompt_sets(tmp_path / "y", sft_answer_cap=46, sft_over_cap=1, **kw)
    assert not (tmp_path / "y").exists()  # the teacher set, drawn first, was not written either


@pytest.mark.parametrize(
    "flag, value, named",
    [("--sft-without-sum-digit", "12", "sft_without_sum_digit"), ("--sft-over-cap", "2", "sft_over_cap")],
)
def test_synthetic_cli_refuses_a_bad_sft_filter_in_one_line(tmp_path, capsys, flag, value, named):
    args = ["--out", str(tmp_path), "--n-sft", "4", "--n-opd", "2", "--n-eval", "2", flag, value]
    assert syn.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {named} ({flag})")
    assert not (tmp_path / "sft.jsonl").exists()


def test_synthetic_cli_refuses_an_unwritable_out_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a user's file")  # a file where the task directory should go (a read-only path fails alike)
    args = ["--out", str(blocker), "--n-sft", "4", "--n-opd", "2", "--n-eval", "2"]
    assert syn.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {blocker}")
    assert blocker.read_text() == "a user's file"


def test_synthetic_cli_never_touches_a_task_already_in_out_without_overwrite(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--n-sft", "4", "--n-opd", "2", "--n-eval", "2"]
    assert syn.main([*args, "--seed", "0"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert syn.main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith(f"error: --out {tmp_path} already holds a task (")
        and "--overwrite" in err[0]
    )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert syn.main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "sft.jsonl").read_bytes() != before[tmp_path / "sft.jsonl"]
    # a set the new task does not have is not left behind from the old one
    assert syn.main([*args, "--n-teacher", "3", "--overwrite"]) == 0 and (tmp_path / "teacher.jsonl").exists()
    assert syn.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["eval.jsonl", "opd.jsonl", "sft.jsonl"]


def test_prompt_sets_reject_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        syn.write_prompt_sets(tmp_path, seed=0, n_sft=0, n_opd=1, n_eval=1)
    with pytest.raises(ValueError, match="distinct problems"):  # 2 one-digit operands: only 100 problems
        syn.write_prompt_sets(tmp_path, seed=0, n_sft=100, n_opd=50, n_eval=50, difficulty=syn.Difficulty(2, 2, 1, 1))


# --- tokenizer --------------------------------------------------------------------------------------------


def test_tokenizer_vocab_and_special_ids(tokenizer):
    assert len(tokenizer) == syn.VOCAB_SIZE < 128
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"])
    assert ids == [0, 1, 2, 3]  # stable: models and stores depend on them
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token is None
    # Digits are consecutive single-character tokens.
    assert tokenizer.convert_tokens_to_ids(list("0123456789")) == list(range(20, 30))


def test_tokenizer_round_trips_text_exactly(tokenizer):
    rng = np.random.default_rng(0)
    alphabet = np.array(list(syn.CHARS))
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 80)))) for _ in range(50)]
    texts += [" leading and trailing  ", "a .b ,c ' d n't", "line\n\nbreaks\n"]
    texts += [p["prompt"] + "\n" + p["solution"] for p in _problems(0, 20, "hard")]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text


def test_chat_template_qwen_style(tokenizer):
    messages = [{"role": "user", "content": "Add: 12+34"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nAdd: 12+34<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    chars = tokenizer.convert_tokens_to_ids
    assert ids == [1, *chars(list("user\nAdd: 12+34")), 2, *chars(["\n"]), 1, *chars(list("assistant\n"))]
    full = messages + [{"role": "assistant", "content": "2+4=6\n1+3=4\n#### 46"}]
    convo = tokenizer.apply_chat_template(full, tokenize=False)
    assert convo == text + "2+4=6\n1+3=4\n#### 46<|im_end|>\n"
    # Decoding without special tokens leaves the plain text, graded by the #### answer.
    generated = tokenizer("2+4=6\n1+3=4\n#### 46<|im_end|>")["input_ids"]
    assert generated[-1] == tokenizer.eos_token_id
    assert grade(tokenizer.decode(generated, skip_special_tokens=True), "46", kind="exact")


def test_autotokenizer_loads_offline_and_matches(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    built = syn.build_tokenizer(tokenizer_dir.parent / "rebuilt")
    text = "<|im_start|>user\nAdd: 905+77<|im_end|>\n"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.chat_template == built.chat_template == syn.CHAT_TEMPLATE
    # Files on disk are byte-identical across builds: the tokenizer fingerprint is reproducible.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tokenizer_dir / name).read_bytes() == (tokenizer_dir.parent / "rebuilt" / name).read_bytes()


# --- grading ----------------------------------------------------------------------------------------------


def test_grading_accepts_right_and_rejects_wrong():
    for p in _problems(5, 50):
        assert syn.grade_response(p["solution"], p["answer"])
        wrong = re.sub(r"#### (\d+)", lambda m: f"#### {int(m.group(1)) + 1}", p["solution"])
        assert not syn.grade_response(wrong, p["answer"])
        truncated = p["solution"].rsplit("\n", 1)[0]  # stopped before the answer line
        assert not syn.grade_response(truncated, p["answer"])


# --- command line -----------------------------------------------------------------------------------------


def test_cli_writes_sets_and_tokenizer(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--seed", "1", "--n-sft", "4", "--n-opd", "3", "--n-eval", "2"]
    assert syn.main([*args, "--min-operands", "2", "--max-operands", "2", "--chain"]) == 0
    rows = _read(tmp_path / "sft.jsonl")
    assert len(rows) == 4 and all(len(_operands(r["prompt"])) == 2 for r in rows)
    assert all(r["completion"] == syn.worked_solution(_operands(r["prompt"]), chain=True) for r in rows)
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer").eos_token_id == 2
    assert syn.main([*args, "--min-operands", "1", "--overwrite"]) == 2
    assert "min_operands" in capsys.readouterr().err
    # --order reverse: the same prompts and answers (same seed), completions in the other style
    rev = tmp_path / "reverse"
    assert (
        syn.main(
            [*args, "--out", str(rev), "--min-operands", "2", "--max-operands", "2", "--chain", "--order", "reverse"]
        )
        == 0
    )
    rev_rows = _read(rev / "sft.jsonl")
    assert [(r["prompt"], r["answer"]) for r in rev_rows] == [(r["prompt"], r["answer"]) for r in rows]
    assert all(r["completion"] == syn.worked_solution(_operands(r["prompt"]), True, "reverse") for r in rev_rows)
    assert sum(a["completion"] != b["completion"] for a, b in zip(rows, rev_rows)) >= 3
