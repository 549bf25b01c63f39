"""File-system helpers the tests share."""

import os
import shutil
import subprocess
from pathlib import Path


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
