"""Export a RolloutStore's samples for analysis elsewhere:
``python -m precompute.export STORE --format parquet|datasets OUT``.

One row per committed sample (a store or a dataset of shards, in sample order)::

    index int64, prompt_index int32, prompt_length int32, finish_reason string ("stop" / "length"),
    answer_json string (the reference answer as the store holds it: JSON text, "null" when none),
    scored bool (the teacher has scored it), tokens list<int32> (prompt + response),
    behavior_logprobs / teacher_logprobs / advantage list<float32> (one per token; NaN on prompt tokens and where
    not scored; advantage = teacher - behaviour, ``precompute.store_view``),
    teacher_topk_ids list<list<int32>> / teacher_topk_logprobs list<list<float32>> (only when the store has top-k),
    prompt_text / response_text string (decoded with the store's tokenizer; not with --no-text)

and the store's manifest as metadata: the parquet schema's ``lopd_jax.manifest`` key, or the ``datasets``
DatasetInfo description (JSON). ``--format parquet`` writes one file, read a block of samples at a time
(``--block`` samples per row group); ``--format datasets`` a ``save_to_disk`` directory (built from that parquet
file). ``python -m precompute.import_samples OUT --out STORE`` turns either back into a store whose arrays equal the
original's. OUT appears whole or not at all and is never overwritten. A store under writing is read as of its last
commit, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from precompute import common, store_view
from precompute.common import PrecomputeError

MANIFEST_KEY = b"lopd_jax.manifest"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m precompute.export", description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="RolloutStore path, kvstore URL, or dataset directory of shard stores")
    p.add_argument("--format", required=True, choices=("parquet", "datasets"))
    p.add_argument("out", help="the parquet file or datasets directory to write (must not exist)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the manifest names)")
    p.add_argument("--no-text", dest="text", action="store_false", help="no decoded prompt_text / response_text")
    p.add_argument("--block", type=int, default=1024, help="samples per read and per parquet row group")
    args = p.parse_args(argv)
    if args.block < 1:
        p.error("--block must be >= 1")
    return args


# The rollout policy's top-K (recorded with the samples) and the teacher's scores of those ids.
BEHAVIOR_TOPK_COLUMNS = (
    "behavior_topk_ids",
    "behavior_topk_logprobs",
    "teacher_behavior_topk_logprobs",
    "teacher_behavior_topk_tail",
)


def schema(topk: int, text: bool, manifest: dict):
    import pyarrow as pa

    f32, i32 = pa.list_(pa.float32()), pa.list_(pa.int32())
    fields = [("index", pa.int64()), ("prompt_index", pa.int32()), ("prompt_length", pa.int32()),
              ("finish_reason", pa.string()), ("answer_json", pa.string()), ("scored", pa.bool_()),
              ("tokens", i32), ("behavior_logprobs", f32), ("teacher_logprobs", f32), ("advantage", f32)]  # fmt: skip
    if topk:
        fields += [("teacher_topk_ids", pa.list_(i32)), ("teacher_topk_logprobs", pa.list_(f32))]
    if manifest.get("topk_tail"):
        fields += [("teacher_topk_tail", f32)]
    if manifest.get("behavior_topk"):  # [L, K] columns flattened per sample (import reshapes them)
        fields += [(name, i32 if name.endswith("_ids") else f32) for name in BEHAVIOR_TOPK_COLUMNS]
    if text:
        fields += [("prompt_text", pa.string()), ("response_text", pa.string())]
    return pa.schema(fields, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True).encode("utf-8")})


def row(i: int, s: dict, topk: int, tokenizer: Any) -> dict:
    """The export row of sample ``i``."""
    p = s["prompt_length"]
    out = {
        "index": i,
        "prompt_index": s["prompt_index"],
        "prompt_length": p,
        "finish_reason": s["finish_reason"],
        "answer_json": json.dumps(s["answer"], ensure_ascii=False),  # the bytes the store writer keeps
        "scored": bool(np.isfinite(s["teacher_logprobs"][p])),  # a scored response token is finite, never NaN
        "tokens": s["tokens"],
        "behavior_logprobs": s["behavior_logprobs"],
        "teacher_logprobs": s["teacher_logprobs"],
        "advantage": store_view.advantage(s),
    }
    if topk:
        out |= {
            "teacher_topk_ids": list(s["teacher_topk_ids"]),
            "teacher_topk_logprobs": list(s["teacher_topk_logprobs"]),
        }
    for name in ("teacher_topk_tail", *BEHAVIOR_TOPK_COLUMNS):  # the columns a store has, as it has them
        if name in s and s[name] is not None:
            out[name] = np.asarray(s[name]).reshape(-1).tolist()  # [L] or [L, K] flattened (import reshapes)
    if tokenizer is not None:
        out["prompt_text"] = tokenizer.decode(s["tokens"][:p].tolist(), skip_special_tokens=False)
        out["response_text"] = tokenizer.decode(s["tokens"][p:].tolist(), skip_special_tokens=False)
    return out


def write_parquet(reader: Any, path: str, tokenizer: Any, block: int) -> int:
    """Every committed sample into the parquet file ``path``, ``block`` samples per row group; returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sch = schema(reader.topk, tokenizer is not None, reader.manifest)
    n = len(reader)
    with pq.ParquetWriter(path, sch) as w:
        for a in range(0, n, block):
            rows = [
                row(a + j, s, reader.topk, tokenizer) for j, s in enumerate(reader.samples(range(a, min(a + block, n))))
            ]
            w.write_table(pa.Table.from_pylist(rows, schema=sch))
    return n


def write_datasets(parquet: str, path: str, cache: str, manifest: dict) -> None:
    """A ``save_to_disk`` directory at ``path`` from the parquet export (``cache``: datasets' Arrow cache)."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(parquet, cache_dir=cache)
    ds.info.description = json.dumps(manifest, sort_keys=True)
    ds.save_to_disk(path)


def _publish(built: str, out: str) -> None:
    """Move the finished export to ``out``, which must not exist (a race for the name fails, overwrites nothing)."""
    try:
        if os.path.isdir(built):
            os.rename(built, out)  # refused onto a non-empty directory
        else:
            os.link(built, out)  # refused onto any existing path, unlike rename
    except FileExistsError:
        raise PrecomputeError(f"{out}: exists; export writes a new path and overwrites nothing") from None
    except OSError as e:
        raise PrecomputeError(f"{out}: cannot write it ({e.strerror})") from None


def run(args: argparse.Namespace) -> str:
    if os.path.lexists(args.out):
        raise PrecomputeError(f"{args.out}: exists; export writes a new path and overwrites nothing")
    reader, notes = store_view.open_store(args.store)
    for n in notes:
        print(f"note: {n}", flush=True)
    tokenizer = store_view.load_tokenizer(reader, args.tokenizer, required=True) if args.text else None
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(args.out)}.export-", dir=parent)
    try:
        parquet = os.path.join(tmp, "samples.parquet")
        n = write_parquet(reader, parquet, tokenizer, args.block)
        built = parquet
        if args.format == "datasets":
            built = os.path.join(tmp, "dataset")
            write_datasets(parquet, built, os.path.join(tmp, "cache"), reader.manifest)
        _publish(built, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    line = f"export: samples={n} format={args.format} out={args.out}"
    print(line, flush=True)
    return line


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
