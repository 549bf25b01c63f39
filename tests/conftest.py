"""Test-wide setup: 8 fake CPU devices (for the sharded paths), fp32 matmuls, a persistent compile cache; the
fixtures every directory shares. Plain helpers live in tests/helpers/ (tests/ is on sys.path: pytest inserts the
directory of this rootdir-less conftest.py)."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_cache = os.environ.get("LOPD_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ------------------------------------------------------------------------------------------------ tiny models


@pytest.fixture
def tiny_cfg():
    """lopd_jax's Qwen3Config of ``TINY_QWEN3`` (fp32, XLA attention, scanned layers)."""
    from helpers.models import TINY_QWEN3

    from lopd_jax.models import qwen3

    return qwen3.Qwen3Config(**TINY_QWEN3)
