"""The trainer tests' tiny run: its architecture, stores, configs and the trainer CLI in a subprocess (the world
fixture that builds them lives in tests/integration/conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import torch
import yaml
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

from helpers.models import TINY_TOKENS, tiny_arch
from lopd_jax import train
from lopd_jax.demo import synthetic
from lopd_jax.store import RolloutStore

ROOT = Path(__file__).resolve().parents[2]
ARCH = tiny_arch(**TINY_TOKENS, tie_word_embeddings=False, initializer_range=0.1, rope_theta=10_000.0)


def save_model(path: Path, seed: int, tok_dir: Path) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(HFQwen3Config(**ARCH)).eval()
    model.save_pretrained(path)
    synthetic.build_tokenizer(path)  # the tokenizer lives beside the weights, as in released checkpoints
    return model


def token_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    """log p(tokens[j] | tokens[:j]) for j >= 1, NaN at j = 0 (the store's convention)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.as_tensor(tokens[1:, None], dtype=torch.long))[:, 0]
    return np.concatenate([[np.nan], lp.numpy()]).astype(np.float32)


def write_store(path: Path, samples: list[dict], manifest: dict, teacher_logprobs=None) -> Path:
    with RolloutStore.create(path, manifest=manifest, chunk_tokens=256) as w:
        w.append(samples)
        w.flush()
        if teacher_logprobs is not None:
            w.write_teacher(0, teacher_logprobs)
    return path


def run_config(world, run_dir: Path, **sections) -> dict:
    cfg = {
        "mode": "sft",
        "model": {"init": str(world["root"] / "student")},
        "data": {"store": str(world["stores"]["sft"]), "seed": 3},
        "train": {"steps": 4, "batch_size": 8, "seq_len": 96, "seed": 0},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "checkpoint": {"every_steps": 2, "async_save": True},
        "logging": {"run_dir": str(run_dir), "progress": False, "tensorboard": True},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cli(cfg_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lopd_jax.train`` in a subprocess with the test's devices, precision and compile cache."""
    cmd = [sys.executable, "-m", "lopd_jax.train", "--config", str(cfg_path), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=train_env(env), capture_output=True, text=True, timeout=600)


def train_env(extra: dict | None = None) -> dict:
    """The child's environment: the test's devices, precision and compile cache."""
    full = dict(os.environ, **(extra or {}))
    full.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    full.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    full.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    return full


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def reproducible(records: list[dict]) -> list[dict]:
    """Metric records without their timings (what a resumed run must reproduce exactly)."""
    return [{k: v for k, v in r.items() if not k.startswith(train.TIMING_PREFIXES)} for r in records]
