"""Plain helpers (builders, constants, reference implementations) that more than one test module uses.

Fixtures live in the conftest.py files; no test module imports another (tests/unit/test_test_layout.py checks it).
``tests/`` is on sys.path (pytest inserts the directory of the rootdir-less tests/conftest.py), so test modules
import these as ``from helpers.models import tiny_arch``.
"""
