"""Test-wide setup: 8 fake CPU devices (for the sharded paths), fp32 matmuls, a persistent compile cache."""

import os
import shutil
import subprocess
from pathlib import Path

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
