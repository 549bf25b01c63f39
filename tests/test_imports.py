"""Every module of lopd_jax, precompute and benchmarks imports where torch and vllm are not installed.

torch is a test/benchmark reference and vllm an optional engine: a user's `pip install -e .` has neither, and the
GPU image has no vllm. A module that imports either at module level breaks that user on import, which the test
environment (where both may be installed) would hide. A finder that refuses the import is not enough:
transformers asks importlib.metadata and find_spec whether torch is installed and then imports it, so the child
interpreter gets a site directory of links to every installed distribution except the blocked ones.
"""

from __future__ import annotations

import ast
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


# ------------------------------------------------------------------------------------------------ import graph


def _module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import of ``name`` loads (``a.b.c`` -> the longest prefix that is a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (module level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {_target(a.name, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            # `from pkg import mod` imports the submodule; `from mod import name` imports mod.
            subs = {f"{base}.{a.name}" for a in node.names}
            found |= {sub if sub in modules else _target(base, modules) for sub in subs}
    return found - {None, module}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from X import ...`` (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan): the modules caught in cycles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A readable cycle a -> b -> ... -> a inside a strongly connected component (breadth-first back to start)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_the_import_graph_has_no_cycles():
    """Dependencies point one way (STYLE.md habit 12): a cycle, even through a function-level import, means two
    modules own one concept between them. The failure prints each cycle as a -> b -> a."""
    graph = import_graph()
    cycles = [_one_cycle(graph, c) for c in _components(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle_and_the_graph_sees_function_level_imports():
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _components(toy) == [{"a", "b", "c"}] and _one_cycle(toy, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert "lopd_jax.models.hf" in graph["lopd_jax.models.qwen3"]  # qwen3.load_hf imports hf inside the function
    assert "lopd_jax.online_opd" in graph["lopd_jax.train"]  # a function-level import
    assert not any(m.startswith("lopd_jax.models") for m in graph["lopd_jax.sharding"])  # sharding knows no model


# ------------------------------------------------------------------------------------------------ the store layers

# Each store module's imports among the store modules (issue 13 item 4): the format at the bottom, the reader and
# the writer on it, the dataset on the reader, the entry point on top; the lock beside the format (its StoreError).
STORE_LAYERS = {
    "lopd_jax.store_layout": set(),
    "lopd_jax.store_lock": {"lopd_jax.store_layout"},
    "lopd_jax.store_reader": {"lopd_jax.store_layout"},
    "lopd_jax.store_writer": {"lopd_jax.store_layout", "lopd_jax.store_lock"},
    "lopd_jax.store_dataset": {"lopd_jax.store_layout", "lopd_jax.store_reader"},
    "lopd_jax.store": {
        "lopd_jax.store_layout",
        "lopd_jax.store_reader",
        "lopd_jax.store_writer",
        "lopd_jax.store_dataset",
    },
    "precompute.validate": {"lopd_jax.store_layout", "lopd_jax.store_dataset"},
}


def test_the_store_is_in_layers():
    graph = import_graph()
    store_modules = {m for m in graph if m.startswith("lopd_jax.store")}
    assert store_modules == set(STORE_LAYERS) - {"precompute.validate"}, "a new store module: give it its layer"
    for module, allowed in STORE_LAYERS.items():
        assert graph[module] & store_modules == allowed, module
    assert not graph["lopd_jax.store_layout"], "the format imports nothing of the project"


def private_uses(module: str, path: Path, source: str, modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(module, name) of every private name of another project module that ``source`` imports or reads as an
    attribute (``from m import _x``; ``import m as a`` / ``from pkg import m`` then ``a._x``)."""
    tree, bound, found = ast.parse(source), {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {a.asname: a.name for a in node.names if a.asname and a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{base}.{a.name}"
                elif base in modules and base != module and a.name.startswith("_"):
                    found.add((base, a.name))
    attrs = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)]
    private = [n for n in attrs if n.attr.startswith("_") and not n.attr.startswith("__")]
    return found | {(bound[n.value.id], n.attr) for n in private if n.value.id in bound}


def test_no_private_name_of_the_store_crosses_a_module():
    """The store's layers talk through public names only; the finder must see both ways of reaching in."""
    modules = _module_files()
    toy = "from lopd_jax.store_layout import _x, y\nfrom lopd_jax import store_reader as r\nr._z, r.w, r.__doc__\n"
    got = private_uses("precompute.toy", ROOT / "precompute" / "toy.py", toy, modules)
    assert got == {("lopd_jax.store_layout", "_x"), ("lopd_jax.store_reader", "_z")}
    leaks = {
        (m, used)
        for m, p in modules.items()
        for used in private_uses(m, p, p.read_text(encoding="utf-8"), modules)
        if used[0].startswith("lopd_jax.store")
    }
    assert not leaks, sorted(leaks)
