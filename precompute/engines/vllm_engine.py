"""Thin adapter over vLLM's offline API (``vllm.LLM``) for rollouts and teacher scoring.

vLLM needs an NVIDIA GPU and is not a dependency of CI: it is imported inside the functions that use it, never at
module import. Everything that interprets vLLM's outputs is a pure function over the documented shapes
(``vllm.outputs.RequestOutput`` / ``CompletionOutput``, ``vllm.logprobs.Logprob(logprob, rank, decoded_token)``):

* rollouts: ``LLM.generate([TokensPrompt(prompt_token_ids=...)], SamplingParams(n, temperature, top_p, top_k,
  max_tokens, seed, logprobs=0, stop_token_ids, detokenize=False))``. ``CompletionOutput.logprobs`` is a list (one per
  generated token) of dicts token_id -> Logprob holding at least the sampled token; ``finish_reason`` is "stop" or
  "length"; ``token_ids`` end with the stop token when it stopped on one. vLLM's default ``logprobs_mode``
  ("raw_logprobs") reports log-probs of the unmodified model (temperature 1, before top-p/top-k); pass
  ``logprobs_mode="processed_logprobs"`` for the sampling distribution itself. The mode is recorded in the manifest.
* scoring: ``SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)``. ``RequestOutput.prompt_logprobs``
  is a list as long as the prompt whose entry 0 is None (the first token has no context) and whose entry j is a dict
  token_id -> Logprob of log p(. | tokens[:j]) holding the actual token tokens[j] (any rank) plus the k top-ranked
  tokens (ranks 1..k), so k or k + 1 entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class VllmOptions:
    """Flags of ``vllm.LLM`` that the precompute tools expose."""

    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    logprobs_mode: str | None = None  # None: vLLM's default ("raw_logprobs")


def make_llm(model: str, options: VllmOptions | None = None) -> Any:
    """``vllm.LLM`` for an HF directory, with the options that are set (None means vLLM's default)."""
    import vllm

    kwargs = {k: v for k, v in asdict(options or VllmOptions()).items() if v is not None}
    return vllm.LLM(model=model, tokenizer=model, trust_remote_code=False, **kwargs)


def engine_info(options: VllmOptions) -> dict:
    """Engine name, version and options, for the store manifest."""
    import vllm

    return {"name": "vllm", "version": vllm.__version__, **asdict(options)}


def request_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt seed: a prompt's samples depend on (seed, prompt index) only, not on batching or resumption."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def generate_rollouts(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    prompt_indices: Sequence[int],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    max_tokens: int = 1024,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    answers: Sequence[Any] | None = None,
) -> list[dict]:
    """Sample ``n`` completions per tokenized prompt; returns store rows (see ``completion_to_row``), n per
    prompt in order."""
    from vllm import SamplingParams, TokensPrompt

    common = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, logprobs=0)
    common.update(stop_token_ids=list(stop_token_ids), detokenize=False)
    params = [SamplingParams(seed=request_seed(seed, int(i)), **common) for i in prompt_indices]
    requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    rows = []
    for j, out in enumerate(outputs):
        answer = None if answers is None else answers[j]
        for c in sorted(out.outputs, key=lambda c: c.index):
            rows.append(completion_to_row(c, prompts[j], int(prompt_indices[j]), answer, stop_token_ids))
    return rows


def score_sequences(llm: Any, sequences: Sequence[Sequence[int]], k: int = 0) -> list[dict]:
    """Teacher log-probs of whole sequences (prompt + response) via prompt_logprobs; see
    ``prompt_logprobs_to_rows`` for the returned arrays."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in sequences]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [prompt_logprobs_to_rows(seq, out.prompt_logprobs, k) for seq, out in zip(sequences, outputs)]


def prompt_logprobs_to_rows(prompt_token_ids: Sequence[int], prompt_logprobs: Sequence, k: int) -> dict:
    """vLLM ``prompt_logprobs`` of one sequence -> per-token teacher arrays.

    Returns logprobs [T] f32 (entry j = log p(tokens[j] | tokens[:j]); NaN at j = 0), and with k > 0
    topk_ids [T, k] int32 / topk_logprobs [T, k] f32 ordered by rank (row 0: -1 / NaN)."""
    T = len(prompt_token_ids)
    if prompt_logprobs is None or len(prompt_logprobs) != T or prompt_logprobs[0] is not None:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise ValueError(f"prompt_logprobs must be a list of {T} entries starting with None, got {got}")
    logprobs = np.full(T, np.nan, np.float32)
    topk_ids, topk_lps = np.full((T, k), -1, np.int32), np.full((T, k), np.nan, np.float32)
    for j in range(1, T):
        entry, tok = prompt_logprobs[j], int(prompt_token_ids[j])
        if entry is None or tok not in entry:
            raise ValueError(f"prompt_logprobs[{j}] lacks the actual token {tok}")
        logprobs[j] = entry[tok].logprob
        if k:
            ranked = sorted(entry.items(), key=lambda kv: (_rank(kv[1]), -kv[1].logprob, kv[0]))[:k]
            if len(ranked) < k:
                raise ValueError(f"prompt_logprobs[{j}] has {len(ranked)} entries, expected >= k={k}")
            topk_ids[j] = [t for t, _ in ranked]
            topk_lps[j] = [lp.logprob for _, lp in ranked]
    return {"logprobs": logprobs, "topk_ids": topk_ids, "topk_logprobs": topk_lps}


def _rank(lp: Any) -> float:
    return float("inf") if lp.rank is None else lp.rank


def completion_to_row(
    completion: Any,
    prompt_token_ids: Sequence[int],
    prompt_index: int,
    answer: Any = None,
    stop_token_ids: Sequence[int] = (),
) -> dict:
    """vLLM ``CompletionOutput`` (token_ids, logprobs, finish_reason) -> a store row for ``RolloutWriter.append``:
    tokens [P + R] int32 (prompt + the exact generated ids), prompt_length, finish_reason, behavior_logprobs
    [R] f32 (log-prob of each sampled token), prompt_index, answer."""
    ids = [int(t) for t in completion.token_ids]
    where = f"prompt {prompt_index}, completion {completion.index}"
    if completion.finish_reason not in FINISH_REASONS:
        raise ValueError(f"{where}: finish_reason {completion.finish_reason!r} (request aborted?)")
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise ValueError(f"{where}: need one logprobs dict per generated token (SamplingParams(logprobs=0))")
    stops = {int(t) for t in stop_token_ids}
    if stops and completion.finish_reason == "stop" and (not ids or ids[-1] not in stops):
        raise ValueError(
            f"{where}: finished with 'stop' but its last token {ids[-1:]} is not a stop token {sorted(stops)}"
        )
    lps = np.empty(len(ids), np.float32)
    for j, (tok, entry) in enumerate(zip(ids, completion.logprobs)):
        if tok not in entry:
            raise ValueError(f"{where}: logprobs[{j}] lacks the sampled token {tok}")
        lps[j] = entry[tok].logprob
    return {
        "tokens": np.asarray([*prompt_token_ids, *ids], np.int32),
        "prompt_length": len(prompt_token_ids),
        "finish_reason": completion.finish_reason,
        "behavior_logprobs": lps,
        "prompt_index": prompt_index,
        "answer": answer,
    }
