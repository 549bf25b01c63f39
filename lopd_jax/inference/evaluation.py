"""Held-out evaluation: answer extraction, grading, accuracy metrics, and the ``Evaluator`` every mode uses.

Math answers are compared with `math-verify` (symbolic equality through sympy: `\\frac{1}{576}` equals
`1/576`, reordered sets are equal); synthetic tasks use exact string match of the extracted answer.

Metrics take a boolean matrix `correct` of shape [n_prompts, k] (k samples per prompt):
pass@1 (unbiased estimate from the k samples), avg@k (mean and spread over the k sampling runs) and the
unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

Eval sets are read, encoded and sampled to the stop ids of ``lopd_jax.data.prompts``, like every other prompt set.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from tqdm import tqdm

from lopd_jax.data import prompts
from lopd_jax.data.prompts import PromptError
from lopd_jax.inference import sampling

GradeKind = Literal["math", "exact"]

# `<|im_end|>` and friends may be left in decoded text when special tokens are not skipped.
_SPECIAL_RE = re.compile(r"<\|[^|<>]*\|>")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer(?: is|:)[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)  # also "final answer is"
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")

# math-verify's default extraction targets: LaTeX (\boxed first) and plain expressions.
_MATH_CONFIGS = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_TIMEOUT_S = 5


def _last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` / `\\fbox{...}`, honouring nested braces; None if absent/unclosed."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _clean_tail(answer: str) -> str:
    """Strip wrapping `$`, trailing sentence punctuation and whitespace from a marker-extracted answer."""
    answer = answer.strip()
    if answer.endswith(".") and not answer.endswith(".."):  # a sentence's full stop, not an ellipsis
        answer = answer[:-1]
    return answer.strip().strip("$").strip()


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """Extract the final answer from a model response; None when nothing answer-like is found.

    Tried in this order, the first that matches wins (within each rule the LAST occurrence is used, since
    models restate the question's numbers before answering):
      1. `\\boxed{...}` (or `\\fbox{...}`) with nested braces: the convention of math prompts.
      2. `#### X`: GSM8K style and the synthetic task's format; X is the rest of the line.
      3. `answer is X` / `final answer is X` / `Answer: X`: X is the rest of the line, `$` and final `.` stripped.
      4. The last number in the text (integers, decimals, `a/b`, thousands commas removed), only when
         `last_number` is True. Exact-match grading turns it off: in a worked solution the last number
         before a missing `####` is often an intermediate result, which must not count as an answer.

    Special-token markers such as `<|im_end|>` are removed first.
    """
    text = _SPECIAL_RE.sub("", text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found and _clean_tail(found[-1]):
            return _clean_tail(found[-1])
    if last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works on the main thread; elsewhere (data-loader
    # threads) run without one rather than raise.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> list:
    """math-verify parse of a full response (or a bare answer); [] when nothing parses."""
    return parse(text, extraction_config=_MATH_CONFIGS, parsing_timeout=_timeout())


def _parse_reference(reference: str) -> list:
    # References are bare LaTeX (`\frac{1}{576}`, `2^{25} \cdot 26!`): wrap them in math delimiters so the
    # LaTeX extractor reads the whole string as one expression.
    return parse_math(f"${reference}$") or parse_math(reference)


def grade(pred_text: str, reference: str, kind: GradeKind = "math") -> bool:
    """True when the response `pred_text` answers `reference`.

    kind="exact": `extract_answer(pred_text, last_number=False)` equals `reference` after stripping
      whitespace (synthetic tasks, where the answer string is canonical).
    kind="math": the reference and the response are parsed with math-verify (LaTeX with `\\boxed` first,
      then plain expressions) and compared symbolically. If math-verify finds nothing in the response, the
      `extract_answer` result is parsed instead. A reference math-verify cannot parse (free text such as
      `\\text{Evelyn}`) falls back to exact match of the extracted answer.
    """
    if kind == "exact":
        extracted = extract_answer(pred_text, last_number=False)
        return extracted is not None and extracted.strip() == str(reference).strip()
    if kind != "math":
        raise ValueError(f"grade: unknown kind {kind!r}; expected 'math' or 'exact'")
    gold = _parse_reference(str(reference))
    extracted = extract_answer(pred_text)
    if not gold:
        return extracted is not None and extracted.strip() == str(reference).strip()
    pred = parse_math(_SPECIAL_RE.sub("", pred_text))
    if not pred and extracted is not None:
        pred = parse_math(f"${extracted}$")
    return bool(pred) and verify(gold, pred, timeout_seconds=_timeout())


def grade_batch(preds: Sequence[Sequence[str]], references: Sequence[str], kind: GradeKind = "math") -> np.ndarray:
    """Grade k responses per prompt: preds [n_prompts][k] texts, references [n_prompts] -> bool [n_prompts, k]."""
    if len(preds) != len(references):
        raise ValueError(f"grade_batch: {len(preds)} prompts of predictions but {len(references)} references")
    return np.array([[grade(p, ref, kind) for p in row] for row, ref in zip(preds, references)], dtype=bool)


def _as_matrix(correct: np.ndarray | Sequence) -> np.ndarray:
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[1] == 0:
        raise ValueError(f"expected correct of shape [n_prompts, k>=1], got {correct.shape}")
    return correct


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a running product (no huge binomials): 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(correct: np.ndarray | Sequence, k: int) -> float:
    """Mean over prompts of the unbiased pass@k estimate; correct [n_prompts, n_samples] bool, k <= n_samples."""
    correct = _as_matrix(correct)
    n = correct.shape[1]
    return float(np.mean([pass_at_k_estimate(n, int(c), k) for c in correct.sum(axis=1)]))


def pass_at_1(correct: np.ndarray | Sequence) -> float:
    """pass@1 estimated from k samples per prompt: the fraction of correct samples. correct [n_prompts, k]."""
    return float(_as_matrix(correct).mean())


def avg_at_k(correct: np.ndarray | Sequence) -> tuple[float, float]:
    """avg@k: (mean, std) over the k sampling runs of each run's accuracy. correct [n_prompts, k].

    The mean equals pass_at_1; the std (ddof=0, 0 when k=1) says how much one run of the eval set varies.
    """
    per_run = _as_matrix(correct).mean(axis=0)
    return float(per_run.mean()), float(per_run.std())


def summarize(correct: np.ndarray | Sequence, prefix: str = "eval") -> dict[str, float]:
    """Metric dict for logging: `{prefix}/pass@1`, `{prefix}/avg@k`, `{prefix}/avg@k_std`, `{prefix}/pass@k`."""
    correct = _as_matrix(correct)
    mean, std = avg_at_k(correct)
    k = correct.shape[1]
    return {
        f"{prefix}/pass@1": pass_at_1(correct),
        f"{prefix}/avg@{k}": mean,
        f"{prefix}/avg@{k}_std": std,
        f"{prefix}/pass@{k}": pass_at_k(correct, k),
    }


def _eval_row(row: dict, where: str) -> dict:
    if "prompt" not in row and "messages" not in row:
        if not isinstance(row.get("problem"), str):
            raise PromptError(f"{where}: missing string field 'prompt' (or 'problem')")
        row = {**row, "prompt": row["problem"]}
    prompts.check_row(row, where)
    answer = row.get("answer")
    if answer is None or isinstance(answer, (dict, list, bool)):
        raise PromptError(f"{where}: missing field 'answer' (a string or a number)")
    return {**row, "answer": str(answer)}


def load_eval_set(path: str | Path, prompt_key: str | None = None, answer_key: str | None = None) -> list[dict]:
    """Read an eval set: rows with `prompt` (or `problem`, or chat `messages`) and `answer`, in any format
    ``lopd_jax.data.prompts`` reads (JSONL, parquet, a ``datasets`` directory, a hub dataset), columns mapped by
    ``prompt_key`` / ``answer_key`` (verl's ``reward_model.ground_truth`` is found without one).

    Returns one dict per row with `prompt` (str, unless the row has `messages`), `answer` (str; numbers converted),
    `line` (JSONL; every original field kept) or `row` (Arrow formats: the columns used). Blank lines are skipped.
    PromptError (a ValueError) names the file and line / row of a malformed row or a missing field, or the file
    when it is missing or empty.
    """
    read = prompts.read_records(path, prompt_key, answer_key, fallback=("problem",))
    rows = [_eval_row(row, where) for where, row in read.records]
    if not rows:
        raise PromptError(f"{path}: eval set is empty")
    return rows


class Evaluator:
    """``k`` samples per held-out prompt from the current params, graded (math-verify or exact match).

    The prompts are encoded with ``prompt_cfg`` and sampling stops at exactly ``stop_ids`` (both from
    ``lopd_jax.data.prompts``), as online OPD and the precompute rollouts do, so every mode evaluates the same tokens.
    jax and the sampler are imported on use: the grading helpers above stay importable without them.
    """

    def __init__(
        self,
        eval_cfg: Any,
        tokenizer: Any,
        model_cfg: Any,
        *,
        mesh: Any,
        seed: int,
        batch_size: int,
        stop_ids: Sequence[int],
        prompt_cfg: prompts.PromptConfig,
    ):
        rows = load_eval_set(eval_cfg.prompts, eval_cfg.prompt_key, eval_cfg.answer_key)
        rows = rows[: eval_cfg.num_prompts] if eval_cfg.num_prompts > 0 else rows
        self.cfg, self.tokenizer, self.model_cfg, self.mesh = eval_cfg, tokenizer, model_cfg, mesh
        self.prompts = prompts.encode_prompts(tokenizer, rows, prompt_cfg)
        self.answers = [r["answer"] for r in rows]
        self.scfg = sampling.SamplingConfig(
            temperature=eval_cfg.temperature,
            top_p=eval_cfg.top_p,
            max_new_tokens=eval_cfg.max_new_tokens,
            stop_token_ids=tuple(stop_ids),
            ignore_eos=True,
            seed=seed,
        )
        self.batch_size = batch_size

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        """eval/pass@1, eval/avg@k (+ its std), eval/pass@k of ``params``; the key depends only on the step."""
        n, k = len(self.prompts), self.cfg.k
        t0 = time.perf_counter()
        if jax.process_index() == 0:  # a line a newcomer can read while sampling runs (tqdm.write: bar-safe)
            tqdm.write(f"eval at step {step}: sampling {n} prompts x {k} (max {self.scfg.max_new_tokens} tokens)")
        key = jax.random.fold_in(jax.random.key(self.scfg.seed), step)
        outs = sampling.generate(params, self.model_cfg, self.prompts * k, self.scfg, key, self.mesh, self.batch_size)
        texts = [self.tokenizer.decode(o.token_ids.tolist(), skip_special_tokens=True) for o in outs]
        preds = [[texts[j * n + i] for j in range(k)] for i in range(n)]
        correct = grade_batch(preds, self.answers, self.cfg.grading)
        # Per prompt, the fraction of its k samples graded correct (eval.json keeps it: paired comparisons).
        self.per_prompt = [float(c) for c in _as_matrix(correct).mean(axis=1)]
        metrics = summarize(correct)
        metrics["eval/avg@k"] = metrics[f"eval/avg@{k}"]
        if jax.process_index() == 0:
            seconds = time.perf_counter() - t0
            tqdm.write(f"eval at step {step}: pass@1 {100 * metrics['eval/pass@1']:.1f}% ({seconds:.1f} s)")
        return metrics
