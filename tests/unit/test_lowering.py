"""Lowering for the target platforms, on CPU: the model forward and the trainer's own update step, dense and MoE,
on packed rows, lowered (never compiled) for ``cuda`` with the XLA and the cuDNN attention and for ``tpu`` with the
XLA attention; the assertions read the StableHLO.

What must hold on a GPU: the cuDNN variant holds jax's fused-attention custom call, and the bias operand it gets
(jax turns our boolean mask into that bias) is computed from ``segment_ids``, so packed sequences never attend
across a segment boundary. The proof follows the operand's def-use chain through the module (calls, scanned-layer
and micro-batch loops) back to @main's arguments; a mutant whose mask ignores the segments shows the check would
fail. It runs unsharded: on a sharded mesh jax wraps the fused call in a custom-partitioning call and emits it
only when XLA partitions, after lowering. MoE's grouped GEMMs (``moe_impl: auto``) lower as the Pallas-Triton
kernels' custom calls for cuda and as ``chlo.ragged_dot`` for tpu, never as a dense expansion over experts.

Off GPU two probes refuse the cuDNN path, and the tests fake them while tracing, never in the product: the
backend check in ``qwen3`` (``_compile_platform``: the mesh's devices, else ``jax.default_backend()``) and jax's
cuDNN version probe.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo
from jax.extend.mlir import ir

from lopd_jax.data.batch import Batch
from lopd_jax.models import grouped_matmul, hf, qwen3
from lopd_jax.parallel import sharding
from lopd_jax.training import config as config_lib
from lopd_jax.training import step as step_lib
from lopd_jax.training.setup import Setup, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_CONFIG = {"dense": "qwen3_8b_lightning_opd.yaml", "moe": "qwen3_30b_a3b_lightning_opd.yaml"}
ARCH = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
B, T = 8, 32  # B: one row per fake device on the sharded mesh; T even (cuDNN's bias needs it when training)
TARGETS = [("cuda", "xla"), ("cuda", "cudnn"), ("tpu", "xla")]
FUSED = "__cudnn$fmhaScaleBiasSoftmax"  # jax/_src/cudnn/fused_attention_stablehlo.py: (bias, no dropout)
FUSED_BWD = FUSED + "Backward"
RAGGED_DOT = "chlo.ragged_dot"  # what lax.ragged_dot lowers to for cuda and for tpu (a grouped GEMM)
# What a Pallas-Triton kernel lowers to (jax 0.10.2 and 0.11: pallas/triton/pallas_call_registration.py): MoE's
# moe_impl "auto" on cuda.
TRITON = "__gpu$xla.gpu.triton"
CUDNN_VERSION = 91000  # 9.10, what jax's CUDA 12/13 wheels ship; only its lower bounds are checked


# ----------------------------------------------------------------------------------------------------------------
# Building what the trainer builds
# ----------------------------------------------------------------------------------------------------------------


def train_config(tmp_path, kind: str, attention: str, fsdp: int = 8, moe_impl: str = "auto"):
    """The paper's Lightning OPD config of ``kind`` (bf16 compute, remat, fsdp mesh), shrunk to a tiny model."""
    arch = hf.config_to_hf(qwen3.Qwen3Config(**ARCH, **(MOE if kind == "moe" else {})), "float32")
    (tmp_path / "config.json").write_text(json.dumps(arch))
    overrides = [
        "model.init=scratch",
        f"model.config={tmp_path}",
        f"model.attention={attention}",
        f"model.moe_impl={moe_impl}",
        f"mesh.fsdp={fsdp}",
        "mesh.expert=1",  # FSDP lowering (the 30B config itself is expert parallel: test_expert_parallel.py)
        f"train.batch_size={B}",
        f"train.seq_len={T}",
        "train.grad_accum=2",
        "loss.old_policy=behavior",  # every Batch field feeds the step
        "eval.prompts=null",
    ]
    return config_lib.load_config(os.path.join(ROOT, "configs", PAPER_CONFIG[kind]), overrides)


def trainer_step(cfg) -> tuple:
    """(jitted update step, abstract sharded state, batch sharding) exactly as ``train.start`` builds them."""
    devices = jax.devices()[: cfg.mesh.fsdp]
    setup = Setup(model_config(cfg), sharding.make_mesh(cfg.mesh, devices), cfg.mesh.logical_rules(), "")
    built = step_lib.build(setup, **step_lib.settings(cfg))  # what train.start calls
    return built.step, built.abstract_state, setup


def packed_batch() -> Batch:
    """[B, T] rows packing two sequences of different lengths and trailing padding (segment id 0).

    Lowering reads only shapes and dtypes; the values make the arguments those of a real packed step."""
    rng = np.random.default_rng(0)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for r in range(B):
        a, b = 9 + r, 14 - r
        seg[r, :a], seg[r, a : a + b] = 1, 2
        pos[r, :a], pos[r, a : a + b] = np.arange(a), np.arange(b)
    tokens = rng.integers(1, ARCH["vocab_size"], (B, T + 1)).astype(np.int32) * (np.pad(seg, ((0, 0), (0, 1))) > 0)
    mask = (pos >= 3).astype(np.float32) * (seg > 0)
    logprobs = -rng.random((B, T)).astype(np.float32) * mask
    return Batch(tokens[:, :-1], tokens[:, 1:], pos, seg, mask, logprobs, logprobs * 0.9)


@contextlib.contextmanager
def fake_gpu_probes(monkeypatch) -> Iterator[None]:
    """Let the cuDNN path trace on CPU: the project's backend check and jax's cuDNN version probe say "GPU"."""
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        m.setattr(qwen3, "_compile_platform", lambda: "gpu")  # the mesh's devices are CPUs here
        m.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: CUDNN_VERSION)
        yield


def lower(fn, args: tuple, platform: str, attention: str, monkeypatch, kwargs=None) -> jax.stages.Lowered:
    """``fn(*args)`` traced (under the fake probes for cuDNN) and lowered for ``platform``; nothing compiled."""
    probes = fake_gpu_probes(monkeypatch) if attention == "cudnn" else contextlib.nullcontext()
    # jax reuses a traced jaxpr for the same function and arguments, across jit objects; the faked platform probe
    # is not part of that key, and the MoE kernel differs per platform.
    jax.clear_caches()
    with probes, monkeypatch.context() as m:
        # The model's "auto" knobs (scan_layers, matmuls) take the target's forms, as when tracing on it.
        m.setattr(qwen3, "_compile_platform", lambda: "gpu" if platform == "cuda" else platform)
        traced = fn.trace(*args, **(kwargs or {}))
    return traced.lower(lowering_platforms=(platform,))


# ----------------------------------------------------------------------------------------------------------------
# Def-use chains in the lowered module
# ----------------------------------------------------------------------------------------------------------------


def _op_name(op) -> str:
    return op.operation.name  # an OpView's own ``name`` may be something else (a func.func's symbol)


def _func_name(op) -> str:
    return ir.StringAttr(op.attributes["sym_name"]).value


def _terminator_operand(region, i: int):
    return region.blocks[0].operations[len(region.blocks[0].operations) - 1].operands[i]


class DefUse:
    """Which of @main's arguments a value of the lowered module is computed from.

    A backward walk over SSA def-use edges: an op's result comes from its operands; a ``func.call`` result from
    the callee's returned value (entering the callee with the call site pushed, so a helper called from several
    places is followed back to the right caller); a ``stablehlo.while`` value from its initial operand and the
    body's yielded value (the loop carry); an ``optimization_barrier`` result (remat's fence) from its own
    operand; a ``case``/``if`` result from every branch and the branch index. A function argument leads to its
    call site's operand, and @main's arguments are the sources, named by the locations jax gives them
    (``batch.segment_ids``).
    """

    def __init__(self, lowered: jax.stages.Lowered):
        self.module = lowered.compiler_ir("stablehlo")
        self.funcs = {_func_name(op): op for op in self.module.body.operations if _op_name(op) == "func.func"}
        self.callers: dict[str, list] = {}
        self.calls: dict[str, list] = {}  # custom-call target -> ops
        for f in self.funcs.values():
            f.walk(self._index)

    def _index(self, op) -> ir.WalkResult:
        if _op_name(op) == "func.call":
            self.callers.setdefault(ir.FlatSymbolRefAttr(op.attributes["callee"]).value, []).append(op)
        elif _op_name(op) == "stablehlo.custom_call":
            self.calls.setdefault(ir.StringAttr(op.attributes["call_target_name"]).value, []).append(op)
        return ir.WalkResult.ADVANCE

    def slice(self, value) -> tuple[set[str], list]:
        """(names of the @main arguments ``value`` depends on, the ops that compute it)."""
        found: set[str] = set()
        ops = []
        todo, seen = [(value, ())], set()
        while todo:
            v, ctx = todo.pop()
            if (v, ctx) in seen:
                continue
            seen.add((v, ctx))
            if isinstance(v, ir.OpResult):
                ops.append(v.owner)
                todo += self._from_result(v, ctx)
            else:
                todo += self._from_argument(v, ctx, found)
        return found, ops

    def sources(self, value) -> set[str]:
        return self.slice(value)[0]

    def _from_result(self, v, ctx) -> list:
        op, i = v.owner, v.result_number
        if _op_name(op) == "func.call":
            callee = self.funcs[ir.FlatSymbolRefAttr(op.attributes["callee"]).value]
            return [(_terminator_operand(callee.regions[0], i), (*ctx, op))]
        if _op_name(op) == "stablehlo.while":
            return [(op.operands[i], ctx), (_terminator_operand(op.regions[1], i), ctx)]
        if _op_name(op) == "stablehlo.optimization_barrier":
            return [(op.operands[i], ctx)]
        if _op_name(op) in ("stablehlo.case", "stablehlo.if"):
            return [(_terminator_operand(r, i), ctx) for r in op.regions] + [(x, ctx) for x in op.operands]
        return [(x, ctx) for x in op.operands]

    def _from_argument(self, v, ctx, found) -> list:
        parent, i = v.owner.owner, v.arg_number
        if _op_name(parent) == "func.func":
            name = _func_name(parent)
            if name == "main":
                found.add(str(v.location).removeprefix('loc("').removesuffix('")'))
                return []
            if ctx:
                return [(ctx[-1].operands[i], ctx[:-1])]
            return [(call.operands[i], ()) for call in self.callers.get(name, [])]
        if _op_name(parent) == "stablehlo.while":
            return [(parent.operands[i], ctx), (_terminator_operand(parent.regions[1], i), ctx)]
        return [(x, ctx) for x in parent.operands]

    def bias_operands(self, target: str, bias_shape: tuple[int, ...]) -> list:
        """The [B, 1, T, S] bias operand of each ``target`` custom call."""
        out = []
        for op in self.calls.get(target, []):
            biases = [x for x in op.operands if tuple(ir.RankedTensorType(x.type).shape) == bias_shape]
            assert len(biases) == 1, f"{target}: expected one operand of shape {bias_shape}"
            out += biases
        return out

    def compares_pairwise(self, op, arg: str) -> bool:
        """``op`` is an equality test of two values both computed from ``arg`` alone (ids[t] == ids[s])."""
        return (
            _op_name(op) == "stablehlo.compare"
            and "EQ" in str(op.attributes["comparison_direction"])
            and all(self.sources(x) == {arg} for x in op.operands)
        )


def grouped_gemms(lowered: jax.stages.Lowered, platform: str) -> int:
    """The grouped GEMMs of the lowered MoE model: Triton kernels for cuda (moe_impl auto), chlo.ragged_dot for
    tpu; the other form must be absent."""
    text, ragged = lowered.as_text(), op_counts(lowered)[RAGGED_DOT]
    triton = text.count(f"custom_call @{TRITON}(")
    assert (ragged if platform == "cuda" else triton) == 0, (platform, ragged, triton)
    return triton if platform == "cuda" else ragged


def op_counts(lowered: jax.stages.Lowered) -> collections.Counter:
    """How many ops of each name the lowered module holds, every function and region included."""
    counts: collections.Counter = collections.Counter()

    def visit(op) -> ir.WalkResult:
        counts[_op_name(op)] += 1
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------------------


def _check_attention(lowered, attention: str, targets: tuple[str, ...], segment_arg: str, rows: int = B) -> None:
    text = lowered.as_text()
    if attention == "xla":
        assert "__cudnn$" not in text
        return
    graph = DefUse(lowered)
    for target in targets:
        biases = graph.bias_operands(target, (rows, 1, T, T))
        assert biases, f"no {target} custom call in the cuDNN lowering"
        for bias in biases:
            found, ops = graph.slice(bias)
            # Exactly segment_ids: the causal part comes from iota; a mask blind to the segments reaches nothing.
            assert found == {segment_arg}, (target, found)
            # ... and through a pairwise equality of segment ids, not merely some function of them.
            assert any(graph.compares_pairwise(op, segment_arg) for op in ops), f"{target}: no ids[t] == ids[s]"


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("platform,attention", TARGETS)
def test_forward_lowers_for_the_target(tmp_path, monkeypatch, kind, platform, attention):
    cfg = model_config(train_config(tmp_path, kind, attention))
    params = jax.eval_shape(functools.partial(qwen3.init_params, cfg), jax.random.key(0))
    batch = packed_batch()
    fwd = jax.jit(qwen3.forward, static_argnames=("cfg", "return_hidden"))
    kwargs = dict(cfg=cfg, positions=batch.positions, segment_ids=batch.segment_ids)
    lowered = lower(fwd, (params, batch.inputs), platform, attention, monkeypatch, kwargs)
    _check_attention(lowered, attention, (FUSED,), "segment_ids")
    # One scanned body for both layers: gate, up and down of the experts, each one grouped GEMM.
    assert grouped_gemms(lowered, platform) == (3 if kind == "moe" else 0)


@pytest.mark.parametrize("kind", ["dense", pytest.param("moe", marks=pytest.mark.slow)])
@pytest.mark.parametrize("platform,attention", TARGETS)
def test_update_step_lowers_for_the_target(tmp_path, monkeypatch, kind, platform, attention):
    # XLA attention on the paper's 8-way fsdp mesh; cuDNN unsharded (see the module doc).
    cfg = train_config(tmp_path, kind, attention, fsdp=1 if attention == "cudnn" else 8)
    step, abstract, _ = trainer_step(cfg)
    lowered = lower(step, (abstract, packed_batch()), platform, attention, monkeypatch)
    micro_rows = B // cfg.train.grad_accum  # the step runs the model on one micro-batch at a time
    _check_attention(lowered, attention, (FUSED, FUSED_BWD), "batch.segment_ids", micro_rows)
    text = lowered.as_text()
    # Gate, up and down: forward, again in the backward pass (remat full), and the gradients to their input and
    # to their expert weights, all grouped GEMMs.
    assert cfg.model.remat == "full"
    assert grouped_gemms(lowered, platform) == (3 * 4 if kind == "moe" else 0)
    if attention == "xla":
        assert '{"fsdp"}' in text  # the parameters enter sharded, as in training


def dense_expert_operands(lowered: jax.stages.Lowered, cfg) -> set[tuple[int, ...]]:
    """Tensor shapes of the lowered step that expand the (token, expert) assignments over all experts: [A, E * D],
    [A, E, D] (and with the experts' hidden size, or tokens X for assignments A), what XLA:GPU's ragged-dot
    rewrite builds."""
    E, R, D, Fm = MOE["num_experts"], MOE["num_experts_per_tok"], ARCH["hidden_size"], MOE["moe_intermediate_size"]
    X = B // cfg.train.grad_accum * T
    dense = {s for r in (X, X * R) for d in (D, Fm) for s in ((r, E * d), (r, E, d))}
    shapes = {tuple(int(n) for n in m.split("x")[:-1]) for m in re.findall(r"tensor<((?:\d+x)+)", lowered.as_text())}
    return shapes & dense


@pytest.mark.slow
def test_moe_update_step_for_cuda_has_no_dense_expert_operand(tmp_path, monkeypatch):
    cfg = train_config(tmp_path, "moe", "xla", fsdp=1)
    step, abstract, _ = trainer_step(cfg)
    lowered = lower(step, (abstract, packed_batch()), "cuda", "xla", monkeypatch)
    assert grouped_gemms(lowered, "cuda") == 3 * 4 and not dense_expert_operands(lowered, cfg)

    def ragged_dot_as_dense(lhs_AD, rhs_EDF, group_sizes_E):  # XLA:GPU's rewrite: a masked dot over all experts
        E, D, F = rhs_EDF.shape
        ends_E = jnp.cumsum(group_sizes_E)
        rows_A = jnp.arange(lhs_AD.shape[0])[:, None]
        mask_AE = (rows_A >= ends_E - group_sizes_E) & (rows_A < ends_E)
        lhs_AX = (mask_AE[:, :, None] * lhs_AD[:, None, :]).reshape(-1, E * D)
        return lhs_AX @ rhs_EDF.reshape(E * D, F)

    monkeypatch.setitem(grouped_matmul._XLA_IMPLS, "ragged_dot", ragged_dot_as_dense)
    cfg = train_config(tmp_path, "moe", "xla", fsdp=1, moe_impl="ragged_dot")
    step, abstract, _ = trainer_step(cfg)
    assert dense_expert_operands(lower(step, (abstract, packed_batch()), "cuda", "xla", monkeypatch), cfg)


def test_the_segment_check_fails_for_a_mask_blind_to_segments(tmp_path, monkeypatch):
    """The mutant passes cuDNN a causal-only mask: the fused call is there, its bias reaches no argument."""

    def causal_only(q, k, v, mask_BTS):
        return qwen3.attention_cudnn(q, k, v, jnp.broadcast_to(jnp.tri(T, dtype=bool), mask_BTS.shape))

    monkeypatch.setitem(qwen3._ATTENTION, "cudnn", causal_only)
    cfg = train_config(tmp_path, "dense", "cudnn", fsdp=1)
    step, abstract, _ = trainer_step(cfg)
    lowered = lower(step, (abstract, packed_batch()), "cuda", "cudnn", monkeypatch)
    with pytest.raises(AssertionError, match="fmhaScaleBiasSoftmax"):
        _check_attention(lowered, "cudnn", (FUSED, FUSED_BWD), "batch.segment_ids", B // cfg.train.grad_accum)
    graph = DefUse(lowered)
    found = [graph.sources(x) for x in graph.bias_operands(FUSED, (B // cfg.train.grad_accum, 1, T, T))]
    assert found and all(s == set() for s in found)  # the forward and its rematerialisation: constant masks
    # The walk itself does reach the batch: the fused call's query comes from the tokens and the positions.
    for fused in graph.calls[FUSED]:
        assert {"batch.inputs", "batch.positions"} <= graph.sources(fused.operands[0])


def test_sharded_cudnn_lowering_defers_the_fused_call(tmp_path, monkeypatch):
    """On the 8-way mesh the step still lowers; the fused call is behind jax's custom partitioning until XLA
    partitions the module, which is why the segment proof above runs unsharded."""
    step, abstract, _ = trainer_step(train_config(tmp_path, "dense", "cudnn", fsdp=8))
    text = lower(step, (abstract, packed_batch()), "cuda", "cudnn", monkeypatch).as_text()
    assert FUSED in text or "CustomSPMDPartitioning" in text
