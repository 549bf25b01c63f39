"""Sample rollouts into a RolloutStore:
``python -m precompute.rollouts --policy HF_DIR --prompts FILE.jsonl --out STORE``.

The prompt set is JSONL, parquet (a file or a directory of shards), a ``datasets`` ``save_to_disk`` directory or a
hub dataset ``org/name[:split]`` (``lopd_jax.data.prompts``; verl's layout is recognised, ``--prompt-key`` /
``--answer-key`` name other columns). Each prompt row (``prompt`` text or chat ``messages``, optional ``answer``) is
chat-templated with the policy's tokenizer (generation prompt added), and ``--n`` continuations are sampled until a
stop token (the tokenizer's and generation config's eos ids) or ``--max-new-tokens``. The store gets the exact
generated ids (the stop token included), finish reason, behaviour log-probs (raw model log-probs of the sampled
tokens), prompt index and answer; the manifest gets the policy / tokenizer / chat-template fingerprints, the
sampling parameters, the engine and versions, and with ``--sft-teacher`` the policy's fingerprint as ``sft_teacher``
(the output is SFT data of it). With ``--record-topk K`` the store also gets the K most likely ids of that raw
policy at every response token and their raw log-probs (``behavior_topk_ids`` / ``behavior_topk_logprobs``,
manifest ``behavior_topk`` = K; the top-k KL objectives score them with the teacher).

Sharded (``--num-shards N --shard-index i``, or the launcher's variables: ``precompute.shards``): the batches of
the global prompt order are split into N contiguous parts and shard i samples part i (batch b keeps its key
fold_in(key(seed), b); vLLM's seeds depend on the prompt index only) into ``--out/shard-0000i-of-0000N``, so the N
shards read as one dataset (``lopd_jax.store.dataset``) are the samples of one process, in its order.

Resumable: the work is cut into a fixed sequence of batches (``--batch-size`` prompts, all their samples), each
sampled (JAX: with the key fold_in(key(seed), b) for batch b; vLLM: in one ``generate`` call of thousands of prompts,
each with its own seed from (seed, prompt index)) and committed on its own, so rerunning the same command after a
crash continues at the first uncommitted batch and the finished store equals an uninterrupted run's. A store made
with different arguments is refused, naming the first differing field.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

from lopd_jax.data import prompts as prompts_lib
from lopd_jax.data.prompts import PromptError
from lopd_jax.store import RolloutStore, provenance
from precompute import common, shards
from precompute.common import PrecomputeError

NO_AUTO_FLUSH = common.NO_AUTO_FLUSH
VLLM_WINDOW_SAMPLES = 4096  # vLLM's default batch: samples per generate call (host memory holds their log-prob dicts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m precompute.rollouts", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="HF model directory of the rollout policy (and tokenizer)")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt set: .jsonl, .parquet (file or directory), a datasets "
        "save_to_disk directory, or a hub dataset org/name[:split]; rows {prompt | messages, answer?}",
    )
    common.add_key_args(p)
    p.add_argument("--out", required=True, help="RolloutStore path or TensorStore kvstore URL")
    p.add_argument("--engine", choices=("jax", "vllm"), default="jax")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped and counted")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="passed to the chat template (Qwen3); unset = the template's default")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per batch (with all their --n samples): one generate call, one commit; default 32 "
                   "(JAX), 4096 // n (vLLM: large windows keep its continuous batching full)")  # fmt: skip
    p.add_argument("--sft-teacher", action="store_true", help="mark the output as SFT data of this policy")
    p.add_argument("--record-topk", type=int, default=0, metavar="K",
                   help="also store the raw policy's K most likely ids and their log-probs at every response token "
                   "(for loss.objective topk_reverse_kl); 0 = off")  # fmt: skip
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights / matmul dtype: JAX default float32 (bfloat16 on GPU/TPU); "
                   "vLLM default auto (the checkpoint's)")  # fmt: skip
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM only")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM only")
    shards.add_shard_args(p)
    args = p.parse_args(argv)
    vllm = args.engine == "vllm"
    if args.dtype == "auto" and not vllm:
        p.error("--dtype auto is for --engine vllm; the JAX engine takes float32, bfloat16 or float16")
    args.dtype = args.dtype or ("auto" if vllm else "float32")
    if args.record_topk < 0:
        p.error(f"--record-topk must be >= 0 (0 = off), got {args.record_topk}")
    for name in ("n", "max_new_tokens", "max_prompt_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ work plan


def encode_prompts(args: argparse.Namespace, tokenizer) -> tuple[list[dict], int, str]:
    """(kept prompts [{index, ids, answer}], skipped count, hash of the prompt set's bytes): prompts longer than
    --max-prompt-len are skipped."""
    read = prompts_lib.read_prompt_rows(args.prompts, args.prompt_key, args.answer_key)
    kept, skipped = [], 0
    for index, (where, row) in enumerate(read.records):
        try:
            ids = prompts_lib.encode_prompt(tokenizer, row, args.chat_template, args.enable_thinking, where)
        except PromptError as e:
            raise PrecomputeError(str(e)) from None
        if len(ids) > args.max_prompt_len:
            skipped += 1
            continue
        kept.append({"index": index, "ids": ids, "answer": row.get("answer"), "where": where})
    return kept, skipped, read.sha256


def load_prompts(args: argparse.Namespace) -> tuple[list[dict], int, tuple[int, ...], str]:
    """(kept prompts, skipped count, stop ids, prompt set hash) for the policy's tokenizer: what the sampler is
    given."""
    tokenizer = prompts_lib.load_tokenizer(args.policy)
    stops = prompts_lib.stop_ids(args.policy, tokenizer)
    kept, skipped, sha = encode_prompts(args, tokenizer)
    return kept, skipped, stops, sha


def run_fields(args: argparse.Namespace, stops: tuple[int, ...], fps: dict, n_prompts: int, skipped: int,
               prompts_sha: str) -> dict:  # fmt: skip
    """Manifest fields of this run; every one must match to resume a store (except versions / times)."""
    sampling = {"n": args.n, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    sampling |= {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "stop_token_ids": list(stops)}
    sampling["logprobs"] = "raw"  # behaviour log-probs are the unprocessed model's (see lopd_jax.inference.sampling)
    if args.record_topk:  # only when set: stores made without it still resume
        sampling["record_topk"] = args.record_topk  # the top-k of that same raw distribution
    fields: dict[str, Any] = {
        "kind": "rollouts",
        "policy": fps["weights"],
        "tokenizer": fps["tokenizer"],
        "chat_template": fps["chat_template"] if args.chat_template else None,
        "sft_teacher": fps["weights"] if args.sft_teacher else None,
        "sampling": sampling,
        "prompts": {"sha256": prompts_sha, "kept": n_prompts, "skipped": skipped},
        "rollout_args": {
            "chat_template": args.chat_template,
            "enable_thinking": args.enable_thinking,
            "max_prompt_len": args.max_prompt_len,
            "prompt_key": args.prompt_key,
            "answer_key": args.answer_key,
            "batch_size": args.batch_size,
            "engine": args.engine,
            "dtype": args.dtype,
        },
    }
    return fields


def check_positions(args: argparse.Namespace, prompts: list[dict]) -> None:
    """Every kept prompt plus --max-new-tokens fits the policy's max_position_embeddings (refused before any store
    is written, naming the longest prompt's line)."""
    limit = common.max_positions(args.policy)
    longest = max(prompts, key=lambda p: len(p["ids"]))
    if len(longest["ids"]) + args.max_new_tokens > limit:
        raise PrecomputeError(
            f"{longest['where']}: a prompt of {len(longest['ids'])} tokens + --max-new-tokens "
            f"{args.max_new_tokens} exceeds the policy's max_position_embeddings {limit}; lower --max-prompt-len "
            f"(longer prompts are skipped) or --max-new-tokens so that they add up to <= {limit} (nothing was written)"
        )


def default_batch_size(args: argparse.Namespace, kept: int, count: int) -> int:
    """--batch-size when not given: 32 prompts (JAX); vLLM: its window, but small enough that every one of the
    ``count`` shards gets a batch (its samples do not depend on the batching, only its commit points do)."""
    if args.engine != "vllm":
        return 32
    if count == 1:
        return max(1, VLLM_WINDOW_SAMPLES // args.n)
    return max(1, min(VLLM_WINDOW_SAMPLES // args.n, -(-kept // count)))


def shard_plan(args: argparse.Namespace, shard: shards.Shard, num_batches: int) -> tuple[int, int]:
    """The global batches [lo, hi) of this shard. More shards than batches is refused by every shard alike (each
    computes the same count), so no shard commits what the others cannot complete."""
    if shard.count > num_batches:
        raise PrecomputeError(
            f"--num-shards {shard.count}: only {num_batches} batches of --batch-size {args.batch_size} prompts, so "
            f"some shards would be empty; use a smaller --batch-size or at most {num_batches} shards (nothing was "
            "written)"
        )
    return shards.split(num_batches, shard)


def open_store(out: str, fields: dict, extra: dict, record_topk: int = 0):
    """Create the store, or reopen it to resume after checking that it was made by the same command (an empty
    store a failed run left is replaced; see ``common.open_or_create``)."""
    create = functools.partial(
        RolloutStore.create,
        out,
        manifest={**fields, **extra},
        behavior_topk=record_topk,
        flush_tokens=NO_AUTO_FLUSH,
    )
    return common.open_or_create(out, fields, create)


# ------------------------------------------------------------------------------------------------ engines


def make_generator(args: argparse.Namespace, stops: tuple[int, ...]):
    """A function (batch index, prompts of the batch) -> store rows, n per prompt in order; and engine info."""
    if args.engine == "vllm":
        return _vllm_generator(args, stops)
    import jax

    from precompute.engines.jax_engine import JaxEngine

    engine = JaxEngine(args.policy, dtype=args.dtype)
    scfg = sampler_config(args, stops)
    base_key = jax.random.key(args.seed)

    def generate(b: int, prompts: list[dict]) -> list[dict]:
        flat = [p for p in prompts for _ in range(args.n)]
        key = jax.random.fold_in(base_key, b)
        outs = engine.generate([p["ids"] for p in flat], scfg, key, batch_size=len(prompts) * args.n)
        return [
            _row(p, o.token_ids, o.logprobs, o.finish_reason, o.topk_ids, o.topk_logprobs) for p, o in zip(flat, outs)
        ]

    info = {"name": "jax", "mesh": dict(engine.mesh.shape), "devices": str(jax.devices()[0].platform)}
    if args.record_topk:  # what the top-k columns hold: lax.top_k of log_softmax(raw logits), K per token
        info["behavior_topk"] = {"k": args.record_topk, "distribution": "raw_logprobs", "entries_per_token": "K"}
    return generate, info


def sampler_config(args: argparse.Namespace, stops: tuple[int, ...]):
    """The JAX sampler's settings: stop at exactly ``stops`` (``prompts.stop_ids``), as online OPD does."""
    from lopd_jax.inference.sampling import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
        stop_token_ids=stops, ignore_eos=True, seed=args.seed, record_topk=args.record_topk,
    )  # fmt: skip


def _vllm_generator(args: argparse.Namespace, stops: tuple[int, ...]):
    from precompute.engines import vllm_engine

    opts = vllm_engine.VllmOptions(
        tensor_parallel_size=args.tensor_parallel_size, max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed, max_model_len=args.max_prompt_len + args.max_new_tokens, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_logprobs=args.record_topk if args.record_topk > vllm_engine.DEFAULT_MAX_LOGPROBS else None,
    )  # fmt: skip
    llm = vllm_engine.make_llm(args.policy, opts)

    def generate(b: int, prompts: list[dict]) -> list[dict]:
        return vllm_engine.generate_rollouts(
            llm, [p["ids"] for p in prompts], [p["index"] for p in prompts], n=args.n,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_new_tokens, seed=args.seed, stop_token_ids=stops,
            answers=[p["answer"] for p in prompts], record_topk=args.record_topk,
        )  # fmt: skip

    info = vllm_engine.engine_info(llm, opts)
    if args.record_topk:
        info["behavior_topk"] = vllm_engine.topk_record(info, args.record_topk)
    return generate, info


def _row(prompt: dict, token_ids, logprobs, finish_reason: str, topk_ids=None, topk_logprobs=None) -> dict:
    row = {
        "tokens": [*prompt["ids"], *(int(t) for t in token_ids)],
        "prompt_length": len(prompt["ids"]),
        "finish_reason": finish_reason,
        "behavior_logprobs": logprobs,
        "prompt_index": prompt["index"],
        "answer": prompt["answer"],
    }
    if topk_ids is not None:
        row |= {"behavior_topk_ids": topk_ids, "behavior_topk_logprobs": topk_logprobs}
    return row


# ------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> str:
    """Sample every batch not yet committed; returns the summary line."""
    shard = shards.resolve(args.num_shards, args.shard_index)
    common.check_engine(args.engine)
    if args.engine == "vllm":  # refuse an unchecked vLLM before anything is written
        from precompute.engines import vllm_engine

        vllm_engine.require_vllm(dtype=args.dtype)
    common.check_model_dir(args.policy, "--policy")
    prompts, skipped, stops, prompts_sha = load_prompts(args)
    if not prompts:  # an empty store would look like a finished run
        raise PrecomputeError(
            f"{args.prompts}: all {skipped} prompts are longer than --max-prompt-len {args.max_prompt_len} tokens "
            "(after the chat template): nothing to sample, no store written"
        )
    check_positions(args, prompts)
    bs = args.batch_size = args.batch_size or default_batch_size(args, len(prompts), shard.count)
    batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
    lo, hi = shard_plan(args, shard, len(batches))
    out = shards.shard_store(args.out, shard)
    mine = sum(len(b) for b in batches[lo:hi]) * args.n  # the samples this shard writes
    fields = run_fields(args, stops, provenance.fingerprint_model(args.policy), len(prompts), skipped, prompts_sha)
    if shard.count > 1:
        fields["shard"] = {**shard.record(), "batches": [lo, hi], "of": len(batches), "expected": mine}
    vocab = _vocab_size(args.policy)
    if args.record_topk > vocab:
        raise PrecomputeError(
            f"--record-topk {args.record_topk} > the policy's vocabulary ({vocab} ids, {args.policy})"
        )
    extra = {"vocab_size": vocab, "policy_path": os.path.abspath(args.policy), "args": vars(args)}
    writer = open_store(out, fields, extra, args.record_topk)
    done = writer.committed
    if done % args.n or (done // args.n) % bs and done != mine:
        raise PrecomputeError(f"{out}: {done} committed samples is not a whole number of batches")
    first = lo + done // args.n // bs
    progress = common.Progress(mine, done, "rollouts")
    if first < hi:
        generate, info = make_generator(args, stops)
        writer.update_manifest(engine=info, versions=common.versions(args.engine))
        for b in range(first, hi):
            rows = generate(b, batches[b])
            writer.append(rows)
            writer.flush()
            progress.update(len(rows), sum(len(r["tokens"]) - r["prompt_length"] for r in rows))
            common.maybe_kill(b - first + 1)
    writer.close()
    return progress.summary("rollouts", skipped=skipped, store=out, committed=writer.committed)


def _vocab_size(model_dir: str) -> int:

    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
