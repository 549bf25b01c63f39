"""lopd_jax.training.step: the one step builder. The trainer and ``--plan`` lower the same program; the implementations
``--plan`` chooses off GPU are model-config values equal to the ones they stand in for; nothing patches a module.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import TINY_QWEN3

from lopd_jax.demo import synthetic
from lopd_jax.models import hf, qwen3
from lopd_jax.plan import planner as plan
from lopd_jax.store import RolloutStore, provenance
from lopd_jax.training import config as config_lib
from lopd_jax.training import setup as train_setup
from lopd_jax.training import step as step_lib

ROOT = Path(__file__).resolve().parents[2]
ROWS, T = 16, 32
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _sft_config(tmp_path: Path, *overrides: str, **arch) -> config_lib.TrainConfig:
    """A valid SFT run from scratch on 8 fake devices: HF config.json, the synthetic tokenizer, a one-sample store."""
    tok = synthetic.build_tokenizer(tmp_path / "tok")
    cfg = qwen3.Qwen3Config(**{**TINY_QWEN3, "vocab_size": max(len(tok), 128), **arch})
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg, "float32")))
    tokens = np.arange(1, 13, dtype=np.int32)
    manifest = {"tokenizer": provenance.fingerprint_tokenizer(tmp_path / "tok"), "policy": "p", "sft_teacher": "t"}
    with RolloutStore.create(tmp_path / "store", manifest=manifest, chunk_tokens=64) as w:
        w.append([dict(tokens=tokens, prompt_length=4, finish_reason="stop", prompt_index=0, behavior_logprobs=None)])
        w.flush()
    raw = {
        "mode": "sft",
        "model": {"init": "scratch", "config": str(tmp_path), "tokenizer": str(tmp_path / "tok"), "remat": "full"},
        "data": {"store": str(tmp_path / "store")},
        "train": {"batch_size": ROWS, "seq_len": T, "grad_accum": 2},
        "logging": {"run_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    return config_lib.load_config(str(path), list(overrides))


def _trainer_text(cfg: config_lib.TrainConfig) -> str:
    """The StableHLO of the step ``train.start`` builds from the validated setup."""
    setup = train_setup.validated(cfg)  # what lopd_jax.train.main hands to train.start
    return step_lib.build(setup, **step_lib.settings(cfg)).lower(cfg.train.batch_size, cfg.train.seq_len).as_text()


def test_the_trainer_and_plan_lower_the_same_program(tmp_path):
    # The plan compiles the accelerators' forms (scanned, einsum) for "auto"; the trainer asks for them here.
    cfg = _sft_config(tmp_path, "model.scan_layers=true", "model.matmuls=einsum")
    planned = plan.planned_step(cfg)
    assert planned.platform == "cpu" and planned.notes == () and planned.setup.mesh.shape["fsdp"] == 8
    trainer = _trainer_text(cfg)
    assert plan.planned_step(cfg).lower(cfg).as_text() == trainer
    assert '{"fsdp"}' in trainer  # sharded as in training, not a single-device stand-in
    # The comparison can fail: one micro-batch instead of two is another program.
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=1))
    assert plan.planned_step(other).lower(other).as_text() != trainer


def test_plan_of_an_moe_model_on_cpu_differs_only_by_moe_impl(tmp_path):
    cfg = _sft_config(tmp_path, "model.scan_layers=true", "model.matmuls=einsum", **MOE)  # the plan's forms
    planned = plan.planned_step(cfg)
    assert planned.setup.model_cfg.moe_impl == "scan" and "moe_impl=scan" in planned.notes[0]
    setup = train_setup.validated(cfg)
    assert setup.model_cfg.moe_impl == "auto"
    as_planned = dataclasses.replace(setup, model_cfg=dataclasses.replace(setup.model_cfg, moe_impl="scan"))
    want = step_lib.build(as_planned, **step_lib.settings(cfg)).lower(ROWS, T).as_text()
    assert planned.lower(cfg).as_text() == want


def test_planned_model_for_fused_attention_off_its_hardware(tmp_path):
    cfg = _sft_config(tmp_path, "model.attention=cudnn", "model.dtype=bfloat16")
    model_cfg, notes = plan.planned_model(cfg, "cpu")
    assert model_cfg.attention == "blockwise" and "cannot compile on cpu" in notes[0]
    assert plan.planned_model(cfg, "tpu")[0].attention == "splash"


@pytest.fixture(scope="module")
def packed():
    """Params of a tiny MoE model and two packed rows (segments 1, 2 and padding)."""
    cfg = qwen3.Qwen3Config(**{**TINY_QWEN3, **MOE})
    params = qwen3.init_params(cfg, jax.random.key(0))
    seg = jnp.array([[1] * 10 + [2] * 12 + [0] * 10, [1] * 25 + [0] * 7])
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 1, cfg.vocab_size)
    return cfg, params, tokens, seg


def _logits(cfg, params, tokens, seg):
    return qwen3.forward(params, tokens, cfg=cfg, segment_ids=seg)


@pytest.mark.slow
def test_blockwise_attention_and_moe_scan_equal_what_they_stand_in_for(packed, monkeypatch):
    cfg, params, tokens, seg = packed
    monkeypatch.setattr(qwen3, "ATTN_BLOCK", 8)  # 4 blocks of queries (T = 32)
    ref = _logits(cfg, params, tokens, seg)
    stand_in = dataclasses.replace(cfg, attention="blockwise", moe_impl="scan")
    np.testing.assert_allclose(_logits(stand_in, params, tokens, seg), ref, rtol=1e-5, atol=1e-5)
    loss = lambda c: lambda p: jnp.sum(jnp.sin(_logits(c, p, tokens, seg)) * (seg[..., None] > 0))  # noqa: E731
    got, want = jax.grad(loss(stand_in))(params), jax.grad(loss(cfg))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ablated_attention_is_not_attention(packed):
    cfg, params, tokens, seg = packed
    ablated = _logits(dataclasses.replace(cfg, attention="ablated"), params, tokens, seg)
    assert ablated.shape == (2, 32, cfg.vocab_size)
    assert not np.allclose(ablated, _logits(cfg, params, tokens, seg), atol=1e-3)
    with pytest.raises(config_lib.ConfigError, match="model.attention"):  # never a trainer choice
        config_lib.load_config(str(ROOT / "configs" / "qwen3_8b_lightning_opd.yaml"), ["model.attention=ablated"])


def _module_patches(path: Path) -> list[str]:
    """Assignments in ``path`` to an attribute or item of an imported module (``jax.lax.ragged_dot = f``,
    ``qwen3._ATTENTION["xla"] = f``) and ``setattr`` calls on one."""
    tree = ast.parse(path.read_text())
    modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
               for a in n.names}  # fmt: skip

    def root(node):
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            targets = node.args[:1]
        for t in targets:
            patched = isinstance(t, ast.Attribute | ast.Subscript) or isinstance(node, ast.Call)  # setattr(m, ...)
            if patched and root(t) in modules:
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_nothing_patches_a_module():
    files = sorted((ROOT / "lopd_jax").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert [p for f in files for p in _module_patches(f)] == []


def test_the_patch_finder_finds_a_patch(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import jax\nfrom lopd_jax.models import qwen3\njax.lax.ragged_dot = None\n"
                   "qwen3._ATTENTION['xla'] = None\nsetattr(qwen3, 'x', 1)\nx = {}\nx['a'] = 1\n")  # fmt: skip
    assert _module_patches(bad) == ["probe.py:3", "probe.py:4", "probe.py:5"]
