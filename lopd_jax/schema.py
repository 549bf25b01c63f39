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


def check_choices(obj: Any) -> None:
    """ValueError naming class, field and choices when a ``Literal``-typed field of dataclass ``obj`` holds a value
    its type does not list."""
    for name, allowed in _choices(type(obj)).items():
        if getattr(obj, name) not in allowed:
            raise ValueError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r}: expected one of {list(allowed)}")


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in fields if typing.get_origin(hints[f.name]) is Literal}
