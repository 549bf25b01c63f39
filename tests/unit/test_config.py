"""Config schema: YAML round trip, dotted overrides, and errors that name the dotted key and its source."""

import dataclasses

import pytest
import yaml

from lopd_jax.training.config import (
    ConfigError,
    TrainConfig,
    build,
    is_pipeline,
    load_config,
    read_yaml,
    to_dict,
)

BASE = """
mode: lightning_opd
model: {init: qwen3-8b, dtype: bfloat16, remat: full}
data: {store: runs/x/store, max_response_len: 4096}
train: {steps: 150, batch_size: 256, seq_len: 8192}
optimizer: {lr: 2e-6, b2: 0.98}
loss: {clip_eps_low: 0.2, tis_cap: null}
mesh: {data: 1, fsdp: 8, rules: [[embed, null], [mlp, [fsdp, tensor]]]}
sampling: {temperature: 0.7, top_p: 0.9, stop_token_ids: [151645, 151643]}
eval: {prompts: data/aime.jsonl, k: 4}
checkpoint: {every_steps: 50, keep: 2}
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_fields_are_typed_and_resolved(tmp_path):
    c = load_config(write(tmp_path, BASE))
    assert c.mode == "lightning_opd" and c.model.remat == "full"
    assert c.optimizer.lr == 2e-6 and isinstance(c.optimizer.lr, float)  # PyYAML reads "2e-6" as a string
    assert c.mesh.rules == (("embed", None), ("mlp", ("fsdp", "tensor")))
    assert c.sampling.stop_token_ids == (151645, 151643)
    assert c.loss.tis_cap is None and c.eval.k == 4
    # data inherits the batch geometry from train; lightning_opd always needs teacher log-probs
    assert (c.data.batch_size, c.data.seq_len, c.data.require_teacher) == (256, 8192, True)
    hash(c)  # frozen all the way down (passes through jit as static)


def test_model_forms_are_trainer_keys(tmp_path):
    """The forms default to "auto" (resolved per compile platform); every form can be forced by key."""
    c = load_config(write(tmp_path, BASE))
    assert (c.model.scan_layers, c.model.matmuls, c.model.decode_attention) == ("auto", "auto", "auto")
    c = load_config(
        write(tmp_path, BASE), ["model.scan_layers=auto", "model.matmuls=flat", "model.decode_attention=dot"]
    )
    assert (c.model.scan_layers, c.model.matmuls, c.model.decode_attention) == ("auto", "flat", "dot")
    assert load_config(write(tmp_path, BASE), ["model.scan_layers=false"]).model.scan_layers is False


def test_yaml_round_trip(tmp_path):
    c = load_config(write(tmp_path, BASE), ["train.steps=7", "logging.run_dir=/tmp/r"])
    text = yaml.safe_dump(to_dict(c))
    c2 = load_config(write(tmp_path, text, "resolved.yaml"))
    assert c2 == c
    assert build(TrainConfig, to_dict(c)) == c


def test_overrides(tmp_path):
    c = load_config(
        write(tmp_path, BASE),
        [
            "optimizer.lr=1e-5",
            "train.steps=3",
            "mode=sft",
            "loss.tis_cap=2",
            "sampling.stop_token_ids=[7]",
            "eval.prompts=null",
            "model.teacher=/m/t",
            "--resume=true",
        ],
    )
    assert (c.optimizer.lr, c.train.steps, c.mode, c.loss.tis_cap) == (1e-5, 3, "sft", 2.0)
    assert c.sampling.stop_token_ids == (7,) and c.eval.prompts is None and c.model.teacher == "/m/t"
    assert c.resume is True and c.data.require_teacher is False  # sft does not force teacher columns
    assert load_config(write(tmp_path, BASE)).optimizer.lr == 2e-6  # the file is not mutated


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("data: {stor: x}", "data.stor", "unknown key"),
        ("trian: {steps: 1}", "trian", "unknown key"),
        ("train: {steps: ten}", "train.steps", "expected int"),
        ("train: {steps: true}", "train.steps", "expected int"),
        ("data: {shuffle: 1}", "data.shuffle", "expected bool"),
        ("model: {init: m, dtype: fp8}", "model.dtype", "expected one of"),
        ("model: {init: m, scan_layers: sometimes}", "model.scan_layers", "expected"),
        ("model: {init: m, matmuls: 2d}", "model.matmuls", "expected one of"),
        ("model: {init: m, decode_attention: fast}", "model.decode_attention", "expected one of"),
        ("mesh: {rules: [[embed]]}", "mesh.rules[0]", "expected 2 items"),
        ("optimizer: {lr: fast}", "optimizer.lr", "expected float"),
        ("optimizer: {schedule: cosine}", "optimizer", "total_steps"),  # the section's own validation
        ("optimizer: {schedule: cosine, total_steps: 9, warmup_steps: 2}", "optimizer", "warmup_cosine"),
        ("data: {batch_size: 3}", "data.batch_size", "contradicts train.batch_size"),
        ("train: {batch_size: 6, grad_accum: 4}", "train.grad_accum", "does not divide"),
    ],
)
def test_bad_values_name_the_file_and_dotted_key(tmp_path, text, key, words):
    base = "mode: sft\nmodel: {init: m}\ndata: {store: s}\n"
    merged = yaml.safe_load(base)
    for k, v in yaml.safe_load(text).items():
        merged[k] = (merged.get(k) or {}) | v if isinstance(v, dict) else v
    p = write(tmp_path, yaml.safe_dump(merged))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}: "), msg
    assert words in msg


def test_override_errors_name_the_override(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"command-line override 'optimizer\.lrr=1'.*optimizer\.lrr: unknown key"):
        load_config(p, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"override 'train\.steps=x'.*train\.steps: expected int"):
        load_config(p, ["train.steps=x"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(p, ["train.steps"])
    with pytest.raises(ConfigError, match=r"train\.steps' .*train is not a section|train\.steps\.x"):
        load_config(p, ["train.steps.x=1"])


def test_required_and_mode_specific_keys(tmp_path):
    with pytest.raises(ConfigError, match=r": mode: required key is missing"):
        load_config(write(tmp_path, "model: {init: m}"))
    with pytest.raises(ConfigError, match=r": model.init: required"):
        load_config(write(tmp_path, "mode: sft\nmodel: {}\ndata: {store: s}"))
    with pytest.raises(ConfigError, match=r": data.store: required in mode 'lightning_opd'"):
        load_config(write(tmp_path, "mode: lightning_opd\nmodel: {init: m}"))
    with pytest.raises(ConfigError, match=r": model.teacher: required in mode 'opd'"):
        load_config(write(tmp_path, "mode: opd\nmodel: {init: m}\ndata: {prompts: p.jsonl}"))


def test_files_that_are_not_run_configs(tmp_path):
    stages = write(tmp_path, "run_dir: r\nstages:\n  - {name: a, cmd: echo}\n")
    assert is_pipeline(read_yaml(stages))
    with pytest.raises(ConfigError, match="lists 'stages'"):
        load_config(stages)
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "mode: [", "bad.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1", "list.yaml"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_every_section_round_trips_through_its_defaults():
    # Builds every section from its own defaults: any field type the loader cannot handle fails here.
    c = dataclasses.replace(load_defaults(), resume=True)
    assert build(TrainConfig, to_dict(c)) == c


def load_defaults():
    return build(TrainConfig, {"mode": "sft", "model": {"init": "m"}})


def test_the_model_section_takes_its_knobs_from_qwen3config():
    """model.* knobs are Qwen3Config's fields (type and default), not a copy: a knob added there with its default
    appears here; the trainer narrows dtypes to fp32 / bf16 and defaults attention to the backend's choice."""
    import typing

    from lopd_jax.models.qwen3_specs import Qwen3Config
    from lopd_jax.training.config import MODEL_KNOBS, ModelConfig, model_knobs

    ours, theirs = typing.get_type_hints(ModelConfig), typing.get_type_hints(Qwen3Config)
    defaults = {f.name: f.default for f in dataclasses.fields(Qwen3Config)}
    for k in MODEL_KNOBS:
        if k not in ("dtype", "param_dtype", "attention"):
            assert ours[k] == theirs[k] and getattr(ModelConfig(), k) == defaults[k], k
    assert typing.get_args(ours["dtype"]) == ("float32", "bfloat16") and ModelConfig().attention == "auto"
    assert "ablated" in typing.get_args(theirs["attention"]) and "ablated" not in typing.get_args(ours["attention"])
    assert model_knobs(ModelConfig(remat="full")) == {
        **{k: getattr(ModelConfig(), k) for k in MODEL_KNOBS},
        "remat": "full",
    }
