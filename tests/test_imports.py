"""Every module of lopd_jax, precompute and benchmarks imports where torch and vllm are not installed.

torch is a test/benchmark reference and vllm an optional engine: a user's `pip install -e .` has neither, and the
GPU image has no vllm. A module that imports either at module level breaks that user on import, which the test
environment (where both may be installed) would hide. A finder that refuses the import is not enough:
transformers asks importlib.metadata and find_spec whether torch is installed and then imports it, so the child
interpreter gets a site directory of links to every installed distribution except the blocked ones.
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lopd_jax", "precompute", "benchmarks")
BLOCKED = ("torch", "vllm")

_CHILD = """
import importlib, json, sys, traceback
blocked = set(sys.argv[1].split(","))
failed = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - report every failure, SystemExit included
        failed[name] = traceback.format_exc(limit=3)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
print(json.dumps({"failed": failed, "leaked": leaked}))
"""


def module_names() -> list[str]:
    """Every module under the three packages, found from the files (not from what happens to import)."""
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}.")]
    return sorted(names)


def test_module_list_covers_the_tree():
    names = module_names()
    files = {p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert len(names) == len(files), sorted(set(map(str, files)) ^ set(names))
    for must in ("lopd_jax.train", "lopd_jax.batch", "precompute.engines.vllm_engine", "benchmarks.run"):
        assert must in names


def site_without(tmp: Path, blocked: tuple[str, ...]) -> Path:
    """A directory of links to everything in this interpreter's site-packages except the blocked distributions."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "jax").is_dir()))
    pattern = re.compile(rf"^(_?(?:{'|'.join(blocked)})\w*)([-.].*)?$", re.IGNORECASE)
    out = tmp / "site"
    out.mkdir()
    for entry in site.iterdir():
        if not pattern.match(entry.name) and not entry.name.startswith("__editable__"):
            (out / entry.name).symlink_to(entry)
    return out


def run_child(tmp: Path, blocked: tuple[str, ...], modules: list[str]) -> dict:
    """Imports ``modules`` in ``python -S`` over the filtered site directory; {"failed": {...}, "leaked": [...]}."""
    site = site_without(tmp, blocked)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
    cmd = [sys.executable, "-S", "-c", _CHILD, ",".join(blocked), *modules]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_module_imports_without_torch_and_vllm(tmp_path):
    result = run_child(tmp_path, BLOCKED, module_names())
    assert not result["failed"], "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    assert not result["leaked"], result["leaked"]


def test_the_filtered_site_hides_torch_and_keeps_the_rest(tmp_path):
    """The check above would pass vacuously if torch stayed importable, and fail for nothing if jax went too."""
    result = run_child(tmp_path, BLOCKED, ["torch", "jax", "transformers"])
    assert sorted(result["failed"]) == ["torch"], result["failed"]
