"""Rollout sampling side by side: the JAX engine (``lopd_jax.inference.sampling.generate``) vs
``transformers.generate``.

Same weights (ours saved with ``qwen3.save_hf`` and loaded by transformers), same prompts (``n`` copies of
equal-length random prompts, so transformers needs no padding), greedy decoding of ``max_new`` tokens with no
stop token on both sides. The tokens must be identical; tokens/s = generated tokens / wall-clock of the whole
call (prefill + decode; JAX compiled beforehand). Runs alternate (jax, torch, jax, torch, ...) per batch size so
both sides see the same machine load. torch is imported inside the functions that use it.

    python -m benchmarks.sampling_bench [--batches 1 32 256] [--new 40] [--prompt 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks.vs_torch import torch_model
from lopd_jax.inference import sampling
from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Qwen3Config


def _prompts(cfg: Qwen3Config, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[batch, length] random token ids (rows differ, so a batch is not one row repeated)."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)


def jax_greedy(params: Any, cfg: Qwen3Config, prompts: np.ndarray, max_new: int) -> np.ndarray:
    """[B, max_new] greedy continuations from the JAX engine (one batch of B rows)."""
    scfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    outs = sampling.generate(params, cfg, [list(p) for p in prompts], scfg, batch_size=len(prompts))
    return np.stack([o.token_ids for o in outs])


def torch_greedy(model: Any, prompts: np.ndarray, max_new: int) -> np.ndarray:
    """[B, max_new] greedy continuations from ``transformers.generate`` (KV cache, no stop token)."""
    import torch

    with torch.inference_mode():
        ids = torch.from_numpy(prompts.astype(np.int64))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def bench_batch(params, cfgs: dict[str, Qwen3Config], model, batch: int, prompt_len: int, max_new: int, rounds: int):
    """One batch size: identical-token check, then ``rounds`` alternating timed calls per side. ``cfgs`` maps a
    label to the JAX engine's model forms (the first is the row's; the others are timed in the same rounds)."""
    prompts = _prompts(next(iter(cfgs.values())), batch, prompt_len)
    jax_tokens = {k: jax_greedy(params, c, prompts, max_new) for k, c in cfgs.items()}  # compiles
    torch_tokens = torch_greedy(model, prompts, max_new)
    jax_t = {k: [] for k in cfgs}
    torch_t = {n: [] for n in common.torch_thread_counts()}
    for _ in range(rounds):
        for k, c in cfgs.items():
            jax_t[k].append(common.timed(lambda c=c: jax_greedy(params, c, prompts, max_new)))
        for n in torch_t:
            with common.torch_threads(n):
                torch_t[n].append(common.timed(lambda: torch_greedy(model, prompts, max_new)))
    best, by_threads = common.best_of(torch_t)
    torch_s, tokens = by_threads[best], batch * max_new
    forms = {}
    for k in cfgs:
        jax_s = common.spread(jax_t[k])
        forms[k] = {
            "identical_tokens": bool(np.array_equal(jax_tokens[k], torch_tokens)),
            "mismatched_rows": int(np.sum(np.any(jax_tokens[k] != torch_tokens, axis=1))),
            "jax_s": jax_s,
            "jax_tokens_per_s": tokens / jax_s["median"],
            "speedup": common.ratio(torch_s, jax_s),
        }
    first = next(iter(cfgs))
    return {
        "batch": batch,
        **forms[first],
        "torch_s": torch_s,
        "torch_threads": int(best),
        "torch_tokens_per_s": tokens / torch_s["median"],
        "other_forms": {k: v for k, v in forms.items() if k != first},
    }


def bench_sampling(
    cfg: Qwen3Config,
    batches: tuple[int, ...] = (1, 32, 256),
    prompt_len: int = 16,
    max_new: int = 40,
    rounds: int = 3,
    other_forms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The sampling rows: per batch size, tokens/s of both engines and their ratio (see the module doc), for
    ``cfg`` and, timed in the same rounds, for each of ``other_forms`` (label -> Qwen3Config fields)."""
    params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        model = torch_model(cfg, params, tmp).eval()
    cfgs = {common.forms_of(cfg): cfg}
    cfgs |= {k: dataclasses.replace(cfg, **v) for k, v in (other_forms or {}).items()}
    rows = [bench_batch(params, cfgs, model, b, prompt_len, max_new, rounds) for b in batches]
    return {
        "params": qwen3.param_count(cfg),
        "forms": common.forms_of(cfg),
        "prompt_len": prompt_len,
        "max_new_tokens": max_new,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--new", type=int, default=40)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    res = bench_sampling(
        common.DEMO_STUDENT, tuple(args.batches), args.prompt, args.new, args.rounds, common.OTHER_FORMS
    )
    for r in res["rows"]:
        print(
            f"batch {r['batch']:4d}: JAX {r['jax_tokens_per_s']:10,.0f} tok/s, transformers "
            f"{r['torch_tokens_per_s']:10,.0f} tok/s ({r['torch_threads']} thr) = {r['speedup']['median']:.2f}x"
            f"  identical tokens: {r['identical_tokens']}"
        )
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
