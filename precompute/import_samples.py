"""Turn a ``precompute.export`` output back into a RolloutStore:
``python -m precompute.import_samples EXPORT --out STORE``.

EXPORT is the parquet file or the ``datasets`` directory the export wrote; the store gets the exported samples in
order (tokens, prompt lengths, finish reasons, prompt indices, answers, behaviour log-probs), the teacher columns of
the scored ones (log-probs and, when exported, top-k), the exported manifest's fields, ``layout`` and ``topk`` (so
its arrays equal the original store's, chunking included) and ``imported_from``. The scored samples must come
first (as in any store); text and advantage columns are not read (the store derives them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

from lopd_jax.store import RESERVED_KEYS, RolloutStore
from precompute import common
from precompute.common import PrecomputeError
from precompute.export import BEHAVIOR_TOPK_COLUMNS, MANIFEST_KEY

COLUMNS = ["index", "prompt_index", "prompt_length", "finish_reason", "answer_json", "scored", "tokens",
           "behavior_logprobs", "teacher_logprobs"]  # fmt: skip
TOPK_COLUMNS = ["teacher_topk_ids", "teacher_topk_logprobs"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m precompute.import_samples", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="a parquet file or datasets directory written by precompute.export")
    p.add_argument("--out", required=True, help="RolloutStore path or TensorStore kvstore URL (must not exist)")
    p.add_argument("--block", type=int, default=1024, help="samples per read and per commit")
    return p.parse_args(argv)


def open_export(path: str, block: int, columns: list[str] | None = None) -> tuple[dict, Iterator[list[dict]]]:
    """(the exported manifest, blocks of rows: ``columns``, default all the import reads) of a parquet file or a
    datasets directory."""
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise PrecomputeError(f"{path}: cannot load it as a datasets directory ({e})") from None
        manifest, names = _manifest(path, ds.info.description), ds.column_names
        columns = columns or _columns(path, names, manifest)
        return manifest, (t.to_pylist() for t in ds.select_columns(columns).with_format("arrow").iter(block))
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrecomputeError(f"{path}: not a parquet file ({str(e).strip().splitlines()[0]})") from None
    meta = (pf.schema_arrow.metadata or {}).get(MANIFEST_KEY)
    manifest = _manifest(path, meta.decode("utf-8") if meta else None)
    columns = columns or _columns(path, pf.schema_arrow.names, manifest)
    return manifest, (b.to_pylist() for b in pf.iter_batches(batch_size=block, columns=columns))


def _manifest(path: str, text: str | None) -> dict:
    try:
        m = json.loads(text) if text else None
    except json.JSONDecodeError:
        m = None
    if not isinstance(m, dict) or not isinstance(m.get("layout"), dict) or not isinstance(m.get("topk"), int):
        raise PrecomputeError(f"{path}: no lopd_jax manifest in its metadata (not written by precompute.export)")
    return m


def _columns(path: str, names: list[str], manifest: dict) -> list[str]:
    want = COLUMNS + (TOPK_COLUMNS if manifest["topk"] else [])
    want += ["teacher_topk_tail"] if manifest.get("topk_tail") else []
    want += list(BEHAVIOR_TOPK_COLUMNS) if manifest.get("behavior_topk") else []
    missing = [c for c in want if c not in names]
    if missing:
        raise PrecomputeError(f"{path}: no column {missing[0]!r} (not a precompute.export output); columns: {names}")
    return want


def _sample(r: dict, behavior_topk: int) -> dict:
    p = r["prompt_length"]
    behavior = np.asarray(r["behavior_logprobs"], np.float32)
    s = {"tokens": np.asarray(r["tokens"], np.int32), "prompt_length": p, "finish_reason": r["finish_reason"],
         "behavior_logprobs": None if np.isnan(behavior[p:]).all() else behavior,  # no behaviour policy
         "prompt_index": r["prompt_index"], "answer": json.loads(r["answer_json"])}  # fmt: skip
    if behavior_topk:
        s["behavior_topk_ids"] = np.asarray(r["behavior_topk_ids"], np.int32).reshape(-1, behavior_topk)
        s["behavior_topk_logprobs"] = np.asarray(r["behavior_topk_logprobs"], np.float32).reshape(-1, behavior_topk)
    return s


def check_order(path: str, manifest: dict, blocks: Iterator[list[dict]]) -> None:
    """Refuse, before anything is written, an export whose scored samples are not all before its unscored ones."""
    unscored = None
    for rows in blocks:
        for r in rows:
            if r["scored"] and unscored is not None:
                raise PrecomputeError(
                    f"{path}: sample {r['index']} is scored but sample {unscored} before it is not; the scored "
                    "samples of a store come first (a dataset of shards scored in parts cannot be one store)"
                )
            if not r["scored"] and unscored is None:
                unscored = r["index"]


def teacher_columns(rows: list[dict], topk: int) -> tuple[list, tuple | None]:
    """The teacher log-probs (and top-k ids / log-probs, [L, k] each) of exported rows."""
    lps = [np.asarray(r["teacher_logprobs"], np.float32) for r in rows]
    if not topk:
        return lps, None
    ids = [np.asarray(r["teacher_topk_ids"], np.int32).reshape(-1, topk) for r in rows]
    return lps, (ids, [np.asarray(r["teacher_topk_logprobs"], np.float32).reshape(-1, topk) for r in rows])


def teacher_extras(rows: list[dict], manifest: dict) -> dict:
    """``write_teacher``'s keyword columns the store has: its own top-k tail, its scores of the behaviour top-k."""
    out: dict = {}
    if manifest.get("topk_tail"):
        out["topk_tail"] = [np.asarray(r["teacher_topk_tail"], np.float32) for r in rows]
    if k := manifest.get("behavior_topk"):
        lps = [np.asarray(r["teacher_behavior_topk_logprobs"], np.float32).reshape(-1, k) for r in rows]
        out["behavior"] = (lps, [np.asarray(r["teacher_behavior_topk_tail"], np.float32) for r in rows])
    return out


def run(args: argparse.Namespace) -> str:
    manifest, _ = open_export(args.export, args.block)
    check_order(args.export, manifest, open_export(args.export, args.block, ["index", "scored"])[1])
    if "://" in args.out:  # a kvstore URL: written in place (no rename there)
        return write_store(args, manifest, args.out)
    if os.path.lexists(args.out):
        raise PrecomputeError(f"{args.out}: exists; import_samples writes a new store and overwrites nothing")
    parent, name = os.path.split(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.importing-", dir=parent)
    try:  # built beside and renamed: a crash leaves no half-imported store under the name
        line = write_store(args, manifest, os.path.join(tmp, "store"))
        os.rename(os.path.join(tmp, "store"), args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return line


def write_store(args: argparse.Namespace, manifest: dict, out: str) -> str:
    fields = {k: v for k, v in manifest.items() if k not in RESERVED_KEYS and k not in ("created_at", "updated_at")}
    fields["imported_from"] = os.path.abspath(args.export)
    topk = manifest["topk"]
    extra = {"behavior_topk": manifest.get("behavior_topk", 0), "topk_tail": bool(manifest.get("topk_tail"))}
    writer = RolloutStore.create(
        out, fields, topk=topk, flush_tokens=common.NO_AUTO_FLUSH, **extra, **manifest["layout"]
    )
    progress = common.Progress(manifest.get("committed", 0), 0, "import")
    for rows in open_export(args.export, args.block)[1]:
        writer.append([_sample(r, extra["behavior_topk"]) for r in rows])
        writer.flush()
        scored = [r for r in rows if r["scored"]]  # a prefix of the block (check_order)
        if scored:
            writer.write_teacher(writer.teacher_end, *teacher_columns(scored, topk), **teacher_extras(scored, manifest))
            writer.flush()
        progress.update(len(rows), sum(len(r["tokens"]) for r in rows))
    writer.close()
    return progress.summary("import_samples", store=args.out, committed=writer.committed)


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
