"""The suite's layout: no test module imports another.

A test module (``test_*.py``) or a ``conftest.py`` imported as a module runs twice under two names, re-registers
its fixtures and tests where it is imported, and ties one module's tests to another's internals (``from conftest
import`` even picks whichever conftest.py pytest loaded last). Shared fixtures live in the conftest.py files, shared
plain helpers in tests/helpers/; this test reads every Python file under tests/ (test modules, conftest files,
helpers) with ``ast`` and fails naming each import of a test module, including the Python a test hands a
subprocess as a string.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# ``import x`` / ``from x import y`` at the start of a line of a string: a script a test runs in a subprocess.
_SCRIPT_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+([\w., \t()]+)|import[ \t]+([\w., \t]+))", re.M
)


def _is_test_module(name: str) -> bool:
    """``name`` (dotted) names a test module or a conftest: ``test_train``, ``tests.unit.test_store``, ``conftest``."""
    return any(part.startswith("test_") or part == "conftest" for part in name.split(".") if part)


def _script_imports(text: str):
    for m in _SCRIPT_IMPORT.finditer(text):
        if m.group(1):
            yield m.group(1)
            yield from (f"{m.group(1)}.{n.strip(' ()')}" for n in m.group(2).split(",") if n.strip(" ()"))
        else:
            yield from (n.split()[0] for n in m.group(3).split(",") if n.strip())


def imported_modules(source: str, filename: str = "<test>") -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``source``: statements anywhere (module level or in a function) and
    import lines of string constants (subprocess scripts). ``from a import b`` gives ``a`` and ``a.b``."""
    out = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}".replace("..", ".")) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out += [(node.lineno, name) for name in _script_imports(node.value)]
    return out


def test_imports_of_test_modules_are_found():
    """The checker itself: each way a test module can be imported is caught, helpers are not."""
    bad = [
        "import test_train",
        "world = __import__('x')\nimport os, test_train as t",
        "from test_precompute_cli import build_model",
        "from conftest import tiny_arch",
        "def f():\n    from test_prompts import model_dir",
        "from tests.unit.test_store import LAYOUT",
        "from tests.unit import test_store",
        "from . import conftest",
        'SCRIPT = """\nimport sys\nfrom tests.unit.test_store import LAYOUT, make_samples\n"""',
    ]
    for source in bad:
        assert any(_is_test_module(name) for _, name in imported_modules(source)), source
    good = [
        "from helpers.models import tiny_arch",
        "import pytest\nfrom lopd_jax.training import setup as train_setup",
        'SCRIPT = """\nimport os, sys\nfrom helpers.store import LAYOUT\nfrom lopd_jax.store import RolloutStore\n"""',
        '"""A docstring that mentions test_train.py and tests/conftest.py."""',
    ]
    for source in good:
        assert not any(_is_test_module(name) for _, name in imported_modules(source)), source


def test_no_test_module_imports_another():
    # This module's own examples above are strings that import test modules: it is the one file not read.
    files = sorted(p for p in TESTS.rglob("*.py") if p != Path(__file__).resolve())
    assert len([p for p in files if p.name.startswith("test_")]) >= 40, files  # the whole suite was read
    offenders = {}
    for path in files:
        for line, name in imported_modules(path.read_text(), str(path)):
            if _is_test_module(name):
                offenders.setdefault(f"{path.relative_to(TESTS.parent)}:{line}", []).append(name)
    report = "\n".join(f"{where}: imports {', '.join(names)}" for where, names in offenders.items())
    assert not offenders, "shared fixtures go to a conftest.py, shared helpers to tests/helpers/:\n" + report
