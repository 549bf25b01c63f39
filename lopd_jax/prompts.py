"""Prompt files, chat-template encoding and stop ids: the ONE prompt encoder.

Lightning OPD's rollouts (``precompute.rollouts``, ``precompute.import_jsonl``), the online-OPD baseline
(``lopd_jax.online_opd``) and held-out evaluation (``lopd_jax.eval.Evaluator``) all read prompts, encode them and
choose their stop tokens here. Two encoders with slightly different rules would tokenize the same prompt
differently (or stop on different tokens) in the two arms of exactly the comparison the project exists to make.

Rules:
  * a prompt file is JSONL, one object per non-blank line with exactly one of ``prompt`` (str) or ``messages``
    (a non-empty list of ``{"role": str, "content": str}``); errors name the file and line;
  * ``chat_template`` on (the default everywhere): the tokenizer's chat template with the generation prompt (the
    assistant header), ``enable_thinking`` passed to it when set (Qwen3); a tokenizer without a template is an
    error, never a silent fall-back to raw text. Off: the raw ``prompt`` text (``messages`` rows are refused);
  * stop ids: the tokenizer's eos, then generation_config.json's eos ids (or config.json's when there is no
    generation config), as vLLM and ``transformers.generate`` do; then any extra ids; de-duplicated, in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class PromptError(ValueError):
    """A bad prompt file, tokenizer or model directory; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How the trainer encodes its prompts (online OPD's ``data.prompts`` and ``eval.prompts`` alike).

    The same two settings as the precompute tools' ``--chat-template`` / ``--enable-thinking`` flags, so online
    OPD, evaluation and the stored rollouts can be set to encode a prompt identically.
    """

    chat_template: bool = True  # the tokenizer's chat template with the generation prompt; False: raw text
    enable_thinking: bool | None = None  # passed to the chat template (Qwen3); None: the template's default


# ------------------------------------------------------------------------------------------------ files


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file, read once (a pipe such as ``<(...)`` can only be read once: hash and parse these
    bytes, never the path twice); PromptError naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PromptError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path: str | os.PathLike, data: bytes | None = None) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (``data``: its bytes, already read); PromptError naming the file
    (missing, unreadable) or the line."""
    raw_lines = (read_bytes(path) if data is None else data).splitlines()
    out = []
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise PromptError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
    return out


def read_objects(path: str | os.PathLike, data: bytes | None = None) -> list[tuple[str, dict]]:
    """("file:line", object) for every non-blank line of a JSONL file (``data``: its bytes, already read);
    PromptError naming the first bad line."""
    out = []
    for lineno, line in _lines(path, data):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append((where, {**row, "line": lineno}))
    return out


def check_row(row: dict, where: str, require: tuple[str, ...] = ()) -> dict:
    """``row`` when it has exactly one of ``prompt`` / ``messages`` (well-formed) and the ``require``d string
    fields; PromptError naming ``where`` otherwise."""
    if ("prompt" in row) == ("messages" in row):
        raise PromptError(f"{where}: each row needs exactly one of 'prompt' (str) or 'messages' (list)")
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise PromptError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    if "messages" in row and not _valid_messages(row["messages"]):
        raise PromptError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    for key in require:
        if not isinstance(row.get(key), str):
            raise PromptError(f"{where}: missing string field {key!r}")
    return row


def _valid_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def read_prompts(path: str | os.PathLike, require: tuple[str, ...] = (), data: bytes | None = None) -> list[dict]:
    """Rows of a prompt file (see the module doc), each with its 1-based ``line`` (``data``: the file's bytes,
    already read with ``read_bytes``); PromptError names the file and line of the first bad row, or the file when
    it holds no rows."""
    rows = [check_row(row, where, require) for where, row in read_objects(path, data)]
    if not rows:
        raise PromptError(f"{path}: no rows")
    return rows


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The HF tokenizer saved in ``model_dir`` (never runs repository code); PromptError when it has none."""
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise PromptError(f"{model_dir}: not a directory (expected a Hugging Face model / tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PromptError(f"{model_dir}: cannot load its tokenizer ({reason})") from None


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x returned a list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def encode_prompt(
    tokenizer: Any, row: dict, chat_template: bool = True, enable_thinking: bool | None = None, where: str = ""
) -> list[int]:
    """Prompt token ids of one row (``prompt`` or ``messages``; see the module doc for the rules); a PromptError
    names ``where`` (default: the row's line)."""
    where = where or (f"line {row['line']}" if "line" in row else "prompt")
    if not chat_template:
        if "prompt" not in row:
            raise PromptError(f"{where}: 'messages' rows need the chat template (--chat-template)")
        return _nonempty(_ids(tokenizer(row["prompt"])["input_ids"]), where)
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"{where}: the tokenizer has no chat template (encode raw text with --no-chat-template, or "
            "prompt.chat_template=false in a training config)"
        )
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    try:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **extra)
    except Exception as e:  # the template is the model's own Jinja code: it raises what it likes (an unknown role)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PromptError(f"{where}: the chat template cannot render this row ({type(e).__name__}: {reason})") from None
    return _nonempty(_ids(encoded), where)


def _nonempty(ids: list[int], where: str) -> list[int]:
    if not ids:
        raise PromptError(f"{where}: the prompt encodes to no tokens (an empty prompt without the chat template)")
    return ids


def encode_prompts(tokenizer: Any, rows: Sequence[dict], cfg: PromptConfig = PromptConfig()) -> list[list[int]]:
    """``encode_prompt`` of every row with the settings of ``cfg``."""
    return [encode_prompt(tokenizer, r, cfg.chat_template, cfg.enable_thinking) for r in rows]


def stop_ids(model_dir: str | os.PathLike, tokenizer: Any, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The ids generation stops at: the tokenizer's eos, generation_config.json's eos ids (or, without a
    generation config, config.json's) and ``extra``; de-duplicated, tokenizer eos first (the primary)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    d = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        if (d / name).exists():
            eos = _read_json(d / name).get("eos_token_id")
            if eos is not None:
                ids += [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
                break
    ids += [int(i) for i in extra]
    if not ids:
        raise PromptError(f"{model_dir}: no eos token id in the tokenizer, generation_config.json or config.json")
    return tuple(dict.fromkeys(ids))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a JSON object")
    return data
