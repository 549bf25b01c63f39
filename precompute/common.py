"""Helpers shared by the precompute command lines: prompt files, tokenizers, stop ids, progress, test hooks."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

# Test hook (documented, used by tests/test_precompute_cli.py): when set to N, a tool SIGKILLs itself right
# after its N-th commit, so a test can kill it at a deterministic point and check that a rerun resumes exactly.
KILL_ENV = "LOPD_TEST_KILL_AFTER_BATCHES"
NO_AUTO_FLUSH = 1 << 62  # the tools commit at batch boundaries only, so a resumed run re-cuts the same batches


class PrecomputeError(ValueError):
    """Bad input or a store that cannot be continued; the message names the file, line, store or field."""


# ------------------------------------------------------------------------------------------------ inputs


def file_sha256(path: str | os.PathLike) -> str:
    """ "sha256:<hex>" of a file's bytes (identifies a prompt set across runs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _check_messages(messages: Any, where: str) -> None:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise PrecomputeError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")


def _lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; PrecomputeError naming the file (missing, unreadable) or the line."""
    try:
        raw_lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise PrecomputeError(f"{path}: cannot read ({e.strerror})") from None
    out = []
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise PrecomputeError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
    return out


def read_jsonl(path: str | os.PathLike, require: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a prompt file: each a JSON object with ``prompt`` (str) or ``messages`` (chat list), optional
    ``answer``, and the ``require``d keys. PrecomputeError names the file and line of the first bad row."""
    rows = []
    for lineno, line in _lines(path):
        if line.strip():
            rows.append({**_parse_row(line, f"{path}:{lineno}", require), "line": lineno})
    if not rows:
        raise PrecomputeError(f"{path}: no rows")
    return rows


def _parse_row(line: str, where: str, require: tuple[str, ...]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PrecomputeError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise PrecomputeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if ("prompt" in row) == ("messages" in row):
        raise PrecomputeError(f"{where}: each row needs exactly one of 'prompt' (str) or 'messages' (list)")
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise PrecomputeError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    if "messages" in row:
        _check_messages(row["messages"], where)
    for key in require:
        if not isinstance(row.get(key), str):
            raise PrecomputeError(f"{where}: missing string field {key!r}")
    return row


def load_tokenizer(model_dir: str | os.PathLike):
    """The HF tokenizer saved in ``model_dir`` (never runs repository code); PrecomputeError when it has none."""
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise PrecomputeError(f"{model_dir}: not a directory (expected a Hugging Face model / tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PrecomputeError(f"{model_dir}: cannot load its tokenizer ({reason})") from None


def check_model_dir(model_dir: str | os.PathLike, flag: str) -> None:
    """Refuse, before any store is touched, a model the tools cannot run: no readable config.json, or not a
    Qwen3 causal LM (config.json ``model_type`` / ``architectures``; lopd_jax trains Qwen3 dense and MoE)."""
    from lopd_jax.models import hf

    path = Path(model_dir) / hf.CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrecomputeError(f"{flag} {model_dir}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrecomputeError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PrecomputeError(f"{path}: expected a JSON object")
    supported = sorted(hf._ARCH.values())
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in hf._ARCH or any(a not in supported for a in archs):
        raise PrecomputeError(
            f"{flag} {model_dir}: config.json has model_type {cfg.get('model_type')!r}, architectures {archs}; "
            f"the precompute tools run {supported} (model_type {sorted(hf._ARCH)}) only"
        )


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x returned a list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def encode_prompt(tokenizer, row: dict, chat_template: bool, enable_thinking: bool | None) -> list[int]:
    """Prompt token ids: the chat template with the generation prompt (the assistant header), or the raw
    text when ``chat_template`` is off (then the row must have ``prompt``)."""
    if not chat_template:
        if "prompt" not in row:
            raise PrecomputeError(f"line {row['line']}: 'messages' rows need the chat template (--chat-template)")
        return _ids(tokenizer(row["prompt"])["input_ids"])
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **extra))


def stop_token_ids(model_dir: str | os.PathLike, tokenizer) -> tuple[int, ...]:
    """The ids generation stops at: the tokenizer's eos plus generation_config.json's eos ids (or, without a
    generation config, config.json's), as vLLM and ``transformers.generate`` do. Sorted, first = primary."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    d = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        if (d / name).exists():
            eos = json.loads((d / name).read_text()).get("eos_token_id")
            if eos is not None:
                ids += [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
                break
    if not ids:
        raise PrecomputeError(f"{model_dir}: no eos token id in the tokenizer, generation_config.json or config.json")
    return tuple(dict.fromkeys(ids))  # de-duplicated, tokenizer eos first


def check_engine(engine: str) -> None:
    """Refuse ``--engine vllm`` where vLLM is not installed, before any store is created."""
    import importlib.util

    if engine == "vllm" and "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
        raise PrecomputeError("--engine vllm: vllm is not installed here (it needs NVIDIA GPUs); use --engine jax")


# ------------------------------------------------------------------------------------------------ manifest


def versions(engine: str) -> dict[str, str]:
    """Versions of the packages whose numerics end up in the store."""
    names = ["lopd_jax", "jax", "jaxlib", "transformers", "tokenizers", "tensorstore"] + (
        ["vllm", "torch"] if engine == "vllm" else []
    )
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def first_difference(stored: dict, wanted: dict, prefix: str = "") -> str | None:
    """Dotted name of the first field whose value differs between two (nested) dicts, or None."""
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (sub := first_difference(a, b, f"{prefix}{key}.")) is not None:
                return sub
        elif a != b:
            return f"{prefix}{key} (store: {a!r}, this run: {b!r})"
    return None


def open_or_create(out: str, fields: dict, create: Any, refusal: str = "the store was made with different arguments"):
    """A writer for ``out``: the existing store when its ``fields`` equal this run's (a resume), else a new one
    from ``create()``. An EMPTY store (nothing committed) made by the same kind of run with other arguments is
    what a failed run leaves: it is replaced with a warning rather than blocking the corrected rerun. A store with
    committed samples and other arguments is refused (PrecomputeError naming the first differing field)."""
    from lopd_jax.store import RolloutStore, StoreError

    try:
        writer = RolloutStore.open_for_append(out, flush_tokens=NO_AUTO_FLUSH)
    except StoreError as e:
        if "no manifest.json" not in str(e):
            raise
        return create()
    stored = writer.manifest
    diff = first_difference({k: stored.get(k) for k in fields}, fields)
    if diff is None:
        return writer
    if writer.committed == 0 and writer.teacher_committed == 0 and stored.get("kind") == fields.get("kind"):
        print(f"warning: {out}: replacing the empty store a failed run left ({diff})", file=sys.stderr, flush=True)
        writer.discard_empty()
        return create()
    writer.release()
    raise PrecomputeError(f"{out}: {refusal}: {diff}; use a new --out")


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """A tqdm bar over samples that shows tokens/s, plus the final summary line."""

    def __init__(self, total: int, initial: int, desc: str):
        self.start, self.tokens, self.samples = time.perf_counter(), 0, 0
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True)

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        self.bar.update(samples)
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f} tok/s")

    def summary(self, tool: str, skipped: int = 0, **extra: Any) -> str:
        self.bar.close()
        secs = time.perf_counter() - self.start
        fields = {"samples": self.samples, "tokens": self.tokens, "skipped": skipped, "seconds": round(secs, 2)}
        fields["tokens_per_s"] = round(self.tokens / max(secs, 1e-9), 1)
        line = f"{tool}: " + " ".join(f"{k}={v}" for k, v in {**fields, **extra}.items())
        print(line, flush=True)
        return line


def maybe_kill(commits: int) -> None:
    """Test hook: SIGKILL this process after ``$LOPD_TEST_KILL_AFTER_BATCHES`` commits (see KILL_ENV)."""
    limit = os.environ.get(KILL_ENV)
    if limit and commits >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def run_cli(parse_args: Any, run: Any, argv: list[str] | None = None) -> int:
    """The tools' shared ``main``: parse, run, and report an expected failure (bad input, inconsistent store or
    teacher) as one ``error:`` line and exit status 2 instead of a traceback."""
    from lopd_jax.provenance import ProvenanceError
    from lopd_jax.store import StoreError

    args = parse_args(argv)
    try:
        run(args)
    except (PrecomputeError, StoreError, ProvenanceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
