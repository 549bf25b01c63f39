"""Score a RolloutStore with a teacher: ``python -m precompute.teacher_logprobs --teacher HF_DIR --store STORE``.

Writes ``teacher_logprobs`` (entry j = log p_T(tokens[j] | tokens[:j]), NaN on prompt tokens) for every committed
sample, the top-k columns with ``--top-k K``, and the teacher's fingerprint into the manifest. A teacher whose
tokenizer differs from the store's is refused (token ids would mean different text), naming both fingerprints.

``--out STORE2`` first copies the store's samples into a new store (with the top-k columns when asked), so several
teachers can score the same rollouts; without it the store is scored in place (its top-k width is fixed when it is
created, so in-place scoring needs ``--top-k`` equal to the store's).

Resumable: samples are scored in fixed windows of ``--window`` samples, each committed on its own; rerunning the
same command after a crash continues at the first uncommitted window (the copy resumes too).
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

from lopd_jax import provenance
from lopd_jax.store import RESERVED_KEYS, RolloutStore
from precompute import common
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
    return {
        "tokens": s["tokens"],
        "prompt_length": p,
        "finish_reason": s["finish_reason"],
        "behavior_logprobs": None if np.isnan(behavior).all() else behavior,  # SFT data has no behaviour policy
        "prompt_index": s["prompt_index"],
        "answer": s["answer"],
    }


def copy_store(src: str, dst: str, topk: int) -> None:
    """Copy the committed samples of ``src`` into ``dst`` (created with ``topk`` teacher columns, or resumed)."""
    reader = RolloutStore.open(src)
    fields = {**_copyable_fields(reader.manifest), "copied_from": reader.path}
    create = functools.partial(
        RolloutStore.create, dst, fields, topk=topk, flush_tokens=NO_AUTO_FLUSH, **reader.manifest["layout"]
    )
    refusal = f"exists and is not a copy of {src} with these arguments"
    writer = common.open_or_create(dst, {**fields, "topk": topk}, create, refusal)
    for start in range(writer.committed, len(reader), COPY_BLOCK):
        writer.append([_as_row(s) for s in reader.samples(range(start, min(start + COPY_BLOCK, len(reader))))])
        writer.flush()
    writer.close()


# ------------------------------------------------------------------------------------------------ engines


def make_scorer(args: argparse.Namespace, longest: int):
    """(function: token sequences -> list[Scored], engine info for the manifest); ``longest``: the longest sample."""
    if args.engine == "vllm":
        return _vllm_scorer(args, longest)
    from precompute.engines.jax_engine import JaxEngine

    engine = JaxEngine(args.teacher, dtype=args.dtype)

    def score_jax(seqs: list[np.ndarray]) -> list[Scored]:
        return engine.score(seqs, topk=args.top_k, batch_tokens=args.batch_tokens)

    return score_jax, {"name": "jax", "mesh": dict(engine.mesh.shape), "dtype": args.dtype}


def _vllm_scorer(args: argparse.Namespace, longest: int):
    from precompute.engines import vllm_engine

    opts = vllm_engine.scoring_options(
        args.teacher, longest, args.top_k, tensor_parallel_size=args.tensor_parallel_size,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, head_dtype="float32" if args.head_fp32 else None,
    )  # fmt: skip
    llm = vllm_engine.make_llm(args.teacher, opts)

    def score_vllm(seqs: list[np.ndarray]) -> list[Scored]:
        rows = vllm_engine.score_sequences(llm, seqs, args.top_k)
        return [Scored(r["logprobs"], r["topk_ids"], r["topk_logprobs"]) for r in rows]

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


def _windows(start: int, end: int, size: int):
    """Fixed windows [w * size, (w + 1) * size) clipped to [start, end): resume re-cuts the same ones."""
    while start < end:
        stop = min((start // size + 1) * size, end)
        yield start, stop
        start = stop


def run(args: argparse.Namespace) -> str:
    """Score every committed sample not yet scored; returns the summary line."""
    target = args.out or args.store
    common.check_engine(args.engine)
    if args.engine == "vllm":  # refuse an unchecked vLLM before anything is written
        from precompute.engines import vllm_engine

        vllm_engine.require_vllm(head_dtype="float32" if args.head_fp32 else None, dtype=args.dtype)
    common.check_model_dir(args.teacher, "--teacher")
    teacher = {"weights": provenance.fingerprint_weights(args.teacher)}
    teacher["tokenizer"] = provenance.fingerprint_tokenizer(args.teacher)
    provenance.check_same_tokenizer(
        RolloutStore.open(args.store).manifest.get("tokenizer"), teacher["tokenizer"], f"store {args.store}", "teacher"
    )
    if args.out:
        copy_store(args.store, args.out, args.top_k)
    writer = RolloutStore.open_for_append(target, flush_tokens=NO_AUTO_FLUSH)
    run_args = {"engine": args.engine, "dtype": args.dtype, "top_k": args.top_k}
    if args.head_fp32:  # only when set: stores scored before the option existed still resume
        run_args["head_fp32"] = True
    try:
        check_teacher(target, writer.manifest, teacher, args.top_k, writer.topk, run_args)
    except BaseException:  # refused: give the lock back at once (an in-process caller may go on)
        writer.release()
        raise
    reader = RolloutStore.open(target)
    done, total = writer.teacher_committed, len(reader)
    progress = common.Progress(total, done, "teacher")
    if done < total:
        score, info = make_scorer(args, int(reader.lengths.max()))
        writer.update_manifest(
            teacher=teacher["weights"], teacher_tokenizer=teacher["tokenizer"], teacher_path=args.teacher,
            teacher_engine=info, teacher_versions=common.versions(args.engine), teacher_args=run_args,
        )  # fmt: skip
        for commits, (a, b) in enumerate(_windows(done, total, args.window), 1):
            tokens = [s["tokens"] for s in reader.samples(range(a, b))]
            scored = score(tokens)
            topk = ([s.topk_ids for s in scored], [s.topk_logprobs for s in scored]) if args.top_k else None
            writer.write_teacher(a, [s.logprobs for s in scored], topk=topk)
            writer.flush()
            progress.update(b - a, sum(len(t) for t in tokens))  # scoring cost: every token is a prefill token
            common.maybe_kill(commits)
    writer.close()
    return progress.summary("teacher_logprobs", store=target, teacher=teacher["weights"][:19])


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
