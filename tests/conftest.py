"""Test-wide setup: 8 fake CPU devices (for the sharded paths), fp32 matmuls, a persistent compile cache."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_cache = os.environ.get("LOPD_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def read_only_view(src: Path, where: Path):
    """``where``: ``src`` read-only; returns an undo callable, or None when none can be made.

    Not root: a chmod-ed copy. Root ignores modes (CI runs as root), so there: a read-only bind mount.
    """
    if os.geteuid() != 0:
        shutil.copytree(src, where)
        for p in [where, *where.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return lambda: [p.chmod(0o755 if p.is_dir() else 0o644) for p in [where, *where.rglob("*")]]
    where.mkdir()
    mount = subprocess.run(["mount", "--bind", str(src), str(where)], capture_output=True)
    if mount.returncode != 0:
        return None
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(where)])
        return None
    return lambda: subprocess.run(["umount", str(where)], check=True)


# ------------------------------------------------------------------------------------------------ tiny models

# The tiny Qwen3 architecture the tests share (transformers' and lopd_jax's Qwen3Config take the same keywords).
# A test that needs another size says only what differs: ``tiny_arch(head_dim=16)``. Importable as
# ``from conftest import tiny_arch`` (pytest puts tests/ on sys.path).
TINY_QWEN3 = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8,
)  # fmt: skip
# Token ids of the tiny HF checkpoints whose tokenizer is the synthetic task's (<|endoftext|> = 0, <|im_end|> = 2).
TINY_TOKENS = dict(eos_token_id=2, bos_token_id=None, pad_token_id=0)


def tiny_arch(**overrides) -> dict:
    """``TINY_QWEN3`` with ``overrides``: keyword arguments for either library's Qwen3Config."""
    return {**TINY_QWEN3, **overrides}


@pytest.fixture
def tiny_cfg():
    """lopd_jax's Qwen3Config of ``TINY_QWEN3`` (fp32, XLA attention, scanned layers)."""
    from lopd_jax.models import qwen3

    return qwen3.Qwen3Config(**TINY_QWEN3)
