"""A synthetic multi-step reasoning task for the CPU demo: column addition of several numbers.

Problem: `Add: 37+485+92+106`. Worked solution, one line per column from the units up, as on paper; the
answer's digits are the last digit of each line's total read bottom-up, preceded by the final carry. Each
line adds the column's digits (0 where an operand is too short) and, from the second column on, the carry
in. With `chain=False` (the default) the line states the column total at once; with `chain=True` it spells
out the running sum one digit at a time, so that every step is one small addition of two adjacent numbers
(~1.3x the response tokens, but a tiny model no longer has to add 4-5 numbers in a single token):

    chain=False                    chain=True
    7+5+2+6=20                     7+5=12+2=14+6=20
    3+8+9+0+2=22                   3+8=11+9=20+0=20+2=22
    0+4+0+1+2=7                    0+4=4+0=4+1=5+2=7
    #### 720                       #### 720

`order="reverse"` adds each column's terms from the last operand to the first (`6+2=8+5=13+7=20`): the same
task and answers in another solution style, which the demo uses to train a second, *inconsistent* teacher.

Every step is local (fetch one digit of the prompt, add it, carry the tens), so a tiny transformer learns
each step quickly but not perfectly, and errors compound over the steps: accuracy falls with the number of
operands and digits (the difficulty knobs), which leaves room for distillation to help.

The tokenizer is character-level (printable ASCII + newline + Qwen's chat special tokens, 100 ids) built with
the `tokenizers` library and saved as a transformers tokenizer with a Qwen-style chat template.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lopd_jax.atomic import write_atomic
from lopd_jax.inference.evaluation import grade

# Special tokens first so their ids never move: <|endoftext|>=0 (also pad, as in Qwen), <|im_start|>=1,
# <|im_end|>=2 (eos: the end of an assistant turn), <|unk|>=3.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
PAD_TOKEN, BOS_CHAT, EOS_TOKEN, UNK_TOKEN = SPECIAL_TOKENS
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)

# Qwen's template, reduced to what the task uses: one turn per message, and the assistant header when
# add_generation_prompt is set, so `prompt + completion + <|im_end|>` is exactly what sft trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROMPT_PREFIX = "Add: "
ANSWER_MARKER = "#### "


@dataclass(frozen=True)
class Difficulty:
    """Ranges (inclusive) for the number of operands and the digits of each operand; `chain` spells out the
    running sum within each column (see the module docstring)."""

    min_operands: int = 3
    max_operands: int = 4
    min_digits: int = 2
    max_digits: int = 3
    chain: bool = False

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands <= 9:
            raise ValueError(f"Difficulty: need 2 <= min_operands <= max_operands <= 9, got {self}")
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(f"Difficulty: need 1 <= min_digits <= max_digits <= 9, got {self}")


DIFFICULTIES = {
    "easy": Difficulty(2, 3, 1, 2),
    "medium": Difficulty(3, 4, 2, 3),
    "hard": Difficulty(4, 5, 3, 4),
}


def _as_difficulty(difficulty: Difficulty | str) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


def _column_line(terms: list[int], chain: bool) -> str:
    if not chain:
        return "+".join(map(str, terms)) + f"={sum(terms)}"
    line, running = str(terms[0]), terms[0]
    for t in terms[1:]:
        running += t
        line += f"+{t}={running}"
    return line


ORDERS = ("forward", "reverse")


def worked_solution(operands: list[int], chain: bool = False, order: str = "forward") -> str:
    """The column-addition worked solution for non-negative `operands`, ending with `#### <sum>`.

    order: "forward" adds each column's terms in prompt order (then the carry), "reverse" from the last term.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    width = max(len(str(x)) for x in operands)
    lines, answer_digits, carry = [], [], 0
    for col in range(width):
        digits = [(x // 10**col) % 10 for x in operands]
        terms = digits + ([carry] if col > 0 else [])  # the units column has no carry-in
        total = sum(terms)
        lines.append(_column_line(terms if order == "forward" else terms[::-1], chain))
        answer_digits.append(str(total % 10))
        carry = total // 10
    answer = (str(carry) if carry else "") + "".join(reversed(answer_digits))
    return "\n".join(lines) + f"\n{ANSWER_MARKER}{answer}"


def make_problem(rng: np.random.Generator, difficulty: Difficulty | str = "medium", order: str = "forward") -> dict:
    """One problem: dict(prompt=user message, solution=worked solution, answer=sum as a string).

    The operands depend only on `rng` and `difficulty`: another `order` gives the same problem in another style."""
    diff = _as_difficulty(difficulty)
    n = int(rng.integers(diff.min_operands, diff.max_operands + 1))
    digits = rng.integers(diff.min_digits, diff.max_digits + 1, size=n)
    # Leading digit non-zero so each operand really has its drawn number of digits.
    operands = [int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d)) for d in digits]
    return {
        "prompt": PROMPT_PREFIX + "+".join(map(str, operands)),
        "solution": worked_solution(operands, diff.chain, order),
        "answer": str(sum(operands)),
    }


def _draw_unique(
    rng: np.random.Generator,
    n: int,
    difficulty: Difficulty | str,
    order: str,
    seen: set[str],
    accept: Callable[[dict], bool] | None = None,
) -> list[dict]:
    """``n`` problems with prompts not in ``seen`` (added to it) that ``accept`` keeps; a problem it rejects is
    drawn all the same (and seen), so it lands in no set."""
    problems = []
    for _ in range(100 * n + 1000):  # bounded: a tiny difficulty may not have n distinct problems
        if len(problems) == n:
            return problems
        p = make_problem(rng, difficulty, order)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            if accept is None or accept(p):
                problems.append(p)
    kept = "" if accept is None else " that the SFT filter keeps"
    raise ValueError(f"difficulty {difficulty} has fewer than {n} distinct problems{kept}; raise it or ask fewer")


def _without_digit(digit: str) -> Callable[[dict], bool]:
    """Keeps a problem whose operands never contain ``digit``."""
    return lambda p: digit not in p["prompt"][len(PROMPT_PREFIX) :]


def addition_steps(solution: str) -> list[tuple[int, int]]:
    """Every one-digit addition a worked solution performs, as (running sum, term) pairs in its order: `8+1=9+0=9`
    gives (8, 1), (9, 0); a line stated at once (`7+5+2=14`) gives the same steps as its chain (7, 5), (12, 2)."""
    steps = []
    for line in solution.splitlines():
        if line.startswith(ANSWER_MARKER):
            continue
        for part in line.split("=")[:-1]:  # "12+2" of "7+5=12+2=14": a sum stated so far, then the terms added to it
            terms = [int(t) for t in part.split("+")]
            running = terms[0]
            for t in terms[1:]:
                steps.append((running, t))
                running += t
    return steps


def _without_sum_digit(digit: int) -> Callable[[dict], bool]:
    """Keeps a problem whose worked solution never reaches a sum ending in ``digit`` (7: no 3+4=7, 12+5=17 or
    8+9=17); the operands themselves may contain it."""
    return lambda p: all((running + t) % 10 != digit for running, t in addition_steps(p["solution"]))


def _answer_below(cap: int, below: bool = True) -> Callable[[dict], bool]:
    """Keeps a problem whose answer is below ``cap`` (``below=False``: at or above it)."""
    return lambda p: (int(p["answer"]) < cap) == below


def _both(*filters: Callable[[dict], bool] | None) -> Callable[[dict], bool] | None:
    """Keeps a problem that every given filter keeps (None when none is given)."""
    chosen = [f for f in filters if f is not None]
    return None if not chosen else lambda p: all(f(p) for f in chosen)


TASK_SETS = ("teacher", "sft", "opd", "eval")  # the prompt sets a task directory holds, as <name>.jsonl


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_prompt_sets(
    out_dir: str | Path,
    seed: int,
    n_sft: int,
    n_opd: int,
    n_eval: int,
    *,
    n_teacher: int = 0,
    difficulty: Difficulty | str = "medium",
    order: str = "forward",
    sft_without_digit: str | None = None,
    sft_without_sum_digit: int | None = None,
    sft_answer_cap: int | None = None,
    sft_over_cap: int = 0,
) -> dict[str, Path]:
    """Write disjoint prompt sets (no prompt appears in two sets) as JSONL files in `out_dir`.

    Files: `sft.jsonl` (prompt, answer, completion), `opd.jsonl` and `eval.jsonl` (prompt, answer), and,
    when n_teacher > 0, `teacher.jsonl` (prompt, answer, completion) to train the teacher on problems its
    SFT answers will not be asked about. `completion` is the worked solution in `order` (see worked_solution).
    `sft_without_digit`: the SFT prompts are only problems whose operands never contain that digit (a gap in
    the student's data that the OPD and held-out prompts, drawn from the whole task, cover); the problems it
    skips land in no set. `sft_without_sum_digit`: likewise, only problems whose worked solution never reaches a sum
    ending in that digit (see `addition_steps`): with 7, the student never writes a 7 as a sum (3+4=7, 8+9=17,
    12+5=17), while it reads 7s in the prompts and every other step of the task is in its data.
    `sft_answer_cap`: likewise, only problems whose answer is below it, except `sft_over_cap` of them drawn among the
    problems at or above it (shuffled in among the rest): the student meets that part of the task a handful of times,
    too few to learn it, often enough that its own samples sometimes start it right.
    Deterministic in `seed`; the prompts do not depend on `order`.
    Returns {set name: path}.
    """
    sizes = {"teacher": n_teacher, "sft": n_sft, "opd": n_opd, "eval": n_eval}
    if any(n < 0 for n in sizes.values()) or min(n_sft, n_opd, n_eval) == 0:
        raise ValueError(f"write_prompt_sets: set sizes must be positive (n_teacher >= 0), got {sizes}")
    if sft_without_digit is not None and not (len(sft_without_digit) == 1 and sft_without_digit.isdigit()):
        raise ValueError(f"sft_without_digit (--sft-without-digit) must be one digit 0-9, got {sft_without_digit!r}")
    if sft_without_sum_digit is not None and not 0 <= sft_without_sum_digit <= 9:
        raise ValueError(
            f"sft_without_sum_digit (--sft-without-sum-digit) must be a digit 0-9, got {sft_without_sum_digit}"
        )
    if sft_answer_cap is not None and sft_answer_cap < 1:
        raise ValueError(f"sft_answer_cap (--sft-answer-cap) must be a positive sum, got {sft_answer_cap}")
    if not 0 <= sft_over_cap <= n_sft or (sft_over_cap and sft_answer_cap is None):
        raise ValueError(
            f"sft_over_cap (--sft-over-cap) must be 0..n_sft ({n_sft}) and needs sft_answer_cap, got {sft_over_cap}"
        )
    hole = _both(  # the SFT filters other than the cap, which the over-cap draw keeps too
        None if sft_without_digit is None else _without_digit(sft_without_digit),
        None if sft_without_sum_digit is None else _without_sum_digit(sft_without_sum_digit),
    )
    sft_keep = _both(hole, None if sft_answer_cap is None else _answer_below(sft_answer_cap))
    rng, seen = np.random.default_rng(seed), set()
    chunks = {}  # every set drawn before any file is written: a set that cannot be drawn leaves nothing behind
    for name, n in sizes.items():
        if n == 0:
            continue
        if name != "sft":
            chunks[name] = _draw_unique(rng, n, difficulty, order, seen)
            continue
        chunks[name] = _draw_unique(rng, n - sft_over_cap, difficulty, order, seen, sft_keep)
        if sft_over_cap:
            over = _both(hole, _answer_below(sft_answer_cap, below=False))
            sft = chunks[name] + _draw_unique(rng, sft_over_cap, difficulty, order, seen, over)
            chunks[name] = [sft[i] for i in rng.permutation(len(sft))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, chunk in chunks.items():
        with_completion = name in ("teacher", "sft")
        rows = [
            {"prompt": p["prompt"], "answer": p["answer"]} | ({"completion": p["solution"]} if with_completion else {})
            for p in chunk
        ]
        paths[name] = out_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)
    return paths


def _raw_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own token ([\s\S] so that newlines are too); Fuse concatenates them back
    # without separators, so decode(encode(text)) == text.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the task's character-level tokenizer and save it (save_pretrained) to `out_dir`.

    `AutoTokenizer.from_pretrained(out_dir)` loads it offline. eos = `<|im_end|>`, pad = `<|endoftext|>`
    (Qwen's conventions), no BOS, chat template Qwen-style. Returns the tokenizer.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_raw_tokenizer(),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[BOS_CHAT],
        clean_up_tokenization_spaces=False,  # the default would turn " ." into "." and break round-trips
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def grade_response(response: str, answer: str) -> bool:
    """Exact match of the `#### X` answer in a response against the reference (eval.grade, kind="exact")."""
    return grade(response, answer, kind="exact")


# ----------------------------------------------------------------------------------------------------------------
# Command line: `python -m lopd_jax.demo.synthetic --out DIR --seed S ...` (the demo's first stage)
# ----------------------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="python -m lopd_jax.demo.synthetic",
        description="Write the column-addition task: DIR/tokenizer/ (transformers tokenizer with chat template) and "
        "the disjoint prompt sets DIR/{teacher,sft,opd,eval}.jsonl.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem generator")
    p.add_argument("--n-teacher", type=int, default=0, help="worked solutions to train the teacher on (0: none)")
    p.add_argument("--n-sft", type=int, required=True, help="prompts the teacher answers for the student's SFT")
    p.add_argument("--n-opd", type=int, required=True, help="prompts for the OPD rollouts")
    p.add_argument("--n-eval", type=int, required=True, help="held-out evaluation prompts")
    p.add_argument("--difficulty", default="medium", help=f"preset: {', '.join(DIFFICULTIES)}")
    for name in ("min_operands", "max_operands", "min_digits", "max_digits"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="overrides the preset's value")
    p.add_argument("--chain", action="store_true", help="spell out each column's running sum (Difficulty.chain)")
    p.add_argument(
        "--order", choices=ORDERS, default="forward", help="order of each column's terms in the worked solutions"
    )
    p.add_argument(
        "--sft-without-digit",
        default=None,
        help="SFT prompts only among problems whose operands never contain this digit (the OPD and held-out "
        "prompts cover the whole task): a gap in the student's data that only distillation can close",
    )
    p.add_argument(
        "--sft-without-sum-digit",
        type=int,
        default=None,
        help="SFT prompts only among problems whose worked solution never reaches a sum ending in this digit (7: no "
        "3+4=7, 8+9=17 or 12+5=17; the OPD and held-out prompts cover the whole task): a result the student never "
        "writes, in a task whose other steps it knows",
    )
    p.add_argument(
        "--sft-answer-cap",
        type=int,
        default=None,
        help="SFT prompts only among problems whose answer is below this sum (the OPD and held-out prompts cover the "
        "whole task)",
    )
    p.add_argument(
        "--sft-over-cap",
        type=int,
        default=0,
        help="except this many SFT prompts drawn among the problems whose answer is at or above --sft-answer-cap",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a task already in --out (without it, one is never touched)"
    )
    return p.parse_args(argv)


def _difficulty_from_args(args) -> Difficulty:
    base = _as_difficulty(args.difficulty)
    fields = ("min_operands", "max_operands", "min_digits", "max_digits")
    values = {f: getattr(base, f) if getattr(args, f) is None else getattr(args, f) for f in fields}
    return Difficulty(**values, chain=base.chain or args.chain)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 with one `error:` line for bad arguments."""
    args = _parse_args(argv)
    try:
        difficulty = _difficulty_from_args(args)
        out = Path(args.out)
        taken = [f"{n}.jsonl" for n in TASK_SETS if (out / f"{n}.jsonl").exists()]
        taken += ["tokenizer/"] if (out / "tokenizer").exists() else []
        if taken and not args.overwrite:
            raise ValueError(f"--out {out} already holds a task ({', '.join(taken)}); pass --overwrite to replace it")
        paths = write_prompt_sets(
            args.out,
            args.seed,
            args.n_sft,
            args.n_opd,
            args.n_eval,
            n_teacher=args.n_teacher,
            difficulty=difficulty,
            order=args.order,
            sft_without_digit=args.sft_without_digit,
            sft_without_sum_digit=args.sft_without_sum_digit,
            sft_answer_cap=args.sft_answer_cap,
            sft_over_cap=args.sft_over_cap,
        )
        build_tokenizer(out / "tokenizer")
        for name in TASK_SETS:  # --overwrite: a set this task does not have (--n-teacher 0) must not stay behind
            if name not in paths:
                (out / f"{name}.jsonl").unlink(missing_ok=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be written (read-only, a file in the way, a full disk)
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {len(path.read_text().splitlines())}" for name, path in paths.items())
    print(f"synthetic task ({difficulty}) in {args.out}: {counts}; tokenizer in {Path(args.out) / 'tokenizer'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
