"""The precompute tests' helpers: a tiny policy / teacher checkpoint, CLI runs (killed or not), store comparisons."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from helpers.models import TINY_TOKENS, tiny_arch
from lopd_jax.demo import synthetic
from lopd_jax.store import RolloutStore
from precompute import common, rollouts

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 8  # the rollouts tests' --max-new-tokens


def build_model(path: Path, seed: int, eos_bias: float = 0.0) -> transformers.Qwen3ForCausalLM:
    """Random 2-layer Qwen3 + the synthetic task's char tokenizer (eos <|im_end|> = 2) saved to ``path``.

    ``eos_bias`` shifts the eos row of the lm_head so that some greedy rollouts stop (0.17 with seed 0: the test
    prompts stop after 3 and 8 tokens, or run to the length limit)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**tiny_arch(**TINY_TOKENS, max_position_embeddings=256, tie_word_embeddings=False))
    model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # peaked distributions: greedy has no near-ties
        for p in model.parameters():
            p.mul_(4.0) if p.ndim > 1 else None
        model.lm_head.weight[2] += eos_bias
    model.save_pretrained(path)
    synthetic.build_tokenizer(path)
    return model


def killed_subprocess(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``python -m module argv`` with the kill hook set to fire after the first commit."""
    import jax

    env = {**os.environ, common.KILL_ENV: "1", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir  # conftest's persistent cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True)


def assert_same_store(a: Path, b: Path) -> None:
    ra, rb = RolloutStore.open(a), RolloutStore.open(b)
    for key in ("committed", "committed_tokens", "teacher_committed", "policy", "teacher", "sampling"):
        assert ra.manifest.get(key) == rb.manifest.get(key), key
    assert ra.arrays.keys() == rb.arrays.keys()
    for name in ra.arrays:
        np.testing.assert_array_equal(ra.arrays[name].read().result(), rb.arrays[name].read().result(), err_msg=name)


def rollouts_argv(env, out: Path, *extra: str, prompts: Path | None = None) -> list[str]:
    argv = ["--policy", str(env["policy"]), "--prompts", str(prompts or env["prompts"]), "--out", str(out)]
    return argv + ["--max-new-tokens", "4", "--max-prompt-len", "64", "--temperature", "0", *extra]


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its bytes: equal snapshots mean nothing was changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def teacher_cli(env, store: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = ["--teacher", str(env["policy"]), "--store", str(store), "--batch-tokens", "64", *extra]
    env_vars = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "precompute.teacher_logprobs", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=300)


def run_rollouts(env, out: str, *extra: str) -> int:
    argv = ["--policy", str(env["policy"]), "--prompts", str(env["prompts"]), "--out", str(env["root"] / out)]
    return rollouts.main(argv + ["--max-new-tokens", str(MAX_NEW), "--max-prompt-len", "64", *extra])
