"""Thin adapter over vLLM's offline API (``vllm.LLM``) for rollouts and teacher scoring.

vLLM needs an NVIDIA GPU and is not a dependency of CI: it is imported inside the functions that use it, never at
module import. Everything that interprets vLLM's outputs is a pure function over the documented shapes
(``vllm.outputs.RequestOutput`` / ``CompletionOutput``, ``vllm.logprobs.Logprob(logprob, rank, decoded_token)``).

Accepted versions: vLLM >=0.11,<0.34 (the V1 engine only; V0 was removed in 0.11.0). Everything below was read in the
source of 0.11.0, 0.11.2, 0.12, 0.14, 0.17, 0.20, 0.24, 0.25, 0.26, 0.27, 0.28, 0.31 and 0.33; ``check_version``
refuses any other version at start-up, before a store is written.

* rollouts: ``LLM.generate([TokensPrompt(prompt_token_ids=...)], [SamplingParams(n, temperature, top_p, top_k,
  max_tokens, seed, logprobs=0, stop_token_ids, detokenize=False)], use_tqdm=False)``, one SamplingParams per prompt
  (its seed); ``logprobs=K`` with ``--record-topk K`` (``max_logprobs`` raised above 20; see ``topk_record`` for what
  each dict then holds). ``CompletionOutput.logprobs`` is a list (one per generated token) of dicts token_id ->
  Logprob holding at least the sampled token; ``finish_reason`` is "stop" or "length"; ``token_ids`` end with the stop
  token when it stopped on one. The default ``logprobs_mode`` ("raw_logprobs", v1/sample/sampler.py) reports log-probs
  of the unmodified model (temperature 1, before top-p/top-k). vLLM 0.11.0 (v1/core/sched/utils.py ``check_stop``)
  tests the length cap before the stop tokens, so a stop token that is exactly the max_tokens-th is labelled "length";
  0.11.1+ test stop tokens first. ``completion_to_row`` labels it "stop" on every version, as the JAX engine does.
* scoring: ``SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)``. ``RequestOutput.prompt_logprobs``
  is a list as long as the prompt whose entry 0 is None (the first token has no context) and whose entry j is a dict
  token_id -> Logprob of log p(. | tokens[:j]) holding the actual token tokens[j] (any rank) plus the k top-ranked
  tokens (ranks 1..k), so k or k + 1 entries. ``k`` above ``max_logprobs`` (ModelConfig default 20) is rejected by
  vLLM, so ``scoring_options`` raises it; a prompt as long as ``max_model_len`` is rejected (0.33's input
  processor: prompt + 1 output token must fit), so scoring asks for the longest sample + 1; prefix caching is off
  (vllm issue 42019: prompt_logprobs depended on request order with it on).
* fp32 head: ``hf_overrides={"head_dtype": "float32"}`` sets ``ModelConfig.head_dtype``, which the lm_head honours
  for generation models from 0.26.0 (model_executor/layers/logits_processor.py ``_apply_head``); before 0.26 it
  applies to pooling models only (the property falls back to the model dtype), so ``check_version`` refuses it there
  unless the whole model runs in float32.
* what ran: ``LLM.llm_engine`` (the V1 ``LLMEngine``) holds ``model_config`` (dtype as a torch.dtype, head_dtype,
  max_model_len, max_logprobs, logprobs_mode, seed) and ``vllm_config`` (cache_config.gpu_memory_utilization /
  enable_prefix_caching, parallel_config.tensor_parallel_size, scheduler_config.max_num_batched_tokens), read back
  by ``ran_with`` after construction for the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from precompute.common import PrecomputeError

FINISH_REASONS = ("stop", "length")
MIN_VERSION = (0, 11)  # V1 only: 0.11.0 removed the V0 engine (whose log-probs came after temperature / top-p)
MAX_CHECKED = (0, 33)  # the newest minor version this adapter was read against
HEAD_DTYPE_VERSION = (0, 26)  # first version whose lm_head honours head_dtype for generation models
DEFAULT_MAX_LOGPROBS = 20  # vllm.config.ModelConfig.max_logprobs (0.11 .. 0.33)
SUPPORTED = f">={MIN_VERSION[0]}.{MIN_VERSION[1]},<{MAX_CHECKED[0]}.{MAX_CHECKED[1] + 1}"


@dataclass(frozen=True)
class VllmOptions:
    """Flags of ``vllm.LLM`` that the precompute tools expose (None means vLLM's default)."""

    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    logprobs_mode: str | None = None  # None: vLLM's default ("raw_logprobs")
    max_logprobs: int | None = None  # None: vLLM's default (20); scoring top-k above it needs it raised
    enable_prefix_caching: bool | None = None  # scoring turns it off (vllm issue 42019)
    head_dtype: str | None = None  # "float32": the lm_head / logits in fp32 (hf_overrides, vLLM >= 0.26)


def _parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise PrecomputeError(f"vllm: cannot read the installed version {version!r}; this adapter needs {SUPPORTED}")
    return int(m.group(1)), int(m.group(2))


def check_version(
    version: str, env: Mapping[str, str] = os.environ, *, head_dtype: str | None = None, dtype: str = "auto"
) -> None:
    """Refuse, before any store is written, a vLLM this adapter was not checked against, vLLM's V0 engine asked
    for by ``VLLM_USE_V1=0`` (0.11.0 still reads it and fails deep inside; later versions ignore it), and an fp32
    head that the installed vLLM would silently not apply."""
    got = _parse_version(version)
    if not MIN_VERSION <= got <= MAX_CHECKED:
        raise PrecomputeError(f"vllm {version} is installed; this adapter was checked against vllm{SUPPORTED} only")
    v1 = env.get("VLLM_USE_V1")
    if v1 is not None and v1.strip().lstrip("+-").isdigit() and int(v1) == 0:
        raise PrecomputeError(f"VLLM_USE_V1={v1} asks vllm {version} for the V0 engine; the adapter needs V1: unset it")
    if head_dtype not in (None, "float32"):
        raise PrecomputeError(f"vllm: head_dtype {head_dtype!r} is not supported here (only 'float32')")
    if head_dtype and dtype != "float32" and got < HEAD_DTYPE_VERSION:
        need = ".".join(map(str, HEAD_DTYPE_VERSION))
        raise PrecomputeError(
            f"vllm {version} cannot compute a generation model's head in fp32 (needs vllm >= {need}); "
            "upgrade vLLM or run the whole model with --dtype float32"
        )


def require_vllm(*, head_dtype: str | None = None, dtype: str = "auto") -> str:
    """Import vLLM and ``check_version`` it; returns its version. The tools call this first thing."""
    try:
        import vllm
    except ImportError as e:
        raise PrecomputeError(f"--engine vllm: vllm cannot be imported ({e}); pip install 'lopd_jax[vllm]'") from None
    check_version(str(vllm.__version__), head_dtype=head_dtype, dtype=dtype)
    return str(vllm.__version__)


def llm_kwargs(model: str, options: VllmOptions) -> dict:
    """Keyword arguments of ``vllm.LLM``: the options that are set; the head dtype goes in as an hf_override."""
    kwargs = {k: v for k, v in asdict(options).items() if v is not None and k != "head_dtype"}
    if options.head_dtype is not None and options.dtype != "float32":
        kwargs["hf_overrides"] = {"head_dtype": options.head_dtype}
    return {"model": model, "tokenizer": model, "trust_remote_code": False, **kwargs}


def make_llm(model: str, options: VllmOptions | None = None) -> Any:
    """``vllm.LLM`` for an HF directory after ``check_version``; refuses an engine whose head dtype is not the one
    asked for (read back from its config)."""
    import vllm

    options = options or VllmOptions()
    check_version(str(vllm.__version__), head_dtype=options.head_dtype, dtype=options.dtype)
    llm = vllm.LLM(**llm_kwargs(model, options))
    if options.head_dtype is not None and (ran := ran_with(llm)["head_dtype"]) != options.head_dtype:
        raise PrecomputeError(f"vllm {vllm.__version__} ran the head in {ran}, not {options.head_dtype} as asked")
    return llm


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def ran_with(llm: Any) -> dict:
    """The settings the constructed engine actually uses (``dtype="auto"`` resolved, vLLM's defaults filled in)."""
    mc, vc = llm.llm_engine.model_config, llm.llm_engine.vllm_config
    return {
        "dtype": _dtype_name(mc.dtype),
        "head_dtype": _dtype_name(mc.head_dtype),
        "max_model_len": int(mc.max_model_len),
        "max_logprobs": int(mc.max_logprobs),
        "logprobs_mode": str(mc.logprobs_mode),
        "seed": mc.seed,
        "tensor_parallel_size": int(vc.parallel_config.tensor_parallel_size),
        "max_num_batched_tokens": int(vc.scheduler_config.max_num_batched_tokens),
        "gpu_memory_utilization": float(vc.cache_config.gpu_memory_utilization),
        "enable_prefix_caching": bool(vc.cache_config.enable_prefix_caching),
    }


def engine_info(llm: Any, options: VllmOptions) -> dict:
    """For the store manifest: engine name, version, what it ran with (``ran_with``) and what was asked."""
    import vllm

    return {"name": "vllm", "version": str(vllm.__version__), **ran_with(llm), "requested": asdict(options)}


def model_max_len(model_dir: str | os.PathLike) -> int | None:
    """The model's own context length (config.json ``max_position_embeddings``), or None when it has none."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("max_position_embeddings")
    return int(value) if value is not None else None


def scoring_options(model_dir: str | os.PathLike, longest: int, top_k: int, **kwargs: Any) -> VllmOptions:
    """Options for scoring samples of up to ``longest`` tokens with ``top_k`` top log-probs: prefix caching off,
    max_model_len = max(longest + 1, the model's own) (vLLM rejects a prompt as long as max_model_len), and
    max_logprobs raised when top_k exceeds vLLM's default."""
    max_len = max(longest + 1, model_max_len(model_dir) or 0)
    max_logprobs = top_k if top_k > DEFAULT_MAX_LOGPROBS else None
    return VllmOptions(max_model_len=max_len, enable_prefix_caching=False, max_logprobs=max_logprobs, **kwargs)


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
    top_k: int = 0,
    max_tokens: int = 1024,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    answers: Sequence[Any] | None = None,
    record_topk: int = 0,
) -> list[dict]:
    """Sample ``n`` completions per tokenized prompt in one ``generate`` call (pass thousands: vLLM batches them
    continuously); each prompt's SamplingParams carries ``request_seed(seed, index)``, so its samples do not depend
    on the window it is in. ``top_k`` 0 = off. ``record_topk`` K > 0 asks for ``logprobs=K`` and stores the top-K
    of each token's raw distribution. Returns store rows (see ``completion_to_row``), n per prompt in order."""
    from vllm import SamplingParams, TokensPrompt

    common = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, logprobs=record_topk)
    common.update(stop_token_ids=list(stop_token_ids), detokenize=False)
    params = [SamplingParams(seed=request_seed(seed, int(i)), **common) for i in prompt_indices]
    requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    rows = []
    for j, out in enumerate(outputs):
        answer = None if answers is None else answers[j]
        for c in sorted(out.outputs, key=lambda c: c.index):
            row = completion_to_row(c, prompts[j], int(prompt_indices[j]), answer, stop_token_ids, record_topk)
            rows.append(row)
    return rows


def topk_record(info: dict, k: int) -> dict:
    """What a rollout store's behaviour top-k columns hold when vLLM sampled it, for the manifest: K, the
    ``logprobs_mode`` the engine ran with (read back from it, ``ran_with``) and what each token's dict held.

    Read in vLLM 0.11.0's source: ``Sampler.forward`` (v1/sample/sampler.py) computes the returned log-probs as
    ``log_softmax`` of the original logits, before allowed-ids / bad-words / logits processors / penalties /
    temperature / top-k / top-p, when ``logprobs_mode`` is "raw_logprobs" (ModelConfig's default), and
    ``gather_logprobs`` takes ``torch.topk`` of them over the whole vocabulary plus the sampled id; the output
    processor gives the top-K ranks 1..K. So the stored ids are the raw model's top-K, like the JAX engine's. A
    "processed_*" mode gives the top-K of the processed distribution instead, "raw_logits" logits: both refused."""
    mode = info.get("logprobs_mode")
    if mode != "raw_logprobs":
        raise PrecomputeError(
            f"vllm ran with logprobs_mode {mode!r}: --record-topk stores the raw policy's top-k (raw_logprobs)"
        )
    return {"k": k, "distribution": mode, "entries_per_token": "K top-ranked + the sampled token; K kept"}


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


def topk_tail(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum_k p_k) per row of [T, k] top-k log-probs, in float64; -inf where the sum rounds to >= 1 (the tail
    is below what k fp32 log-probs resolve), NaN only where the row is NaN (token 0). vLLM returns no logits, so
    this is the best available; the JAX engine computes the tail from the full logits instead."""
    mass = np.exp(np.asarray(topk_logprobs, np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.where(mass < 1.0, np.log1p(-np.minimum(mass, 1.0)), -np.inf)
    return np.where(np.isnan(mass), np.nan, tail).astype(np.float32)


def _rank(lp: Any) -> float:
    return float("inf") if lp.rank is None else lp.rank


def completion_to_row(
    completion: Any,
    prompt_token_ids: Sequence[int],
    prompt_index: int,
    answer: Any = None,
    stop_token_ids: Sequence[int] = (),
    record_topk: int = 0,
) -> dict:
    """vLLM ``CompletionOutput`` (token_ids, logprobs, finish_reason) -> a store row for ``RolloutWriter.append``:
    tokens [P + R] int32 (prompt + the exact generated ids), prompt_length, finish_reason ("stop" whenever the last
    id is a stop token, whatever vLLM said), behavior_logprobs
    [R] f32 (log-prob of each sampled token), prompt_index, answer; with ``record_topk`` K, behavior_topk_ids [R, K]
    int32 / behavior_topk_logprobs [R, K] f32: the K top-ranked entries of each token's dict (ranks 1..K; the
    sampled token's own entry counts only when it is one of them)."""
    ids = [int(t) for t in completion.token_ids]
    where = f"prompt {prompt_index}, completion {completion.index}"
    if completion.finish_reason not in FINISH_REASONS:
        raise ValueError(f"{where}: finish_reason {completion.finish_reason!r} (request aborted?)")
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise ValueError(f"{where}: need one logprobs dict per generated token (SamplingParams(logprobs=0))")
    stops, finish = {int(t) for t in stop_token_ids}, completion.finish_reason
    if ids and ids[-1] in stops:
        finish = "stop"  # vLLM 0.11.0 says "length" when the stop token is the max_tokens-th; the JAX engine "stop"
    elif stops and finish == "stop":
        last = ids[-1:]
        raise ValueError(f"{where}: finished with 'stop' but its last token {last} is not a stop token {sorted(stops)}")
    lps = np.empty(len(ids), np.float32)
    for j, (tok, entry) in enumerate(zip(ids, completion.logprobs)):
        if tok not in entry:
            raise ValueError(f"{where}: logprobs[{j}] lacks the sampled token {tok}")
        lps[j] = entry[tok].logprob
    row = {
        "tokens": np.asarray([*prompt_token_ids, *ids], np.int32),
        "prompt_length": len(prompt_token_ids),
        "finish_reason": finish,
        "behavior_logprobs": lps,
        "prompt_index": prompt_index,
        "answer": answer,
    }
    if record_topk:
        top_ids, top_lps = np.empty((len(ids), record_topk), np.int32), np.empty((len(ids), record_topk), np.float32)
        for j, entry in enumerate(completion.logprobs):
            top_ids[j], top_lps[j] = _top_ranked(entry, record_topk, f"{where}: logprobs[{j}]")
        row |= {"behavior_topk_ids": top_ids, "behavior_topk_logprobs": top_lps}
    return row


def _top_ranked(entry: Mapping, k: int, where: str) -> tuple[list[int], list[float]]:
    """The k entries of ranks 1..k of one vLLM logprobs dict (token id -> Logprob), by rank.

    vLLM (v1/engine/logprobs.py ``_make_logprob_dict``) gives the top-k ids ranks 1..k and the sampled id its own
    rank (the count of larger log-probs + 1): a sampled id outside the top-k tied with the k-th one also has rank
    k, so ties are broken by log-prob, then id, and every rank 1..k must be present."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and 1 <= lp.rank <= k]
    ranked.sort(key=lambda kv: (kv[1].rank, -kv[1].logprob, kv[0]))
    if sorted({lp.rank for _, lp in ranked}) != list(range(1, k + 1)):
        raise ValueError(f"{where}: expected ranks 1..{k}, got {sorted(lp.rank for lp in entry.values())}")
    return [int(t) for t, _ in ranked[:k]], [float(lp.logprob) for _, lp in ranked[:k]]
