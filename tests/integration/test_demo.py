"""The demo end to end at smoke size: configs/demo_smoke.yaml (the demo's stages and stage configs, two optimizer
steps each) through ``python -m lopd_jax.train --config``, as a user runs it, then once more (fully cached).

Checks every stage's artifact: the stores validate and chain their provenance (SFT data of the teacher, rollouts
of the SFT student, log-probs of the teacher), every exported model loads in transformers and gives the logits of
our own forward pass, every eval.json holds a pass@1 that the printed report repeats, and the plots exist.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("teacher", "student_sft-seed0", "lightning_opd-seed0")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's demo run (conftest forces 8 for this process only)
    env["JAX_PLATFORMS"] = "cpu"
    cache = os.environ.get("LOPD_JAX_CACHE", str(ROOT / ".jax_cache"))
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache)  # the stages' compiles persist across test runs
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _run(config: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "lopd_jax.train", "--config", str(config)]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    raw = yaml.safe_load((ROOT / "configs" / "demo_smoke.yaml").read_text())
    raw["run_dir"] = str(tmp / "run")
    config = tmp / "demo_smoke.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    first = _run(config)
    records = json.loads((tmp / "run" / "pipeline.json").read_text())
    second = _run(config)
    return {
        "run": tmp / "run",
        "first": first.stdout,
        "records": records,
        "second": second.stdout,
        "cached": json.loads((tmp / "run" / "pipeline.json").read_text()),
    }


def test_every_stage_ran_and_the_stores_validate_with_their_provenance(demo):
    from lopd_jax.store import RolloutStore, provenance
    from precompute.validate import validate

    run = demo["run"]
    assert [r["name"] for r in demo["records"]] == [
        "task", "teacher_data", "teacher", "sft_data", "student_sft-seed0", "rollouts-seed0", "teacher_logprobs-seed0",
        "lightning_opd-seed0",
    ]  # fmt: skip
    assert not any(r["cached"] for r in demo["records"])
    for stage in ("teacher_data", "sft_data", "rollouts-seed0", "teacher_logprobs-seed0"):
        validate(str(run / stage / "store"), require_teacher=stage.startswith("teacher_logprobs"))
    teacher = provenance.fingerprint_weights(run / "teacher" / "hf")
    student = provenance.fingerprint_weights(run / "student_sft-seed0" / "hf")
    sft_data = RolloutStore.open(str(run / "sft_data" / "store"))
    assert sft_data.manifest["sft_teacher"] == teacher and len(sft_data) == 16
    rollouts = RolloutStore.open(str(run / "rollouts-seed0" / "store"))
    assert rollouts.manifest["policy"] == student and rollouts.manifest["sampling"]["temperature"] == 0.7
    scored = RolloutStore.open(str(run / "teacher_logprobs-seed0" / "store"))
    assert scored.manifest["teacher"] == teacher and scored.teacher_committed == len(scored) == 16
    assert provenance.read_provenance(run / "student_sft-seed0" / "hf")["sft_teacher"] == teacher
    lopd = provenance.read_provenance(run / "lightning_opd-seed0" / "hf")
    assert lopd["sft_teacher"] == teacher and lopd["init_weights"] == student
    assert "teacher_inconsistency" not in lopd


@pytest.mark.parametrize("stage", MODELS)
def test_exported_models_load_in_transformers_with_our_logits(demo, stage):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd_jax.models import hf, qwen3

    path = demo["run"] / stage / "hf"
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Add: 123+456+789"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    cfg, params = hf.load_hf(str(path))
    ours = np.asarray(qwen3.forward(params, np.asarray([ids], np.int32), cfg=cfg))[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_eval_results_and_the_printed_report(demo):
    run, by_name = demo["run"], {r["name"]: r for r in demo["records"]}
    for stage in MODELS:
        ev = json.loads((run / stage / "eval.json").read_text())
        assert 0.0 <= ev["eval/pass@1"] <= 1.0 and ev["step"] == 2
        assert len(ev["per_prompt"]) == 8 and np.mean(ev["per_prompt"]) == pytest.approx(ev["eval/pass@1"])
        assert by_name[stage]["result"] == ev
    report = json.loads((run / "report.json").read_text())
    methods = {m["name"]: m for m in report["methods"]}
    assert methods["SFT student"]["scores"] == [by_name["student_sft-seed0"]["result"]["eval/pass@1"]]
    lopd_cost = sum(by_name[s + "-seed0"]["seconds"] for s in ("rollouts", "teacher_logprobs", "lightning_opd"))
    assert methods["Lightning OPD student"]["seconds"] == [pytest.approx(lopd_cost)]
    assert methods["Lightning OPD student"]["teacher_seconds"] == [by_name["teacher_logprobs-seed0"]["seconds"]]
    for png in ("accuracy.png", "stage_seconds.png", "accuracy_vs_time.png"):
        assert (run / png).stat().st_size > 1000
    sft_pp, lopd_pp = (np.asarray(by_name[s]["result"]["per_prompt"]) for s in MODELS[1:])
    (gain,) = report["gains"]
    assert gain["name"] == "Lightning OPD student - SFT student" and gain["paired"]
    assert gain["gains"] == [pytest.approx(float(np.mean(lopd_pp - sft_pp)))]
    for text in (demo["first"], demo["second"]):
        assert "Lightning OPD student" in text and "teacher_logprobs-seed0" in text
        (header,) = [ln for ln in text.splitlines() if ln.startswith("method")]
        assert "eval s.e." in header
        (line,) = [ln for ln in text.splitlines() if ln.startswith("Lightning OPD student - SFT student")]
        assert line.split()[6] == line.split()[9] == f"{100 * gain['gains'][0]:+.1f}" and line.endswith("yes")


def test_second_run_is_fully_cached(demo):
    assert [r["name"] for r in demo["cached"]] == [r["name"] for r in demo["records"]]
    assert all(r["cached"] for r in demo["cached"])
    assert "=== stage" not in demo["second"]  # no stage command ran
    # The cached records carry the first run's timings and results.
    assert [r["seconds"] for r in demo["cached"]] == [r["seconds"] for r in demo["records"]]


def test_the_compare_config_runs_the_demo_stage_for_stage_in_its_run_dir():
    """demo_compare shares the demo's run_dir, so every stage name the two have in common must carry the same
    command (else each config's run would rerun, and clear, the other's stage): the demo's stages are the comparison's
    seed 0, and its report goes to its own dir."""
    from lopd_jax.training.pipeline import expand_stages

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    compare = yaml.safe_load((ROOT / "configs" / "demo_compare.yaml").read_text())
    assert demo["run_dir"] == compare["run_dir"]
    assert compare["report"]["dir"] not in (demo["run_dir"], demo.get("report", {}).get("dir"))
    compare_stages = {s.name: s for s in expand_stages(compare["stages"], "demo_compare.yaml")}
    demo_stages = {s.name: s for s in expand_stages(demo["stages"], "demo.yaml")}
    assert set(demo_stages) < set(compare_stages)
    for name, stage in demo_stages.items():
        assert compare_stages[name].cmd == stage.cmd, name
    seeds = {s.loop for s in compare_stages.values() if s.base == "lightning_opd_inconsistent"}
    assert seeds == {(("seed", 0),), (("seed", 1),), (("seed", 2),)}
