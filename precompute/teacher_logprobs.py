"""Score a RolloutStore with a teacher: ``python -m precompute.teacher_logprobs --teacher HF_DIR --store STORE``.

Writes ``teacher_logprobs`` (entry j = log p_T(tokens[j] | tokens[:j]), NaN on prompt tokens) for every committed
sample, the top-k columns with ``--top-k K`` (the teacher's own top-k and its tail log(1 - their mass)), and the
teacher's fingerprint into the manifest. A store with the rollout policy's top-k (``precompute.rollouts
--record-topk K``) also gets log p_T at those K ids and their tail per token (``teacher_behavior_topk_*``): the JAX
engine computes both from the full logits; vLLM's ``prompt_logprobs`` cannot score arbitrary ids, so such a store
is refused with ``--engine vllm``. The manifest's ``teacher_topk_scores`` records K and which ids each set is.
A teacher whose tokenizer differs from the store's is refused (token ids would mean different text), naming both
fingerprints.

``--out STORE2`` first copies the store's samples into a new store (with the top-k columns when asked), so several
teachers can score the same rollouts; without it the store is scored in place (its top-k width is fixed when it is
created, so in-place scoring needs ``--top-k`` equal to the store's).

A sharded dataset (``precompute.rollouts --num-shards``) is scored shard by shard, each in place (or into
``--out/shard-...``); with ``--num-shards M --shard-index i`` (or the launcher's variables, ``precompute.shards``)
this process scores the dataset's shards k with k % M == i, so M scoring processes (e.g. one per group of
tensor-parallel GPUs) share the shards of N rollout processes. A single store scored by M > 1 processes needs
``--out DATASET``: process i copies its contiguous part of the samples into ``DATASET/shard-i-of-M`` and scores it.
The parts are cut from the source's sample count and M alone (never from ``--window`` or from when a process ran: a
source whose rollouts have not finished is refused), and each shard records its part and the source's count, so
the dataset checks that its parts tile the source (no gap, no sample twice).

Resumable: samples are scored in fixed windows of ``--window`` samples, each committed on its own; rerunning the
same command after a crash continues at the first uncommitted window (the copy resumes too).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from lopd_jax.store import RESERVED_KEYS, RolloutStore, StoreError, provenance
from lopd_jax.store.dataset import RolloutDataset
from precompute import common, shards
from precompute.common import PrecomputeError
from precompute.engines.jax_engine import Scored

NO_AUTO_FLUSH = common.NO_AUTO_FLUSH
COPY_BLOCK = 1024  # samples per commit while copying a store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m precompute.teacher_logprobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="HF model directory of the teacher")
    p.add_argument("--store", required=True, help="RolloutStore to score")
    p.add_argument("--out", default=None, help="write a scored copy here instead of scoring --store in place")
    p.add_argument("--engine", choices=("jax", "vllm"), default="jax")
    p.add_argument("--top-k", type=int, default=0, help="also store the teacher's top-k ids / log-probs")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per scoring batch (JAX)")
    p.add_argument("--window", type=int, default=256, help="samples scored per commit")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights / matmul dtype: JAX default float32 (bfloat16 on GPU/TPU); "
                   "vLLM default auto (the checkpoint's)")  # fmt: skip
    p.add_argument("--head-fp32", action="store_true",
                   help="vLLM: compute the lm_head / logits in fp32 (hf_overrides head_dtype, vLLM >= 0.26); the JAX "
                   "engine always accumulates the head in fp32")  # fmt: skip
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM only")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM only")
    shards.add_shard_args(p)
    args = p.parse_args(argv)
    if args.dtype == "auto" and args.engine != "vllm":
        p.error("--dtype auto is for --engine vllm; the JAX engine takes float32, bfloat16 or float16")
    args.dtype = args.dtype or ("auto" if args.engine == "vllm" else "float32")
    for name in ("batch_tokens", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k < 0:
        p.error("--top-k must be >= 0")
    return args


# ------------------------------------------------------------------------------------------------ store copy


def _copyable_fields(manifest: dict) -> dict:
    """User manifest fields of the source that describe its samples (not the store itself, not its teacher)."""
    return {k: v for k, v in manifest.items() if k not in RESERVED_KEYS and not k.startswith("teacher")
            and k not in ("created_at", "updated_at")}  # fmt: skip


def _as_row(s: dict) -> dict:
    p = s["prompt_length"]
    behavior = s["behavior_logprobs"][p:]
    row = {
        "tokens": s["tokens"],
        "prompt_length": p,
        "finish_reason": s["finish_reason"],
        "behavior_logprobs": None if np.isnan(behavior).all() else behavior,  # SFT data has no behaviour policy
        "prompt_index": s["prompt_index"],
        "answer": s["answer"],
    }
    if "behavior_topk_ids" in s:
        row |= {k: s[k][p:] for k in ("behavior_topk_ids", "behavior_topk_logprobs")}
    return row


def copy_store(src: str, dst: str, topk: int, part: tuple[int, int] | None = None, shard: dict | None = None) -> None:
    """Copy the committed samples of ``src`` (those in ``part`` = [lo, hi) when given, as dataset shard ``shard``)
    into ``dst`` (created with ``topk`` teacher columns, or resumed)."""
    reader = RolloutStore(src)
    lo, hi = part or (0, len(reader))
    fields = {**_copyable_fields(reader.manifest), "copied_from": reader.path}
    if shard is not None:  # "of": the source's sample count, so a dataset can check that its parts tile it
        fields["shard"] = {**shard, "samples": [lo, hi], "of": len(reader), "expected": hi - lo}
    create = functools.partial(
        RolloutStore.create, dst, fields, topk=topk, behavior_topk=reader.behavior_topk, topk_tail=True,
        flush_tokens=NO_AUTO_FLUSH, **reader.manifest["layout"],
    )  # fmt: skip
    refusal = f"exists and is not a copy of {src} with these arguments"
    writer = common.open_or_create(dst, {**fields, "topk": topk}, create, refusal)
    for start in range(lo + writer.committed, hi, COPY_BLOCK):
        writer.append([_as_row(s) for s in reader.samples(range(start, min(start + COPY_BLOCK, hi)))])
        writer.flush()
    writer.close()


# ------------------------------------------------------------------------------------------------ work plan


def plan_units(args: argparse.Namespace, source, shard: shards.Shard) -> list[tuple]:
    """This process's stores to score: (target store, source to copy from or None, copy part or None, index of its
    first sample in the whole dataset) each. Windows are cut at multiples of --window of that global index, so a
    shard that starts on a multiple is scored in exactly the batches one process would use (bit-identical numbers:
    the JAX engine's results depend on the batch shapes, a little)."""
    if isinstance(source, RolloutDataset):
        if shard.count > source.count:
            raise PrecomputeError(
                f"--num-shards {shard.count}: the dataset {args.store} has only {source.count} shards to score"
            )
        mine = [k for k in range(source.count) if k % shard.count == shard.index]
        srcs = [shards.join(args.store, source.names[k]) for k in mine]
        bases = [int(source.starts[k]) for k in mine]
        if not args.out:
            return [(src, None, None, base) for src, base in zip(srcs, bases)]
        outs = [shards.shard_store(args.out, shards.Shard(k, source.count)) for k in mine]
        return [(out, src, None, base) for out, src, base in zip(outs, srcs, bases)]
    if shard.count == 1:
        return [(args.out, args.store, None, 0) if args.out else (args.store, None, None, 0)]
    if not args.out:
        raise PrecomputeError(
            f"--store {args.store}: one store scored by {shard.count} processes needs --out DATASET (each process "
            "copies its part of the samples into its own shard there; a store has one writer)"
        )
    # The parts depend on the finished source's count and the shard count only (never on --window or on when a
    # process ran: an unfinished source is refused in ``run``), so M processes always tile the source exactly.
    if shard.count > len(source):
        raise PrecomputeError(
            f"--num-shards {shard.count}: the store {args.store} has only {len(source)} samples to share; use at "
            f"most {len(source)} shards (nothing was written)"
        )
    lo, hi = shards.split(len(source), shard)
    return [(shards.shard_store(args.out, shard), args.store, (lo, hi), lo)]


# ------------------------------------------------------------------------------------------------ engines


def make_scorer(args: argparse.Namespace, longest: int):
    """(function: token sequences -> list[Scored], engine info for the manifest); ``longest``: the longest sample."""
    if args.engine == "vllm":
        return _vllm_scorer(args, longest)
    from precompute.engines.jax_engine import JaxEngine

    engine = JaxEngine(args.teacher, dtype=args.dtype)

    def score_jax(seqs: list[np.ndarray], ids: list[np.ndarray] | None = None) -> list[Scored]:
        return engine.score(seqs, topk=args.top_k, batch_tokens=args.batch_tokens, ids=ids)

    return score_jax, {"name": "jax", "mesh": dict(engine.mesh.shape), "dtype": args.dtype}


def _vllm_scorer(args: argparse.Namespace, longest: int):
    from precompute.engines import vllm_engine

    opts = vllm_engine.scoring_options(
        args.teacher, longest, args.top_k, tensor_parallel_size=args.tensor_parallel_size,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, head_dtype="float32" if args.head_fp32 else None,
    )  # fmt: skip
    llm = vllm_engine.make_llm(args.teacher, opts)

    def score_vllm(seqs: list[np.ndarray], ids: list[np.ndarray] | None = None) -> list[Scored]:
        if ids is not None:  # refused in run() before anything was written; a caller that skipped it
            raise PrecomputeError("--engine vllm cannot score arbitrary token ids; use --engine jax")
        rows = vllm_engine.score_sequences(llm, seqs, args.top_k)
        tail = (lambda r: vllm_engine.topk_tail(r["topk_logprobs"])) if args.top_k else (lambda r: None)
        return [Scored(r["logprobs"], r["topk_ids"], r["topk_logprobs"], tail(r)) for r in rows]

    return score_vllm, vllm_engine.engine_info(llm, opts)


# ------------------------------------------------------------------------------------------------ main


def check_teacher(store: str, manifest: dict, teacher: dict, topk: int, store_topk: int, run_args: dict) -> None:
    """Refuse a teacher with another tokenizer, a store half-scored by another teacher or engine / dtype (one
    column must come from one computation), or a top-k mismatch."""
    provenance.check_same_tokenizer(manifest.get("tokenizer"), teacher["tokenizer"], f"store {store}", "teacher")
    if manifest["teacher_committed"] and manifest.get("teacher") != teacher["weights"]:
        raise PrecomputeError(
            f"{store}: {manifest['teacher_committed']} samples are already scored by teacher "
            f"{manifest.get('teacher')}, not this teacher {teacher['weights']}; score into a copy with --out"
        )
    diff = common.first_difference(manifest.get("teacher_args") or {}, run_args)
    if manifest["teacher_committed"] and diff is not None:
        raise PrecomputeError(f"{store}: partly scored with other teacher arguments: teacher_args.{diff}")
    if topk != store_topk:
        raise PrecomputeError(
            f"{store}: the store has top-k columns of width {store_topk}, --top-k is {topk}; "
            "use --out to score into a copy with the top-k you want"
        )


def check_finished(source, shard: shards.Shard) -> None:
    """Refuse, before anything is written, to score a store whose samples are not all committed (its rollouts
    still run, or were killed): its scores would cover part of the data, and a split would miss the rest. Of a
    dataset, the shards this process scores."""
    stores = [source]
    if isinstance(source, RolloutDataset):
        stores = [s for k, s in enumerate(source.stores) if k % shard.count == shard.index]
    for store in stores:
        if (problem := store.incomplete()) is not None:
            raise PrecomputeError(f"--store {problem}; score it once it is finished (nothing was written)")


def check_top_k(args: argparse.Namespace) -> None:
    """--top-k must not exceed the teacher's vocabulary (refused before any copy is made)."""
    with open(os.path.join(args.teacher, "config.json"), encoding="utf-8") as f:
        vocab = int(json.load(f)["vocab_size"])
    if args.top_k > vocab:
        raise PrecomputeError(
            f"--top-k {args.top_k} is larger than the teacher's vocabulary ({vocab} tokens, {args.teacher}); "
            "nothing was written"
        )


def check_positions(args: argparse.Namespace, source) -> None:
    """Every sample fits the teacher's max_position_embeddings (refused before anything is written)."""
    limit = common.max_positions(args.teacher)
    if len(source) and int(source.lengths.max()) > limit:
        i = int(np.argmax(source.lengths))
        raise PrecomputeError(
            f"--store {args.store}: sample {i} has {int(source.lengths[i])} tokens, more than the teacher's "
            f"max_position_embeddings {limit} ({args.teacher}); nothing was written"
        )


def _windows(start: int, end: int, size: int):
    """Fixed windows [w * size, (w + 1) * size) clipped to [start, end): resume re-cuts the same ones."""
    while start < end:
        stop = min((start // size + 1) * size, end)
        yield start, stop
        start = stop


def refuse_vllm_ids(args: argparse.Namespace) -> None:
    """``--engine vllm`` on a store with the rollout policy's top-k: refused before anything is loaded or written
    (vLLM's prompt_logprobs return the teacher's own top-k, not log p_T at given ids)."""
    if args.engine != "vllm":
        return
    try:
        k = RolloutStore.open(args.store).behavior_topk
    except (StoreError, OSError):  # not a readable store: the usual checks below say so
        return
    if k:
        raise PrecomputeError(
            f"{args.store}: has the rollout policy's top-{k} ids (behavior_topk {k}), which need log p_T at "
            "arbitrary token ids; vLLM's prompt_logprobs cannot gather them: score this store with --engine jax"
        )


def topk_scores_record(args: argparse.Namespace, behavior_k: int) -> dict:
    """The manifest's ``teacher_topk_scores``: for each set of ids the teacher scored, K and which ids they are."""
    how = "full logits: logsumexp of the ids not in the set less logsumexp of all (log space)"
    if args.engine == "vllm":
        how = "log1p(-sum of the top-k probabilities) in float64 from vLLM's top-k log-probs; -inf where it rounds to 0"
    out = {}
    if args.top_k:
        out["teacher_topk"] = {"k": args.top_k, "ids": "the teacher's own top-k", "tail": how}
    if behavior_k:
        out["behavior_topk"] = {"k": behavior_k, "ids": "behavior_topk_ids: the rollout policy's raw top-k",
                                "tail": how}  # fmt: skip
    return out


def run(args: argparse.Namespace) -> str:
    """Score every committed sample not yet scored (of this process's shards); returns the summary line."""
    shard = shards.resolve(args.num_shards, args.shard_index)
    refuse_vllm_ids(args)  # first: the store rules vLLM out whether or not it is installed
    common.check_engine(args.engine)
    if args.engine == "vllm":  # refuse an unchecked vLLM before anything is written
        from precompute.engines import vllm_engine

        vllm_engine.require_vllm(head_dtype="float32" if args.head_fp32 else None, dtype=args.dtype)
    common.check_model_dir(args.teacher, "--teacher")
    teacher = {"weights": provenance.fingerprint_weights(args.teacher)}
    teacher["tokenizer"] = provenance.fingerprint_tokenizer(args.teacher)
    source = RolloutStore.open(args.store)  # a store or a dataset (its shards checked to agree)
    provenance.check_same_tokenizer(
        source.manifest.get("tokenizer"), teacher["tokenizer"], f"store {args.store}", "teacher"
    )
    check_finished(source, shard)  # these checks come before plan_units, which creates the --out dataset directory
    check_top_k(args)
    check_positions(args, source)
    units = plan_units(args, source, shard)
    run_args = {"engine": args.engine, "dtype": args.dtype, "top_k": args.top_k}
    if args.head_fp32:  # only when set: stores scored before the option existed still resume
        run_args["head_fp32"] = True
    if isinstance(source, RolloutDataset) and not args.out:  # one teacher per dataset, not only per shard
        check_teacher(args.store, source.manifest, teacher, args.top_k, source.topk, run_args)
    scorer = _LazyScorer(args, int(source.lengths.max()) if len(source) else 1)
    progress = None  # the bar starts after the first store is opened: a refusal before it stays one line
    for target, copy_from, part, base in units:
        if copy_from is not None:
            one = shard.record() if part is not None else None
            copy_store(copy_from, target, args.top_k, part, one)
        progress = score_store(args, target, teacher, run_args, scorer, progress, base)
    targets = units[0][0] if len(units) == 1 else f"{len(units)} shards"
    return progress.summary("teacher_logprobs", store=targets, teacher=teacher["weights"][:19])


class _LazyScorer:
    """The engine, loaded on the first store that has samples to score (one load for all of this process's shards)."""

    def __init__(self, args: argparse.Namespace, longest: int):
        self.args, self.longest, self.made = args, longest, None

    def get(self):
        if self.made is None:
            self.made = make_scorer(self.args, self.longest)
        return self.made


def score_store(args, target: str, teacher: dict, run_args: dict, scorer: _LazyScorer, progress, base: int):
    """Score the samples of one store ``target`` not yet scored, window by window, each window one commit;
    ``base``: the dataset index of its first sample (windows are cut in dataset coordinates). Returns ``progress``
    (created here when None)."""
    writer = RolloutStore.open_for_append(target, flush_tokens=NO_AUTO_FLUSH)
    try:
        check_teacher(target, writer.manifest, teacher, args.top_k, writer.topk, run_args)
    except BaseException:  # refused: give the lock back at once (an in-process caller may go on)
        writer.release()
        raise
    reader = RolloutStore(target)
    done, total = writer.teacher_committed, len(reader)
    progress = progress or common.Progress(0, 0, "teacher")
    progress.bar.total = (progress.bar.total or 0) + total
    progress.bar.update(done)
    if done < total:
        score, info = scorer.get()
        writer.update_manifest(
            teacher=teacher["weights"], teacher_tokenizer=teacher["tokenizer"], teacher_path=args.teacher,
            teacher_engine=info, teacher_versions=common.versions(args.engine), teacher_args=run_args,
        )  # fmt: skip
        if args.top_k or writer.behavior_topk:
            writer.update_manifest(teacher_topk_scores=topk_scores_record(args, writer.behavior_topk))
        for commits, (a, b) in enumerate(_windows(base + done, base + total, args.window), 1):
            a, b = a - base, b - base
            samples = reader.samples(range(a, b))
            tokens = [s["tokens"] for s in samples]
            ids = [s["behavior_topk_ids"] for s in samples] if writer.behavior_topk else None
            scored = score(tokens, ids)
            topk = ([s.topk_ids for s in scored], [s.topk_logprobs for s in scored]) if args.top_k else None
            tail = [s.topk_tail for s in scored] if writer.topk_tail else None
            behavior = ([s.ids_logprobs for s in scored], [s.ids_tail for s in scored]) if ids is not None else None
            writer.write_teacher(a, [s.logprobs for s in scored], topk=topk, topk_tail=tail, behavior=behavior)
            writer.flush()
            progress.update(b - a, sum(len(t) for t in tokens))  # scoring cost: every token is a prefill token
            common.maybe_kill(commits)
    writer.close()
    return progress


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
