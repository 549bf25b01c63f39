"""Teacher scoring throughput: the JAX engine vs transformers (torch) on the same model and sequences; on a GPU
also vLLM when it imports.

Both sides get the same work plan: ``jax_engine.plan_batches`` (sorted by length, right-padded to the same
buckets, the same rows per batch) at the JAX engine's batch size (``JaxEngine.batch_tokens``: capped on CPU), so
the comparison is the model execution, not the batching policy. The torch side is the plain transformers recipe:
``model(input_ids, attention_mask).logits`` -> fp32 log_softmax -> gather, under ``torch.inference_mode``.
Tokens/s counts real (unpadded) tokens.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import common
from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Qwen3Config
from precompute.engines import jax_engine


class TorchScorer:
    """transformers' Qwen3ForCausalLM scoring entry j = log p(tokens[j] | tokens[:j]) (NaN at 0), like JaxEngine."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), trust_remote_code=False
        ).to(device)
        self.model.eval()

    def score(self, samples: Sequence[np.ndarray], batch_tokens: int) -> list[np.ndarray]:
        import torch

        out: list[Any] = [None] * len(samples)
        plan = jax_engine.plan_batches([len(s) for s in samples], batch_tokens)
        with torch.inference_mode():
            for rows, bucket, idx in plan:
                tokens = np.zeros((rows, bucket), np.int64)
                mask = np.zeros((rows, bucket), np.int64)
                for r, i in enumerate(idx):
                    tokens[r, : len(samples[i])] = samples[i]
                    mask[r, : len(samples[i])] = 1
                ids = torch.from_numpy(tokens).to(self.device)
                logits = self.model(input_ids=ids, attention_mask=torch.from_numpy(mask).to(self.device)).logits
                lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
                lp = lp.cpu().numpy()
                for r, i in enumerate(idx):
                    out[i] = np.concatenate([[np.nan], lp[r, : len(samples[i]) - 1]]).astype(np.float32)
        return out


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.nanmax(np.abs(x - y)) for x, y in zip(a, b)))


def save_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` ids (``<i>`` -> i), saved next to a ``save_hf`` checkpoint
    so vLLM can load the directory: vLLM needs a tokenizer, and refuses prompt ids above the tokenizer's largest.
    Random-weight benchmarks score token ids, never text, so the pieces' spelling does not matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<0>", eos_token=f"<{vocab_size - 1}>")
    tok.save_pretrained(out_dir)


def save_model_dir(out_dir: str, cfg: Qwen3Config, params: Any) -> None:
    """What transformers and vLLM load: ``qwen3.save_hf`` (config.json + safetensors) plus a tokenizer."""
    qwen3.save_hf(out_dir, cfg, params, dtype=np.float32)
    save_tokenizer(out_dir, cfg.vocab_size)


def _vllm_side(model_dir: str, samples: list[np.ndarray], rounds: int, timeout_s: float) -> dict[str, Any]:
    """vLLM prompt_logprobs scoring through precompute's adapter, in a child process (vLLM and JAX would both claim
    the GPU's memory in one process), killed after ``timeout_s``; a "skipped" reason when vLLM is not installed,
    too little time is left, or the child fails."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    if timeout_s < 90:
        return {"skipped": f"only {timeout_s:.0f} s of the time budget left for vLLM (start-up alone takes ~60 s)"}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/samples.npz", *samples)
        cmd = [sys.executable, "-m", "benchmarks.precompute_bench", model_dir, f"{tmp}/samples.npz", str(rounds)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"skipped": f"vllm child killed after {timeout_s:.0f} s (the time budget)"}
    if proc.returncode:
        return {"skipped": f"vllm child exited {proc.returncode}: {proc.stderr[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _vllm_child(model_dir: str, samples_file: str, rounds: int) -> None:
    """Child side of _vllm_side: time ``rounds`` scoring passes after a warm-up one, print JSON."""
    from precompute.engines import vllm_engine

    with np.load(samples_file) as f:
        samples = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    # Half the card: the parent process (JAX engine, torch model) holds some of it.
    # The scorer's own options (prefix caching off, room for the longest sample), as precompute.teacher_logprobs uses.
    longest = max(len(s) for s in samples)
    options = vllm_engine.scoring_options(model_dir, longest, top_k=0, dtype="bfloat16", gpu_memory_utilization=0.5)
    llm = vllm_engine.make_llm(model_dir, options)
    vllm_engine.score_sequences(llm, samples)
    times = [common.timed(lambda: vllm_engine.score_sequences(llm, samples)) for _ in range(rounds)]
    print(json.dumps({"s": common.spread(times), "version": common.describe_machine()["versions"]["vllm"]}))


def _alternate(engine, scorer, samples, batch_tokens: int, rounds: int) -> tuple[list[float], dict[int, list[float]]]:
    """``rounds`` x (one JAX pass, then one torch pass per thread count): both sides see the same machine load."""
    threads = common.torch_thread_counts() if scorer is not None else []
    jax_t, torch_t = [], {n: [] for n in threads}
    for _ in range(rounds):
        jax_t.append(common.timed(lambda: engine.score(samples, batch_tokens=batch_tokens)))
        for n in threads:
            with common.torch_threads(n):
                torch_t[n].append(common.timed(lambda: scorer.score(samples, batch_tokens)))
    return jax_t, torch_t


def _torch_fields(torch_t: dict[int, list[float]], n_tokens: int, jax_s: dict, diff: float) -> dict[str, Any]:
    best, by_threads = common.best_of(torch_t)
    torch_s = by_threads[best]
    return {
        "torch_s": torch_s,
        "torch_threads": int(best),
        "torch_s_by_threads": by_threads,
        "torch_tokens_per_s": n_tokens / torch_s["median"],
        "speedup": common.ratio(torch_s, jax_s),
        "max_abs_logprob_diff": diff,
    }


def bench_scoring(
    cfg: Qwen3Config,
    samples: list[np.ndarray],
    rounds: int,
    batch_tokens: int = 4096,
    dtype: str = "float32",
    torch_device: str = "cpu",
    with_vllm: bool = False,
    vllm_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Score ``samples`` with random-weight ``cfg`` through the JAX engine and, where torch imports, transformers
    (``rounds`` timed passes each after one warm-up pass; the JAX warm-up compiles one program per bucket shape and
    is reported separately); vLLM too when ``with_vllm`` and it is installed. A missing torch or vLLM is recorded
    as that side's "skipped" reason, never an error."""
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(3))
    n_tokens = int(sum(len(s) for s in samples))
    no_torch = common.missing("torch")
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(tmp, cfg, params)
        engine = jax_engine.JaxEngine(tmp, dtype=dtype)
        scorer = None if no_torch else TorchScorer(tmp, torch_device, dtype)
        vllm_res = _vllm_side(tmp, samples, rounds, vllm_timeout_s) if with_vllm else None
    batch_tokens = engine.batch_tokens(batch_tokens)  # the plan the engine runs, for the torch side too
    first_s = common.timed(lambda: engine.score(samples, batch_tokens=batch_tokens))
    jax_out = [s.logprobs for s in engine.score(samples, batch_tokens=batch_tokens)]
    torch_out = scorer.score(samples, batch_tokens) if scorer is not None else None  # warm-up + the numbers compared
    jax_t, torch_t = _alternate(engine, scorer, samples, batch_tokens, rounds)
    jax_s = common.spread(jax_t)
    res = {
        "model": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size},
        "params": qwen3.param_count(cfg),
        "dtype": dtype,
        "sequences": len(samples),
        "tokens": n_tokens,
        "batches": len(jax_engine.plan_batches([len(s) for s in samples], batch_tokens)),
        "jax_s": jax_s,
        "jax_tokens_per_s": n_tokens / jax_s["median"],
        "jax_first_pass_s": first_s,
        "forward_flops_per_token": common.forward_flops_per_token(cfg, max(len(s) for s in samples)),
    }
    if scorer is None:
        res["torch"] = {"skipped": f"transformers side: {no_torch}"}
    else:
        res |= _torch_fields(torch_t, n_tokens, jax_s, _max_diff(jax_out, torch_out))
        if torch_device != "cpu":  # hand torch's cached blocks back before anything else runs on the card
            import torch

            del scorer
            torch.cuda.empty_cache()
    if vllm_res is not None:
        res["vllm"] = vllm_res
        if "s" in vllm_res:
            vllm_res["tokens_per_s"] = n_tokens / vllm_res["s"]["median"]
            res["speedup_vs_vllm"] = common.ratio(vllm_res["s"], jax_s)
    return res


if __name__ == "__main__":  # the vLLM child process: MODEL_DIR SAMPLES.npz ROUNDS
    _vllm_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
