"""Prompt files, chat-template encoding and stop ids: the ONE prompt encoder.

Lightning OPD's rollouts (``precompute.rollouts``, ``precompute.import_jsonl``), the online-OPD baseline
(``lopd_jax.training.online_opd``) and held-out evaluation (``lopd_jax.inference.evaluation.Evaluator``) all read
prompts, encode them and
choose their stop tokens here. Two encoders with slightly different rules would tokenize the same prompt
differently (or stop on different tokens) in the two arms of exactly the comparison the project exists to make.

Rules:
  * a prompt set is a JSONL file (one object per non-blank line), a parquet file or a directory of parquet shards,
    a ``datasets`` ``save_to_disk`` directory, or a Hugging Face hub dataset ``org/name[:split]`` (streamed);
    Arrow formats are read a record batch at a time, only the columns used. Each row has exactly one of
    ``prompt`` (str) or ``messages`` (a non-empty list of ``{"role": str, "content": str}``), or the column a
    prompt key names; verl's layout is recognised (``prompt`` a messages list, ``reward_model.ground_truth`` the
    answer). Errors name the file and line (JSONL) or row (0-based); a missing column names the columns there are;
  * a prompt set's hash (the manifest's ``prompts.sha256``) is of the bytes read: a file's bytes (a JSONL file is
    read once, so a pipe works), a directory's files (relative path, size, bytes, sorted by path), a hub dataset's
    rows as JSON;
  * ``chat_template`` on (the default everywhere): the tokenizer's chat template with the generation prompt (the
    assistant header), ``enable_thinking`` passed to it when set (Qwen3); a tokenizer without a template is an
    error, never a silent fall-back to raw text. Off: the raw ``prompt`` text (``messages`` rows are refused);
  * stop ids: the tokenizer's eos, then generation_config.json's eos ids (or config.json's when there is no
    generation config), as vLLM and ``transformers.generate`` do; then any extra ids; de-duplicated, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple


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

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_BATCH = 1024  # rows per Arrow record batch read (only the mapped columns are read)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?")  # org/dataset[:split]


class PromptSet(NamedTuple):
    """``("where", row)`` of every record of a prompt set and ``"sha256:<hex>"`` of the bytes they were read from."""

    records: list[tuple[str, dict]]
    sha256: str

    @property
    def rows(self) -> list[dict]:
        return [row for _, row in self.records]


def read_prompt_rows(
    path: str | os.PathLike,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    require: tuple[str, ...] = (),
) -> PromptSet:
    """The checked rows of a prompt set in any format (see the module doc) and the hash of the bytes read.

    Each row has ``prompt`` (str) or ``messages`` (list), ``answer`` when the set has one, the ``require``d string
    fields, and its place: ``line`` (JSONL, 1-based) or ``row`` (Arrow formats, 0-based). PromptError names the
    file and line / row of the first bad row, or the file when it holds no rows."""
    read = read_records(path, prompt_key, answer_key, require)
    records = [(where, check_row(row, where, require)) for where, row in read.records]
    if not records:
        raise PromptError(f"{path}: no rows")
    return PromptSet(records, read.sha256)


def read_prompts(path: str | os.PathLike, require: tuple[str, ...] = (), **keys: str | None) -> list[dict]:
    """The rows of ``read_prompt_rows`` (``keys``: ``prompt_key`` / ``answer_key``)."""
    return read_prompt_rows(path, require=require, **keys).rows


def read_records(
    path: str | os.PathLike,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    require: tuple[str, ...] = (),
    fallback: tuple[str, ...] = (),
) -> PromptSet:
    """Every record of a prompt set mapped by ``map_row`` but not checked (the eval set adds its own rules).

    ``fallback``: further prompt columns an Arrow format is read with when it has neither ``prompt`` nor
    ``messages`` (the eval set's ``problem``). Arrow formats read only the columns the mapping uses."""
    keys = Keys(prompt_key, answer_key, tuple(require), tuple(fallback))
    source = os.fspath(path)
    jsonl = hashlib.sha256()  # fed as a JSONL file is read: its hash is ready once the records are
    if os.path.isdir(source):
        records, sha = _read_directory(source, keys)
    elif source.endswith(PARQUET_SUFFIXES):
        records, sha = _parquet_records([Path(source)], keys), _files_sha256(Path(source), [Path(source)])
    elif not os.path.exists(source) and _HUB_NAME.fullmatch(source) and not source.endswith((".jsonl", ".json")):
        records, sha = _hub_records(source, keys)
    else:
        records, sha = _jsonl_records(source, jsonl), None
    mapped = [(where, map_row(raw, where, prompt_key, answer_key)) for where, raw in records]
    return PromptSet(mapped, sha or "sha256:" + jsonl.hexdigest())


class Keys(NamedTuple):
    """Which columns hold the prompt and the answer (None: the defaults of ``map_row``), and what else is read."""

    prompt: str | None
    answer: str | None
    require: tuple[str, ...] = ()
    fallback: tuple[str, ...] = ()

    def columns(self, names: Sequence[str], where: str) -> list[str]:
        """The top-level columns to read out of ``names``; PromptError naming ``where``, the missing column and the
        columns there are."""

        def need(key: str, what: str) -> str:
            top = key.split(".")[0]
            if top not in names:
                raise PromptError(f"{where}: no column {top!r} ({what}); its columns: {list(names)}")
            return top

        cols = [need(self.prompt, "--prompt-key / prompt_key")] if self.prompt else []
        if not self.prompt:
            cols = [c for c in ("prompt", "messages", *self.fallback) if c in names]
            if not cols:
                raise PromptError(
                    f"{where}: no column 'prompt' or 'messages' (name the prompt column with --prompt-key / "
                    f"prompt_key); its columns: {list(names)}"
                )
        if self.answer:
            cols.append(need(self.answer, "--answer-key / answer_key"))
        else:
            cols += [c for c in ("answer", "reward_model") if c in names]
        cols += [need(k, "a required column") for k in self.require]
        return list(dict.fromkeys(cols))


def map_row(raw: dict, where: str, prompt_key: str | None = None, answer_key: str | None = None) -> dict:
    """A record with its prompt under ``prompt`` (a string) or ``messages`` (a list) and its answer under ``answer``.

    Keys may be dotted paths into nested fields (``reward_model.ground_truth``). Without keys, verl's layout is
    recognised: a ``prompt`` that is a list is the chat ``messages``, and ``reward_model.ground_truth`` is the
    answer when there is no ``answer`` field."""
    row = dict(raw)
    if prompt_key is not None:
        value = _field(raw, prompt_key, where, "--prompt-key / prompt_key")
        if not isinstance(value, (str, list)):
            raise PromptError(
                f"{where}: {prompt_key!r} must be a string or a list of {{'role': str, 'content': str}} messages, "
                f"got {type(value).__name__}"
            )
        for k in ("prompt", "messages"):
            row.pop(k, None)
        row["prompt" if isinstance(value, str) else "messages"] = value
    elif isinstance(row.get("prompt"), list) and "messages" not in row:  # verl: the prompt is a messages list
        row["messages"] = row.pop("prompt")
    if answer_key is not None:
        row["answer"] = _field(raw, answer_key, where, "--answer-key / answer_key")
    elif "answer" not in row and isinstance(row.get("reward_model"), dict) and "ground_truth" in row["reward_model"]:
        row["answer"] = row["reward_model"]["ground_truth"]
    return row


def _field(raw: dict, key: str, where: str, what: str) -> Any:
    """``raw[a][b]...`` for the dotted ``key`` ``a.b...``; PromptError naming the key and the fields there are."""
    value: Any = raw
    for i, part in enumerate(key.split(".")):
        if not isinstance(value, dict) or part not in value:
            inside = ".".join(key.split(".")[:i]) or "the row"
            there = sorted(value) if isinstance(value, dict) else f"a {type(value).__name__}"
            raise PromptError(f"{where}: no field {key!r} ({what}); {inside} has {there}")
        value = value[part]
    return value


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


def _jsonl_records(path: str, h: Any) -> Iterator[tuple[str, dict]]:
    """("file:line", object) of every non-blank line, read once (a pipe works) with every byte fed to ``h``."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; the OSError of open must be told from the parse's)
    except OSError as e:
        raise PromptError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            h.update(raw)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"{where}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, {**row, "line": lineno}


def _read_directory(path: str, keys: Keys) -> tuple[Iterator[tuple[str, dict]], str]:
    """A ``datasets`` ``save_to_disk`` directory or a directory of parquet shards (sorted by path)."""
    root = Path(path)
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return _dataset_records(path, keys), _files_sha256(root, files)
    shards = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(PARQUET_SUFFIXES))
    if not shards:
        raise PromptError(
            f"{path}: a directory, but neither a datasets save_to_disk directory (state.json) nor parquet files"
        )
    return _parquet_records(shards, keys), _files_sha256(root, shards)


def _files_sha256(root: Path, files: Sequence[Path]) -> str:
    """The hash of a prompt file's bytes; of a directory: each file's path (relative to it), size and bytes."""
    h = hashlib.sha256()
    for p in files:
        if root.is_dir():
            h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
        try:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023 (used at once, inside the loop)
                    h.update(block)
        except OSError as e:
            raise PromptError(f"{p}: cannot read ({e.strerror})") from None
    return "sha256:" + h.hexdigest()


def _parquet_records(files: Sequence[Path], keys: Keys) -> Iterator[tuple[str, dict]]:
    """("file: row i", row) of parquet files, read a record batch of the mapped columns at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as e:
            raise PromptError(f"{file}: not a parquet file ({_first_line(e)})") from None
        columns = keys.columns(pf.schema_arrow.names, str(file))
        index = 0
        for batch in pf.iter_batches(batch_size=ARROW_BATCH, columns=columns):
            for row in batch.to_pylist():
                yield f"{file}: row {index}", {**row, "row": index}
                index += 1


def _dataset_records(path: str, keys: Keys) -> Iterator[tuple[str, dict]]:
    """("dir: row i", row) of a ``datasets.save_to_disk`` directory (memory-mapped Arrow, read in batches)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise PromptError(f"{path}: cannot load it as a datasets directory ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise PromptError(f"{path}: a DatasetDict with splits {list(ds)}: name one, e.g. {path}/{next(iter(ds))}")
        ds = next(iter(ds.values()))
    yield from _table_rows(ds.select_columns(keys.columns(ds.column_names, path)), path)


def _table_rows(ds: Any, where: str) -> Iterator[tuple[str, dict]]:
    index = 0
    for table in ds.with_format("arrow").iter(batch_size=ARROW_BATCH):
        for row in table.to_pylist():
            yield f"{where}: row {index}", {**row, "row": index}
            index += 1


def _hub_records(name: str, keys: Keys) -> tuple[list[tuple[str, dict]], str]:
    """The rows of a Hugging Face hub dataset ``org/name[:split]`` (streamed) and the hash of their JSON (the
    hub's bytes are not what is read); PromptError in one line when the hub cannot be reached."""
    import logging

    import datasets

    repo, _, split = name.partition(":")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would bury the one line below
    try:
        ds = datasets.load_dataset(repo, split=split or None, streaming=True)
        if isinstance(ds, datasets.IterableDatasetDict):
            if len(ds) != 1:
                raise PromptError(
                    f"{name}: the hub dataset has splits {list(ds)}: name one, e.g. {repo}:{next(iter(ds))}"
                )
            ds = next(iter(ds.values()))
        columns = keys.columns(list(ds.column_names or []), name)
        records = list(_table_rows(ds.select_columns(columns), name))
    except PromptError:
        raise
    except Exception as e:  # the hub's errors have no common base (ConnectionError, HfHubHTTPError, ValueError...)
        raise PromptError(
            f"{name}: no such local path, and cannot load it from the Hugging Face hub ({_first_line(e)})"
        ) from None
    finally:
        hub_logger.setLevel(level)
    h = hashlib.sha256()
    for _, row in records:
        h.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8") + b"\n")
    return records, "sha256:" + h.hexdigest()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
    names ``where`` (default: the row's line or row number)."""
    where = where or (f"line {row['line']}" if "line" in row else f"row {row['row']}" if "row" in row else "prompt")
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
