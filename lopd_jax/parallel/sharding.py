"""Device mesh and the logical-axis rule table: the ONLY place mesh axes are named.

Model code describes every array it owns once, as a ``ParamSpec`` (shape, dtype, logical axis names such as
``embed``, ``heads``, ``batch``, initializer; see ``qwen3.param_specs`` / ``qwen3.cache_specs``). This module maps
the logical names to the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert`` through one rule table, and turns any
tree of specs into ``PartitionSpec`` / ``NamedSharding`` / abstract-array trees. It knows no model: it imports
nothing from ``lopd_jax.models``.

Decisions:
  * Two logical axes of one array that map to the same mesh axis raise (``ShardingRuleError``): such a rule
    table is a configuration bug (a device would hold a diagonal block), never something to paper over.
  * Expert parallelism (``mesh.expert > 1``, see ``expert_parallel_rules``): the expert weights' E dim goes to the
    ``expert`` axis, and the tokens and the dense weights are split over it too (batch -> (data, fsdp, expert),
    embed -> (fsdp, expert)), so the devices that hold different experts also share the dense FSDP and the
    batch, as MaxText composes EP with FSDP. The expert weights name their D dim ``expert_embed`` (fsdp only),
    so that an expert weight never maps two of its dims to the ``expert`` axis.
  * A dimension whose size a mesh axis does not divide is left unsharded along that axis (replicated) instead
    of raising: e.g. Qwen3-30B-A3B has 4 kv heads, and a tensor axis of 8 must still work for everything else.
    For a tuple rule (``batch -> (data, fsdp)``) the longest prefix of mesh axes whose product divides the size
    is kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

# A rule maps a logical axis to None (replicated), one mesh axis, or a tuple of mesh axes (major to minor).
MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_embed": "fsdp",  # D of the expert weights: embed without the expert axis (see the module doc)
    "layers": None,
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One array described once: shape, logical axes (names of the rule table), initializer and dtype.

    A frozen dataclass, not a tuple: jax treats it as a leaf, so a tree of specs maps one-to-one onto the tree
    of arrays it describes (``is_param_spec`` is still the one test, for readers and for ``is_leaf``).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Literal["normal", "ones", "zeros"] = "normal"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec: shape {self.shape} and logical axes {self.axes} differ in rank")


def is_param_spec(x: Any) -> bool:
    """Whether ``x`` is a ``ParamSpec`` leaf of a spec tree (the one test every spec-tree walk uses)."""
    return isinstance(x, ParamSpec)


class ShardingRuleError(ValueError):
    """A rule table that cannot describe a valid sharding (collision, unknown axis)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 meaning "all remaining devices".

    ``rules`` overrides entries of ``DEFAULT_RULES`` as ``((logical, mesh_axes), ...)`` pairs, e.g.
    ``(("embed", None),)`` for pure tensor parallelism without FSDP.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    rules: tuple[tuple[str, Any], ...] = ()

    def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
        """Resolve -1 against ``num_devices``; the product must equal ``num_devices``."""
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"MeshConfig: {num_devices} devices are not divisible by the fixed axes ({known})")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig: axis sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                f"but {num_devices} are available"
            )
        return tuple(sizes)

    def logical_rules(self) -> dict[str, MeshAxes]:
        """DEFAULT_RULES (``expert_parallel_rules`` of them when ``expert`` is not 1) with this config's overrides
        applied (lists from YAML become tuples)."""
        rules = dict(DEFAULT_RULES) if self.expert == 1 else expert_parallel_rules(DEFAULT_RULES)
        for name, axes in self.rules:
            rules[name] = tuple(axes) if isinstance(axes, list) else axes
        return rules


def expert_parallel_rules(rules: Rules) -> dict[str, MeshAxes]:
    """``rules`` for a mesh with an expert axis: the mesh axes of ``expert`` added (minor) to ``batch`` and
    ``embed``, so tokens and dense weights are split over the expert devices too (EP composed with FSDP)."""
    out = dict(rules)
    extra = _as_tuple(rules["expert"])
    for name in ("batch", "embed"):
        axes = _as_tuple(rules[name])
        out[name] = axes + tuple(a for a in extra if a not in axes)
    return out


def mesh_rules(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, MeshAxes]:
    """The default rules for ``mesh``: DEFAULT_RULES, or their ``expert_parallel_rules`` when its expert axis has
    more than one device. For code that finds the mesh at trace time (kernels in a ``shard_map``)."""
    return dict(DEFAULT_RULES) if mesh.shape.get("expert", 1) == 1 else expert_parallel_rules(DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How an MoE block is split over a mesh with an expert axis (``expert_layout``).

    ``expert_axes``: the mesh axes the experts are split over (the all-to-all runs over them); ``token_spec``:
    the PartitionSpec of the [X, D] token rows (the ``batch`` rule's axes); ``weight_spec``: that of a stacked
    [E, D, F] expert weight inside the ``shard_map`` (whole experts, E split over ``expert_axes``).
    """

    expert_axes: tuple[str, ...]
    num_shards: int  # devices along expert_axes: each holds num_experts / num_shards whole experts
    token_spec: PartitionSpec
    weight_spec: PartitionSpec


def expert_layout(mesh: Any, num_experts: int, num_tokens: int) -> ExpertLayout | None:
    """The expert-parallel layout of an MoE block over ``mesh`` (None: no expert axis larger than 1, or no mesh).

    Raises ValueError when the expert axis does not divide ``num_experts`` or the token rows do not split over
    the expert axis (each expert device must own distinct tokens for the dispatch to count each one once).
    """
    if mesh is None or mesh.empty:
        return None
    rules = mesh_rules(mesh)
    axes = tuple(a for a in _as_tuple(rules["expert"]) if mesh.shape[a] > 1)
    if not axes:
        return None
    shards = math.prod(mesh.shape[a] for a in axes)
    if num_experts % shards:
        raise ValueError(f"mesh.expert: {shards} expert devices do not divide the model's {num_experts} experts")
    token_axes = _divisible_prefix(num_tokens, _as_tuple(rules["batch"]), mesh)
    if not set(axes) <= set(token_axes):
        raise ValueError(
            f"expert parallelism: {num_tokens} token rows do not split over the batch axes "
            f"{_as_tuple(rules['batch'])} of mesh {dict(mesh.shape)}"
        )
    token_spec = PartitionSpec(token_axes if len(token_axes) > 1 else token_axes[0], None)
    weight_spec = PartitionSpec(axes if len(axes) > 1 else axes[0], None, None)
    return ExpertLayout(axes, shards, token_spec, weight_spec)


def check_expert_axis(mesh_cfg: MeshConfig, num_devices: int, num_experts: int) -> str | None:
    """Why ``mesh_cfg`` over ``num_devices`` cannot place whole experts per device (None when it can, or the model
    is dense): its expert axis must divide ``num_experts``. ValueError when the axis sizes do not resolve."""
    expert = mesh_cfg.axis_sizes(num_devices)[MESH_AXES.index("expert")]
    if num_experts and expert > 1 and num_experts % expert:
        return f"{expert} devices do not divide the model's {num_experts} experts (each device holds whole experts)"
    return None


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``Mesh`` with axes ("data", "fsdp", "tensor", "expert") over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_cfg.axis_sizes(len(devices))
    try:
        # Topology-aware placement on TPU/GPU (inner axes on the fastest links).
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_no_collision(logical: Sequence[str | None], rules: Rules) -> None:
    owner: dict[str, str] = {}
    for name in logical:
        if name is None:
            continue
        if name not in rules:
            raise ShardingRuleError(f"logical axis {name!r} has no rule (known: {sorted(rules)})")
        for mesh_axis in _as_tuple(rules[name]):
            if mesh_axis not in MESH_AXES:
                raise ShardingRuleError(f"rule {name!r} -> {mesh_axis!r}: unknown mesh axis (known: {MESH_AXES})")
            if mesh_axis in owner:
                raise ShardingRuleError(
                    f"logical axes {owner[mesh_axis]!r} and {name!r} of one array {tuple(logical)} both map to "
                    f"mesh axis {mesh_axis!r}"
                )
            owner[mesh_axis] = name


def _divisible_prefix(size: int, axes: tuple[str, ...], mesh: Mesh) -> tuple[str, ...]:
    kept: list[str] = []
    for axis in axes:
        if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
            break
        kept.append(axis)
    return tuple(kept)


def logical_to_spec(
    logical: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``.

    Args:
      logical: one name (or None) per array dim.
      rules: logical name -> mesh axis / tuple of mesh axes / None.
      shape, mesh: when both are given, a dim the mesh axes do not divide stays unsharded (see module doc).
    Raises:
      ShardingRuleError: two logical axes map to the same mesh axis, or a name has no rule.
    """
    _check_no_collision(logical, rules)
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical)} differ in rank")
    entries = []
    for i, name in enumerate(logical):
        axes = _as_tuple(rules[name]) if name is not None else ()
        if mesh is not None and shape is not None:
            axes = _divisible_prefix(shape[i], axes, mesh)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def logical_sharding(
    mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int] | None = None, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` for an array with the given logical axes (and optional shape)."""
    return NamedSharding(mesh, logical_to_spec(logical, rules, shape=shape, mesh=mesh))


def partition_specs(specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of ``PartitionSpec``, one per ``ParamSpec`` leaf of ``specs`` (handy for snapshots)."""
    return jax.tree.map(
        lambda s: logical_to_spec(s.axes, rules, shape=s.shape, mesh=mesh), specs, is_leaf=is_param_spec
    )


def shardings(specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of ``NamedSharding`` on ``mesh``, one per ``ParamSpec`` leaf of ``specs`` (params, KV cache, ...)."""
    return jax.tree.map(lambda s: logical_sharding(mesh, s.axes, s.shape, rules), specs, is_leaf=is_param_spec)


def abstract_arrays(specs: Any, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of ``jax.ShapeDtypeStruct`` (sharded on ``mesh`` when given): the arrays ``specs`` describe, none
    allocated (restore targets, ``jax.jit(...).lower`` arguments)."""

    def abstract(s: ParamSpec) -> jax.ShapeDtypeStruct:
        sh = logical_sharding(mesh, s.axes, s.shape, rules) if mesh is not None else None
        return jax.ShapeDtypeStruct(s.shape, jax.numpy.dtype(s.dtype), sharding=sh)

    return jax.tree.map(abstract, specs, is_leaf=is_param_spec)


def batch_sharding(mesh: Mesh, rank: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [B, ...] batch array: the leading dim over the ``batch`` rule, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (rank - 1), rules))


def batch_shard_count(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many shards the batch dim is split into; batch sizes should be a multiple of it."""
    return math.prod(mesh.shape[a] for a in _as_tuple(rules["batch"]))


def shard_params(params: Any, shardings: Any) -> Any:
    """Place (or re-place) a params pytree on its shardings; structures must match exactly."""
    return jax.device_put(params, shardings)


def is_sharded(x: jax.Array) -> bool:
    """True when ``x`` is split across devices (not fully replicated)."""
    return not x.sharding.is_fully_replicated
