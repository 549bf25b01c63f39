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

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
    for must in ("lopd_jax.train", "lopd_jax.data.batch", "precompute.engines.vllm_engine", "benchmarks.run"):
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


@pytest.mark.slow
def test_every_module_imports_without_torch_and_vllm(tmp_path):
    result = run_child(tmp_path, BLOCKED, module_names())
    assert not result["failed"], "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    assert not result["leaked"], result["leaked"]


@pytest.mark.slow
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
    assert "lopd_jax.inference.sampling" in graph["lopd_jax.inference.evaluation"]  # imported inside a method
    assert "lopd_jax.training.online_opd" in graph["lopd_jax.train"]  # a function-level import
    assert not any(
        m.startswith("lopd_jax.models") for m in graph["lopd_jax.parallel.sharding"]
    )  # sharding knows no model


# ------------------------------------------------------------------------------------------------ the packages

# Which package may import which (the architecture, bottom to top). lopd_jax.losses and lopd_jax.update are the
# functional API researchers compose; lopd_jax.train is the CLI on top of everything; precompute is a client.
BASE = {"lopd_jax.config", "lopd_jax.atomic"}
PACKAGE_LAYERS = {
    "lopd_jax.atomic": set(),
    "lopd_jax.config": set(),
    "lopd_jax.parallel": BASE,
    "lopd_jax.models": BASE | {"lopd_jax.parallel"},
    "lopd_jax.store": BASE,
    "lopd_jax.data": BASE | {"lopd_jax.store"},
    "lopd_jax.inference": BASE | {"lopd_jax.parallel", "lopd_jax.models", "lopd_jax.data"},
    "lopd_jax.losses": BASE | {"lopd_jax.parallel", "lopd_jax.models", "lopd_jax.data"},
    "lopd_jax.update": BASE | {"lopd_jax.parallel", "lopd_jax.models"},
}
PACKAGE_LAYERS["lopd_jax.training"] = set().union(*PACKAGE_LAYERS.values()) | set(PACKAGE_LAYERS)
PACKAGE_LAYERS["lopd_jax.plan"] = PACKAGE_LAYERS["lopd_jax.training"] | {"lopd_jax.training"}
PACKAGE_LAYERS["lopd_jax.demo"] = PACKAGE_LAYERS["lopd_jax.training"] | {"lopd_jax.training"}
PACKAGE_LAYERS["lopd_jax.train"] = PACKAGE_LAYERS["lopd_jax.plan"] | {"lopd_jax.plan", "lopd_jax.demo"}


def package_of(module: str) -> str:
    """``lopd_jax.store.layout`` -> ``lopd_jax.store``; ``precompute.x`` -> ``precompute``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "lopd_jax" and len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, deps in graph.items():
        out.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    return {p: deps - {p} for p, deps in out.items()}


def test_packages_import_only_the_layers_below():
    """The folder layout is the architecture: a package imports only the ones its layer allows; lopd_jax never
    imports precompute or benchmarks. The failure names the package and the import it may not make."""
    graph = package_graph(import_graph())
    lopd = {p for p in graph if p.startswith("lopd_jax.")}
    assert lopd == set(PACKAGE_LAYERS), "a new package or top-level module: give it its layer"
    bad = {p: sorted(graph[p] - PACKAGE_LAYERS[p]) for p in lopd if graph[p] - PACKAGE_LAYERS[p]}
    assert not bad, bad
    assert graph["precompute"] <= lopd and "precompute" not in set().union(*(graph[p] for p in lopd))


def test_the_package_graph_sees_a_forbidden_import():
    toy = {"lopd_jax.store.layout": {"lopd_jax.training.step"}, "lopd_jax.training.step": {"lopd_jax.store.reader"}}
    graph = package_graph(toy)
    assert graph == {"lopd_jax.store": {"lopd_jax.training"}, "lopd_jax.training": {"lopd_jax.store"}}
    assert graph["lopd_jax.store"] - PACKAGE_LAYERS["lopd_jax.store"] == {"lopd_jax.training"}


# ------------------------------------------------------------------------------------------------ the store layers

# Each store module's imports among the store modules: the format at the bottom, the reader and
# the writer on it, the dataset on the reader, the entry point on top; the lock beside the format (its StoreError).
STORE_LAYERS = {
    "lopd_jax.store.layout": set(),
    "lopd_jax.store.lock": {"lopd_jax.store.layout"},
    "lopd_jax.store.reader": {"lopd_jax.store.layout"},
    "lopd_jax.store.writer": {"lopd_jax.store.layout", "lopd_jax.store.lock"},
    "lopd_jax.store.dataset": {"lopd_jax.store.layout", "lopd_jax.store.reader"},
    "lopd_jax.store.rollout_store": {
        "lopd_jax.store.layout",
        "lopd_jax.store.reader",
        "lopd_jax.store.writer",
        "lopd_jax.store.dataset",
    },
    "lopd_jax.store": {  # the package's public names
        "lopd_jax.store.layout",
        "lopd_jax.store.reader",
        "lopd_jax.store.writer",
        "lopd_jax.store.dataset",
        "lopd_jax.store.rollout_store",
    },
    "lopd_jax.store.provenance": set(),  # content fingerprints: beside the format, on nothing
    "precompute.validate": {"lopd_jax.store.layout", "lopd_jax.store.dataset"},
}


def test_the_store_is_in_layers():
    graph = import_graph()
    store_modules = {m for m in graph if m.startswith("lopd_jax.store")}
    assert store_modules == set(STORE_LAYERS) - {"precompute.validate"}, "a new store module: give it its layer"
    for module, allowed in STORE_LAYERS.items():
        assert graph[module] & store_modules == allowed, module
    assert graph["lopd_jax.store.layout"] <= {"lopd_jax.atomic"}, "the format imports nothing else of the project"


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
    toy = "from lopd_jax.store.layout import _x, y\nfrom lopd_jax.store import reader as r\nr._z, r.w, r.__doc__\n"
    got = private_uses("precompute.toy", ROOT / "precompute" / "toy.py", toy, modules)
    assert got == {("lopd_jax.store.layout", "_x"), ("lopd_jax.store.reader", "_z")}
    leaks = {
        (m, used)
        for m, p in modules.items()
        for used in private_uses(m, p, p.read_text(encoding="utf-8"), modules)
        if used[0].startswith("lopd_jax.store")
    }
    assert not leaks, sorted(leaks)
