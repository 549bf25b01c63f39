"""Token lengths and tokenization speed of the synthetic task, to choose the demo's sequence lengths.

    python -m benchmarks.synthetic_lengths [--n 2000] [--seed 0]

For each difficulty, prints the prompt (chat-templated, with the assistant header) and response
(worked solution + <|im_end|>) token lengths (mean / p50 / p99 / max) and tokens/s of batch tokenization.
Trains nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def _stats(lengths: list[int]) -> str:
    a = np.asarray(lengths)
    return f"mean {a.mean():5.1f}  p50 {np.percentile(a, 50):4.0f}  p99 {np.percentile(a, 99):4.0f}  max {a.max():4d}"


def measure(tokenizer, difficulty: str, n: int, seed: int) -> None:
    from lopd_jax.demo import synthetic as syn  # imported here: it pulls in math-verify, which not every image has

    rng = np.random.default_rng(seed)
    problems = [syn.make_problem(rng, difficulty) for _ in range(n)]
    start = time.perf_counter()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)
        for p in problems
    ]
    template_s = time.perf_counter() - start
    start = time.perf_counter()
    responses = tokenizer([p["solution"] + syn.EOS_TOKEN for p in problems], add_special_tokens=False)["input_ids"]
    encode_s = time.perf_counter() - start
    prompt_lens = [len(x["input_ids"]) for x in prompts]
    response_lens = [len(r) for r in responses]
    total = [a + b for a, b in zip(prompt_lens, response_lens)]
    print(f"[{difficulty}] {syn.DIFFICULTIES[difficulty]}")
    print(f"  prompt   {_stats(prompt_lens)}")
    print(f"  response {_stats(response_lens)}")
    print(f"  total    {_stats(total)}")
    print(
        f"  chat template + encode: {n / template_s:,.0f} prompts/s; "
        f"batch encode of responses: {sum(response_lens) / encode_s:,.0f} tokens/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from lopd_jax.demo import synthetic as syn

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokenizer = syn.build_tokenizer(tmp)
        print(f"build_tokenizer + save: {time.perf_counter() - start:.3f} s, vocab {len(tokenizer)}")
    for difficulty in syn.DIFFICULTIES:
        measure(tokenizer, difficulty, args.n, args.seed)


if __name__ == "__main__":
    main()
