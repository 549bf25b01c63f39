"""One schema style for the frozen config dataclasses: a choice field is typed ``Literal[...]`` and that type is the
one list of its choices.

``config.load_config`` checks Literal fields while it builds a config from YAML (naming the dotted key); a
dataclass built in Python calls ``check_choices(self)`` in its ``__post_init__`` to get the same check from the
same type, instead of a second hand-written list of allowed strings.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal


def check_choices(obj: Any, section: str | None = None) -> None:
    """ValueError naming ``section.field`` (``section`` defaults to the class name, e.g. ``optimizer`` for the
    config section a class fills), the value and the choices when a ``Literal``-typed field of dataclass ``obj``
    holds a value its type does not list."""
    for name, allowed in _choices(type(obj)).items():
        if getattr(obj, name) not in allowed:
            where = f"{section or type(obj).__name__}.{name}"
            raise ValueError(f"{where} must be one of {list(allowed)}, got {getattr(obj, name)!r}")


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in fields if typing.get_origin(hints[f.name]) is Literal}
