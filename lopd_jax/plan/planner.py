"""``python -m lopd_jax.train --config FILE --plan``: will this run fit, before any weight is read.

The plan resolves the config, builds the mesh over ``jax.devices()`` (on a laptop: fake CPU devices via
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), takes the architecture from the preset name or the HF
directory's ``config.json`` (never the weights; ``train_setup.model_config``, as the trainer), and lowers and
compiles the trainer's own update step (``lopd_jax.training.step.build``, the builder the trainer calls) on abstract,
sharded
shapes. It prints the parameter count, the sharding of the largest tensors, and XLA's per-device memory figures of
the compiled step.

Why compile the real step instead of a formula: the step's temporaries (remat policy, gradient-accumulation
buffers, the chunked log-prob scan, the optimizer update) are what decide whether a run fits, and only XLA's buffer
assignment knows them.

Off GPU two ops of a GPU run cannot be compiled faithfully, so the plan compiles the model with other values of two
model-config fields (and says so in its notes), exact equivalents with the same memory profile: ``attention``
cudnn (or splash) -> "blockwise" (``qwen3.attention_blockwise``: rematerialised query blocks, never [B, N, T, S]
scores), and, on XLA:CPU, which expands ``lax.ragged_dot`` through a dense [A, E, D] intermediate, ``moe_impl``
"scan" (``grouped_matmul.grouped_matmul_scan``). Nothing is patched: the step is ``step.build`` of that model config.
The remaining caveat: XLA:CPU fuses differently from XLA:GPU (notably the optimizer update, which it keeps as one
param-sized fp32 temporary), so CPU figures lean high; on a GPU host ``--plan`` compiles the real ops.

``--target NAME`` (``lopd_jax.plan.targets``) compiles for an accelerator that is not here instead: XLA:TPU over a
libtpu
topology, or XLA:GPU through the CUDA plugin from a device description. Then the figures are that compiler's, the
real ops compile (splash or cuDNN attention, native ragged_dot), the budget is the chip's HBM, and a roofline
step-time estimate is added. ``attention: auto`` resolves for the compile platform (``planned_attention``).

The peak is arguments + outputs - donated + temp; mode ``opd`` adds the live teacher's resident weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lopd_jax.models import grouped_matmul, presets, qwen3
from lopd_jax.parallel import sharding
from lopd_jax.plan import collectives, targets
from lopd_jax.training import step as step_lib

if TYPE_CHECKING:
    from lopd_jax.training.config import TrainConfig

GB = 1e9


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: str  # PartitionSpec
    device_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``main`` prints; byte figures are per device."""

    model: str
    mesh: dict[str, int]
    params_total: int
    params_active: int
    largest: list[TensorPlan]
    state_bytes: dict[str, int]  # analytic per-device bytes of params / optimizer state (from the shardings)
    memory: dict[str, int]  # XLA's figures: argument, output, alias, temp, generated_code, peak
    extra_bytes: dict[str, int]  # resident outside the step (the live teacher of mode opd)
    budget_bytes: int
    compile_seconds: float
    notes: list[str]
    attention: str = ""  # the implementation compiled (see planned_attention)
    target: targets.Target | None = None  # --target: compiled by that accelerator's XLA (no hardware)
    roofline: targets.Roofline | None = None  # --target: a step-time ESTIMATE from FLOPs and bytes
    moe: str = ""  # the MoE grouped matmul compiled (grouped_matmul.resolve_moe_impl); "" for a dense model
    experts: int = 0
    moe_layout: str = ""  # where the experts live and how tokens reach them (moe_layout); "" for a dense model
    collectives: collectives.CollectiveBytes | None = None  # per-step bytes per device, from the compiled HLO

    @property
    def total_bytes(self) -> int:
        return self.memory["peak"] + sum(self.extra_bytes.values())

    @property
    def fits(self) -> bool:
        """Whether a run fits: never for moe "scan", a memory stand-in that no run uses (E x the expert FLOPs)."""
        return self.total_bytes <= self.budget_bytes and self.moe != "scan"


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, i.e. device 0's)."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def largest_tensors(params: Any, n: int = 8) -> list[TensorPlan]:
    """The ``n`` largest parameters with their PartitionSpec and per-device shape."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    leaves.sort(key=lambda kv: -math.prod(kv[1].shape))
    return [
        TensorPlan(
            name=jax.tree_util.keystr(path, simple=True, separator="."),
            shape=tuple(x.shape),
            dtype=str(jnp.dtype(x.dtype)),
            spec=str(x.sharding.spec),
            device_shape=tuple(x.sharding.shard_shape(x.shape)),
        )
        for path, x in leaves[:n]
    ]


def memory_figures(compiled: Any) -> dict[str, int]:
    """XLA's per-device figures of a compiled SPMD executable, plus a peak estimate.

    peak: arguments + outputs - aliased (donated) + temp + generated code, i.e. every buffer of the step live at
    once: an upper bound of the buffer assignment's peak. ``xla_peak`` is the backend's own peak figure where it
    reports one (XLA:CPU's leaves temporaries out, so it is shown but never used for the verdict).
    """
    m = compiled.memory_analysis()
    out = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
        "xla_peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


TEACHER_DTYPE = "float32"  # what lopd_jax.train loads the live teacher as (hf.load_hf's default dtype)


def teacher_bytes(run_cfg: TrainConfig, mesh: Mesh, rules: sharding.Rules) -> dict[str, int]:
    """Mode opd keeps the live teacher resident (TEACHER_DTYPE, student's mesh): its per-device weight bytes."""
    from lopd_jax.training import modes
    from lopd_jax.training import setup as train_setup

    if not modes.get(run_cfg.mode).live_teacher or not run_cfg.model.teacher:
        return {}

    knobs = train_setup.runtime_knobs(run_cfg.model, attention="xla", param_dtype=TEACHER_DTYPE)
    tcfg = train_setup.architecture(run_cfg.model.teacher, **knobs)
    return {"teacher_weights": _device_bytes(sharding.abstract_arrays(qwen3.param_specs(tcfg), mesh, rules))}


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


def planned_attention(attention: str, platform: str) -> tuple[str, str | None]:
    """(the attention to compile for ``platform``, a note when it differs from the config's).

    "auto" resolves as the model does on that backend. A fused kernel the platform cannot compile is planned with
    its counterpart: cuDNN on TPU -> splash (both fused, no [B, N, T, S] scores); cuDNN or splash on CPU ->
    "blockwise" (``qwen3.attention_blockwise``: exact, with a fused kernel's memory profile).
    """
    if attention == "auto":
        return qwen3.default_attention(platform), None
    if attention == "cudnn" and platform == "tpu":
        return "splash", "attention=cudnn is GPU-only: planned for TPU with splash attention (its TPU default)"
    native = {"cudnn": "gpu", "splash": "tpu"}.get(attention, platform)
    if native != platform:
        return "blockwise", (
            f"attention={attention} cannot compile on {platform}: planned with an exact blockwise attention "
            f"({qwen3.ATTN_BLOCK} queries at a time, rematerialised) with a fused kernel's memory profile"
        )
    return attention, None


# The plan never runs the executable: skipping LLVM's optimisations cuts XLA:CPU compile time ~40% and leaves the
# HLO passes and buffer assignment (hence every memory figure) unchanged.
_FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """The step ``--plan`` compiles: ``step.build``, the trainer's builder, for the compile platform."""

    setup: step_lib.StepSetup  # model_cfg: the config's, with the planned attention / MoE implementation
    built: step_lib.TrainStep
    platform: str
    target: targets.Target | None
    notes: tuple[str, ...]

    def lower(self, run_cfg: TrainConfig) -> jax.stages.Lowered:
        return self.built.lower(run_cfg.train.batch_size, run_cfg.train.seq_len)


def _accelerator_forms(m: Any) -> dict[str, Any]:
    """The CPU performance knobs left at "auto", as the accelerator resolves them (scanned layers, einsum matmuls,
    dot decode attention): the plan sizes the accelerator run even when it compiles on CPU."""
    forms = {"scan_layers": True, "matmuls": "einsum", "decode_attention": "dot"}
    return {k: v for k, v in forms.items() if getattr(m, k) == "auto"}


def planned_model(run_cfg: TrainConfig, platform: str) -> tuple[qwen3.Qwen3Config, list[str]]:
    """(the model config the plan compiles on ``platform``, notes where it differs from what the config says).

    The attention is ``planned_attention``'s; on XLA:CPU an MoE model runs ``moe_impl="scan"`` (XLA:CPU expands
    ragged_dot densely; the scan has a grouped GEMM's buffers). Both are model-config values, never patches."""
    from lopd_jax.training import (
        setup as train_setup,  # not at module level: benchmarks import this module where grain is absent
    )

    attention, note = planned_attention(run_cfg.model.attention, platform)
    notes = [note] if note else []
    model_cfg = train_setup.model_config(run_cfg, attention=attention, **_accelerator_forms(run_cfg.model))
    if model_cfg.num_experts and platform != "cpu":  # on CPU the scan below stands in for any implementation
        try:
            grouped_matmul.resolve_moe_impl(model_cfg.moe_impl, platform)
        except ValueError as e:
            raise train_setup.ConfigError(f"model.moe_impl: {e}") from None
    if model_cfg.num_experts and platform == "cpu":
        notes.append(
            f"MoE: XLA:{platform.upper()} expands ragged_dot densely; planned with moe_impl=scan, an equivalent "
            "scan over experts (grouped-GEMM buffers)"
        )
        model_cfg = dataclasses.replace(model_cfg, moe_impl="scan")
    return model_cfg, notes


def moe_layout(model_cfg: qwen3.Qwen3Config, mesh: Mesh, platform: str, num_tokens: int) -> str:
    """Where the experts of the compiled step live and how tokens reach them (printed after the "moe:" line)."""
    from lopd_jax.models import expert_parallel

    E = model_cfg.num_experts
    layout = sharding.expert_layout(mesh.abstract_mesh, E, num_tokens)
    if layout is None:
        return "experts split along D by FSDP: each layer gathers every expert's weights"
    where = (
        f"expert parallel: {E // layout.num_shards} whole experts per device over mesh axes {layout.expert_axes} "
        f"({layout.num_shards}), {expert_parallel.dispatch_kind(platform)} all-to-all dispatch"
    )
    impl = grouped_matmul.resolve_moe_impl(model_cfg.moe_impl, platform, model_cfg.pallas_interpret)
    if impl == "padded":
        where += "; padded multiplies the whole worst-case receive buffer: N times a grouped GEMM's expert FLOPs"
    return where


def planned_step(
    run_cfg: TrainConfig, devices: list[jax.Device] | None = None, target: str | None = None
) -> PlannedStep:
    """``run_cfg``'s update step as the trainer builds it (``step.build``) over ``devices`` (default: this machine's,
    or ``target``'s topology) with ``planned_model``'s config."""
    tgt = targets.get_target(target) if target else None
    if tgt is not None:
        devices = targets.topology_devices(tgt)
    platform = tgt.platform if tgt else jax.default_backend()
    model_cfg, notes = planned_model(run_cfg, platform)
    setup = step_lib.StepSetup(model_cfg, sharding.make_mesh(run_cfg.mesh, devices), run_cfg.mesh.logical_rules())
    return PlannedStep(setup, step_lib.build(setup, **step_lib.settings(run_cfg)), platform, tgt, tuple(notes))


def make_plan(run_cfg: TrainConfig, devices: list[jax.Device] | None = None, target: str | None = None) -> Plan:
    """Compile ``run_cfg``'s update step on abstract sharded shapes and collect the figures (see module doc).

    ``target`` (a ``targets.TARGETS`` name) compiles with that accelerator's XLA over its topology's devices.
    """
    planned = planned_step(run_cfg, devices, target)
    platform, tgt, model_cfg, mesh = planned.platform, planned.target, planned.setup.model_cfg, planned.setup.mesh
    state, notes = planned.built.abstract_state, list(planned.notes)
    t0 = time.perf_counter()
    compiled = planned.lower(run_cfg).compile(compiler_options=_FAST_CPU_COMPILE if platform == "cpu" else None)
    seconds = time.perf_counter() - t0
    micro_tokens = run_cfg.train.batch_size // run_cfg.train.grad_accum * run_cfg.train.seq_len
    if platform == "cpu":
        notes.append("figures from XLA:CPU buffer assignment; a GPU compile fuses differently (run --plan there)")
        if model_cfg.num_experts and sharding.expert_layout(mesh.abstract_mesh, model_cfg.num_experts, micro_tokens):
            notes.append(
                "expert parallel on XLA:CPU: the dispatch compiles as a dense all-to-all of worst-case buffers (N x "
                "the ragged all-to-all GPUs and TPUs run), so memory and collective bytes overstate the run; "
                "--target h100 / tpu-* compiles the real dispatch"
            )
    budget = run_cfg.plan.device_memory_gb * GB
    roofline = None
    if tgt is not None:
        budget = tgt.chip.hbm_bytes
        notes.append(f"figures from XLA:{platform.upper()} ({tgt.topology}); budget = the chip's HBM, not plan.*")
        t = run_cfg.train
        state_bytes = _device_bytes(state.params) + _device_bytes(state.opt_state)
        roofline = targets.estimate(
            model_cfg, t.batch_size, t.seq_len, t.grad_accum, tgt.num_chips, tgt.chip, state_bytes
        )
    return Plan(
        model=run_cfg.model.init,
        mesh=dict(mesh.shape),
        params_total=presets.param_count(model_cfg),
        params_active=presets.active_param_count(model_cfg),
        largest=largest_tensors(state.params),
        state_bytes={"params": _device_bytes(state.params), "optimizer": _device_bytes(state.opt_state)},
        memory=memory_figures(compiled),
        extra_bytes=teacher_bytes(run_cfg, mesh, planned.setup.rules),
        budget_bytes=int(budget),
        compile_seconds=seconds,
        notes=notes,
        attention=model_cfg.attention,
        target=tgt,
        roofline=roofline,
        moe=grouped_matmul.resolve_moe_impl(model_cfg.moe_impl, platform) if model_cfg.num_experts else "",
        experts=model_cfg.num_experts,
        moe_layout=moe_layout(model_cfg, mesh, platform, micro_tokens) if model_cfg.num_experts else "",
        collectives=collectives.collective_bytes(compiled.as_text()),
    )


def _gb(n: int) -> str:
    return f"{n / GB:8.2f} GB"


def format_plan(plan: Plan, run_cfg: TrainConfig) -> str:
    """The human-readable plan (what ``main`` prints)."""
    t = run_cfg.train
    where = f"target={plan.target.name} ({plan.target.topology}) " if plan.target else ""
    lines = [
        f"plan: {where}mode={run_cfg.mode} model={plan.model} mesh={plan.mesh} devices={math.prod(plan.mesh.values())}",
        f"  batch {t.batch_size} rows x {t.seq_len} tokens, grad_accum {t.grad_accum} "
        f"(micro-batch {t.batch_size // t.grad_accum} rows), remat={run_cfg.model.remat}, "
        f"dtype={run_cfg.model.dtype}, param_dtype={run_cfg.model.param_dtype}, attention={plan.attention}",
        f"parameters: total {plan.params_total:,} ({plan.params_total / 1e9:.3f} B)",
    ]
    if plan.params_active != plan.params_total:
        lines.append(f"parameters: active {plan.params_active:,} ({plan.params_active / 1e9:.3f} B) per token")
    if plan.moe == "scan":
        lines.append(
            f"moe: scan (a memory stand-in: its expert FLOPs are {plan.experts}x a grouped GEMM's; never a run)"
        )
    elif plan.moe:
        lines.append(f"moe: {plan.moe}")
    if plan.moe_layout:
        lines.append(f"  experts: {plan.moe_layout}")
    lines.append("largest tensors (PartitionSpec -> per-device shape):")
    for x in plan.largest:
        lines.append(f"  {x.name:<16} {str(x.shape):<26} {x.dtype:<8} {x.spec:<44} -> {x.device_shape}")
    lines.append("per-device memory:")
    lines += [f"  state: {k:<24}{_gb(v)}" for k, v in plan.state_bytes.items()]
    labels = {"argument": "arguments (state+batch)", "output": "outputs", "alias": "aliased (donated)"}
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        lines.append(f"  xla:   {labels.get(key, key):<24}{_gb(plan.memory[key])}")
    if plan.memory["xla_peak"]:
        lines.append(f"  xla:   {'peak (backend figure)':<24}{_gb(plan.memory['xla_peak'])}")
    lines.append(f"  xla:   {'peak estimate':<24}{_gb(plan.memory['peak'])}")
    lines += [f"  extra: {k:<24}{_gb(v)}" for k, v in plan.extra_bytes.items()]
    if plan.collectives is not None:
        lines += format_collectives(plan.collectives)
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    if plan.moe == "scan" and plan.total_bytes <= plan.budget_bytes:
        verdict = "memory within budget, NOT A RUNNABLE FIT (moe: scan)"
    lines.append(
        f"total per device: {plan.total_bytes / GB:.2f} GB of {plan.budget_bytes / GB:.0f} GB budget: {verdict}"
    )
    lines += format_topk_store_cost(run_cfg)
    if plan.roofline is not None:
        lines += format_roofline(plan.roofline, plan.target)
    lines.append(f"compile: {plan.compile_seconds:.1f} s")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_collectives(c: collectives.CollectiveBytes) -> list[str]:
    """The per-step collective bytes per device (``lopd_jax.plan.collectives`` says how each kind is counted)."""
    main = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
    shown = [k for k in collectives.KINDS if c.by_kind[k] or k in main]
    parts = ", ".join(f"{k} {c.by_kind[k] / GB:.2f} GB" for k in shown)
    lines = ["collectives per step, per device (compiled HLO; a loop's body counted x its trip count):"]
    lines.append(f"  {parts}; total {c.total / GB:.2f} GB")
    if c.unknown_trip_counts:
        lines.append(f"  ({c.unknown_trip_counts} loops without a known trip count counted once: a lower bound)")
    return lines


def format_topk_store_cost(run_cfg: TrainConfig) -> list[str]:
    """The store bytes a topk_* objective reads: its top-k set's bytes per token (``topk_bytes_per_token``) x the
    tokens of one step (batch rows x seq_len); [] for the sampled-token objective."""
    from lopd_jax.store.layout import topk_bytes_per_token

    source, k = run_cfg.loss.topk_columns, run_cfg.loss.topk
    if not source:
        return []
    per_token = topk_bytes_per_token(k, source)
    tokens = run_cfg.train.batch_size * run_cfg.train.seq_len
    return [
        f"store: loss.objective {run_cfg.loss.objective} reads the {source} top-{k} set: {per_token} bytes per token "
        f"(uncompressed) x {tokens:,} tokens per step = {per_token * tokens / 2**20:.1f} MiB per step"
    ]


def format_roofline(r: targets.Roofline, tgt: targets.Target) -> list[str]:
    c = tgt.chip
    return [
        f"ROOFLINE ESTIMATE (not measured; {c.name}: {c.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{c.hbm_bandwidth / 1e12:.3f} TB/s HBM, {tgt.num_chips} chips):",
        f"  per chip: model {r.model_flops:.3e} FLOPs (6*P*tokens + attention), with remat recompute "
        f"{r.hardware_flops:.3e}; {r.bytes_accessed / GB:.1f} GB HBM traffic (targets.hbm_bytes_per_chip model)",
        f"  step >= {r.step_seconds:.3g} s (compute {r.compute_seconds:.3g} s, memory {r.memory_seconds:.3g} s); "
        f"MFU at that time {100 * r.mfu(c):.1f}%",
    ]


def run(run_cfg: TrainConfig, target: str | None = None) -> Plan:
    """Make, print and return the plan of ``run_cfg`` (for ``target`` when given)."""
    plan = make_plan(run_cfg, target=target)
    print(format_plan(plan, run_cfg), flush=True)
    return plan


def check_inputs(run_cfg: TrainConfig, target: str | None = None) -> None:
    """The plan's inputs, checked before anything compiles: an unknown preset, an unreadable config.json, a mesh
    the devices cannot form or a batch that does not split over it is a ConfigError naming the key (one line,
    exit 2), not a traceback from deep inside tracing. With a target the mesh is built over the target's devices
    (targets.py checks it there), not over this machine's."""
    from lopd_jax.training import setup as train_setup
    from lopd_jax.training.config import ConfigError

    try:
        model_cfg = train_setup.model_config(run_cfg)  # ConfigError naming model.init / model.config itself
    except ConfigError:
        raise
    except (ValueError, OSError, KeyError, TypeError) as e:  # an unreadable or unsupported config.json
        raise ConfigError(f"model.init: {e}") from None
    if target is not None:
        tgt = targets.get_target(target)  # '' or an unknown name: TargetError naming it
        _check_target_mesh(run_cfg, tgt)  # the mesh against the target's devices first: its message names both
        train_setup.check_expert_axis(run_cfg.mesh, model_cfg, tgt.num_chips)
        return
    train_setup.check_expert_axis(run_cfg.mesh, model_cfg, len(jax.devices()))
    mesh = sharding.make_mesh(run_cfg.mesh)
    shards = sharding.batch_shard_count(mesh, run_cfg.mesh.logical_rules())
    micro = run_cfg.train.batch_size // run_cfg.train.grad_accum
    if run_cfg.train.batch_size % shards or micro % shards:
        raise ConfigError(
            f"train.batch_size: {run_cfg.train.batch_size} rows in micro-batches of {micro} do not split over the "
            f"{shards} batch shards of the mesh"
        )


def _check_target_mesh(run_cfg: TrainConfig, tgt: targets.Target) -> None:
    """The config's mesh can be laid over the target's chips (checked before its compiler is loaded)."""
    from lopd_jax.training.config import ConfigError

    m = run_cfg.mesh
    try:
        m.axis_sizes(tgt.num_chips)
    except ValueError as e:
        raise ConfigError(
            f"mesh: the config's mesh (data={m.data}, fsdp={m.fsdp}, tensor={m.tensor}, expert={m.expert}) cannot "
            f"be laid over --target {tgt.name}'s {tgt.num_chips} devices ({str(e).removeprefix('MeshConfig: ')}); "
            f"set mesh sizes whose product is {tgt.num_chips} (e.g. mesh.data=1 mesh.fsdp=-1), or pick a target "
            "with as many devices as the mesh"
        ) from None


def main(run_cfg: TrainConfig, target: str | None = None) -> int:
    """``--plan [--target NAME]``: print the plan of ``run_cfg`` (see module doc); exit status 0 (the plan says
    whether it fits)."""
    check_inputs(run_cfg, target)
    run(run_cfg, target)
    return 0
