"""Per-step collective bytes of a compiled XLA program, read from its HLO text (``compiled.as_text()``).

``--plan`` prints these so that layouts (FSDP only, expert parallel) can be compared by what the compiler actually
emitted. How the bytes are counted, per device and per execution of each collective instruction:

  * all-gather: the gathered result; reduce-scatter: the input before the scatter; all-reduce, all-to-all,
    collective-permute: the input (= the output). I.e. the larger of the instruction's operands (summed) and its
    result (an async ``*-start``'s tuple result less the operands it carries).
  * ragged-all-to-all: the smaller of its input and output buffers. The rows it moves depend on the routing; the
    buffers are sized for the worst case on one side only (a device sends A rows and may receive up to N * A), so
    the smaller buffer is what every device sends and receives on average over the devices, for any routing.
  * An instruction inside a loop counts once per iteration: ``while`` bodies are multiplied by XLA's
    ``known_trip_count`` (XLA:GPU and XLA:CPU annotate the scans over layers and micro-batches with it). XLA:TPU's
    compiled text has no annotation; there the count is read from the loop's condition when it is jax's
    ``counter < N`` (a scan's counter starts at 0 and steps by 1). A loop with neither counts once and is
    reported (``unknown_trip_counts``). Fusions, calls, conditionals (every branch) and async wrappers are followed.

These are bytes a device puts on (or takes off) the interconnect per step, not time: the algorithm (ring, tree)
and link speed decide that.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_REFS = re.compile(r"\b(calls|to_apply|body|branch_computations|condition)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (an array ``f32[8,16]{1,0}`` or a tuple of them); fp8 types count 1 byte."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


@dataclasses.dataclass(frozen=True)
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    args: str  # the text between the opcode's parentheses (a constant's value)
    attrs: str


def _matching(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _parse_instr(line: str) -> _Instr | None:
    head, sep, rest = line.strip().removeprefix("ROOT ").partition(" = ")
    if not sep:
        return None
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    full = "(" + rest
    close = _matching(full, 0)
    args = full[1 : close - 1]
    operands = tuple(re.findall(r"%([\w.\-]+)", args))
    return _Instr(head.lstrip("%"), shape, opcode, operands, args, full[close:])


def _computations(hlo: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        m = _HEADER.match(line.strip())
        if m and " = " not in line.split("(")[0]:
            current = m.group(1)
            comps[current] = []
            entry = current if line.lstrip().startswith("ENTRY") else entry
        elif line.strip() == "}":
            current = None
        elif current is not None and (instr := _parse_instr(line)) is not None:
            comps[current].append(instr)
    return comps, entry


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in KINDS and not opcode.endswith("-done") else None


def _instr_bytes(instr: _Instr, kind: str, sizes: dict[str, int]) -> int:
    operands = [sizes.get(o, 0) for o in instr.operands]
    if kind == "ragged-all-to-all":  # (input, output buffer, offsets and sizes...)
        return min(operands[0], operands[1])
    result = shape_bytes(instr.shape)
    if instr.opcode.endswith("-start") and instr.shape.startswith("("):
        result -= sum(operands)  # an async start's tuple carries its operands beside its results
    return max(sum(operands), result)


@dataclasses.dataclass(frozen=True)
class CollectiveBytes:
    """Bytes per device and step by collective kind (``KINDS``), and how many loops had no known trip count."""

    by_kind: dict[str, int]
    unknown_trip_counts: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def _condition_bound(instrs: list[_Instr]) -> int | None:
    """N of a loop condition ``compare(counter, constant(N)), direction=LT`` (jax's scan / fori_loop), else None."""
    consts = {i.name: int(i.args) for i in instrs if i.opcode == "constant" and i.args.isdigit()}
    for i in instrs:
        if i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2 and i.operands[1] in consts:
            return consts[i.operands[1]]
    return None


def collective_bytes(hlo: str) -> CollectiveBytes:
    """Count the collectives of a compiled module's HLO text (see the module doc for what is counted)."""
    comps, entry = _computations(hlo)
    sizes = {i.name: shape_bytes(i.shape) for instrs in comps.values() for i in instrs}
    unknown = [0]

    @functools.cache
    def walk(name: str) -> tuple[int, ...]:
        totals = [0] * len(KINDS)
        for instr in comps.get(name, ()):
            kind = _kind(instr.opcode)
            if kind is not None:
                totals[KINDS.index(kind)] += _instr_bytes(instr, kind, sizes)
            trips = 1
            if instr.opcode == "while":
                m, cond = _TRIP.search(instr.attrs), re.search(r"condition=%?([\w.\-]+)", instr.attrs)
                bound = int(m.group(1)) if m else _condition_bound(comps.get(cond.group(1), [])) if cond else None
                trips = bound if bound is not None else 1
                unknown[0] += bound is None
            for field, ref in _REFS.findall(instr.attrs):
                if field == "condition":
                    continue
                factor = trips if field == "body" else 1
                for callee in re.findall(r"%?([\w.\-]+)", ref.strip("{}")):
                    totals = [t + factor * c for t, c in zip(totals, walk(callee), strict=True)]
        return tuple(totals)

    return CollectiveBytes(dict(zip(KINDS, walk(entry), strict=True)), unknown[0])
