"""Import reference SFT data into a RolloutStore:
``python -m precompute.import_jsonl --tokenizer DIR --data FILE.jsonl --out STORE [--sft-teacher HF_DIR]``.

Each row has ``prompt`` (or chat ``messages``) and ``completion`` (text), optional ``answer``; the file is JSONL,
parquet or a ``datasets`` directory, its columns mapped as ``precompute.rollouts`` maps them. A sample's tokens are
the chat-templated prompt ids (generation prompt added, as the rollout tool does) + the completion's ids + the eos
id, finish reason "stop". No policy sampled them, so behaviour log-probs are NaN and the manifest says so
(``behavior_logprobs: "none"``). ``--sft-teacher`` (a model directory, fingerprinted) or
``--sft-teacher-fingerprint`` records whose answers these are, for the teacher-consistency checks; e.g. the demo's
worked solutions are imported and the demo's teacher is trained on them from scratch.

Rerunning the same command on a partially written store continues where its last commit ended.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

from lopd_jax.data import prompts
from lopd_jax.data.prompts import PromptError
from lopd_jax.store import RolloutStore, provenance
from precompute import common
from precompute.common import PrecomputeError

BLOCK = 1024  # samples per commit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m precompute.import_jsonl", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="HF directory holding the tokenizer (and chat template)")
    p.add_argument(
        "--data",
        required=True,
        help="rows {prompt | messages, completion, answer?}: .jsonl, parquet or a datasets directory",
    )
    common.add_key_args(p)
    p.add_argument("--out", required=True, help="RolloutStore path or TensorStore kvstore URL")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--sft-teacher", default=None, help="HF directory of the model whose answers these are")
    teacher.add_argument("--sft-teacher-fingerprint", default=None, help="its weights fingerprint (sha256:...)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-len", type=int, default=None, help="skip (and count) samples longer than this")
    return p.parse_args(argv)


def build_rows(args: argparse.Namespace, tokenizer, eos: int) -> tuple[list[dict], int, str]:
    """Store rows of the data file (prompt ids + completion ids + eos), the count skipped by --max-len and the
    hash of the file's bytes."""
    rows, skipped = [], 0
    read = prompts.read_prompt_rows(args.data, args.prompt_key, args.answer_key, require=("completion",))
    for index, (where, row) in enumerate(read.records):
        try:
            prompt = prompts.encode_prompt(tokenizer, row, args.chat_template, args.enable_thinking, where)
        except PromptError as e:
            raise PrecomputeError(str(e)) from None
        completion = [int(t) for t in tokenizer(row["completion"], add_special_tokens=False)["input_ids"]]
        tokens = [*prompt, *completion, eos]
        if args.max_len is not None and len(tokens) > args.max_len:
            skipped += 1
            continue
        rows.append({"tokens": tokens, "prompt_length": len(prompt), "finish_reason": "stop",
                     "behavior_logprobs": None, "prompt_index": index, "answer": row.get("answer")})  # fmt: skip
    return rows, skipped, read.sha256


def manifest_fields(args: argparse.Namespace, eos: int, n: int, skipped: int, data_sha: str) -> dict:
    fp = args.sft_teacher_fingerprint
    if fp is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", fp):
        raise PrecomputeError(f"--sft-teacher-fingerprint {fp!r} is not 'sha256:' + 64 lowercase hex digits")
    teacher = args.sft_teacher_fingerprint
    if args.sft_teacher is not None:
        teacher = provenance.fingerprint_weights(args.sft_teacher)
    template = provenance.fingerprint_chat_template(args.tokenizer) if args.chat_template else None
    return {
        "kind": "sft_data",
        "policy": None,
        "behavior_logprobs": "none",
        "sft_teacher": teacher,
        "tokenizer": provenance.fingerprint_tokenizer(args.tokenizer),
        "chat_template": template,
        "data": {"sha256": data_sha, "kept": n, "skipped": skipped, "eos_token_id": eos},
        "import_args": {
            "chat_template": args.chat_template,
            "enable_thinking": args.enable_thinking,
            "max_len": args.max_len,
            "prompt_key": args.prompt_key,
            "answer_key": args.answer_key,
        },  # fmt: skip
    }


def run(args: argparse.Namespace) -> str:
    tokenizer = prompts.load_tokenizer(args.tokenizer)
    eos = prompts.stop_ids(args.tokenizer, tokenizer)[0]
    rows, skipped, data_sha = build_rows(args, tokenizer, eos)
    if not rows:  # an empty store would look like a finished import
        raise PrecomputeError(
            f"{args.data}: all {skipped} rows are longer than --max-len {args.max_len} tokens: nothing imported, "
            "no store written"
        )
    fields = manifest_fields(args, eos, len(rows), skipped, data_sha)
    extra = {"vocab_size": len(tokenizer), "engine": {"name": "import"}, "versions": common.versions("import")}
    extra["data_path"] = os.path.abspath(args.data)
    extra["tokenizer_path"] = os.path.abspath(args.tokenizer)
    create = functools.partial(RolloutStore.create, args.out, {**fields, **extra}, flush_tokens=common.NO_AUTO_FLUSH)
    writer = common.open_or_create(args.out, fields, create)
    progress = common.Progress(len(rows), writer.committed, "import")
    for commits, start in enumerate(range(writer.committed, len(rows), BLOCK), 1):
        block = rows[start : start + BLOCK]
        writer.append(block)
        writer.flush()
        progress.update(len(block), sum(len(r["tokens"]) for r in block))
        common.maybe_kill(commits)
    writer.close()
    return progress.summary("import_jsonl", skipped=skipped, store=args.out, committed=writer.committed)


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
