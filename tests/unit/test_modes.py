"""lopd_jax.training.modes: each mode's objective, data source, teacher and required keys, asked of the object."""

import typing

import pytest
import yaml

from lopd_jax import losses
from lopd_jax.training import config as config_lib
from lopd_jax.training import modes
from lopd_jax.training.config import ConfigError, TrainConfig, build


def test_each_mode_declares_its_objective_data_and_teacher():
    sft, lightning, opd = (modes.get(n) for n in ("sft", "lightning_opd", "opd"))
    assert (sft.loss, lightning.loss, opd.loss) == (losses.sft_loss, losses.objective_loss, losses.objective_loss)
    assert sft.reads_store and lightning.reads_store and not opd.reads_store and opd.samples_online
    assert lightning.stored_teacher and not sft.stored_teacher and not opd.stored_teacher
    assert opd.live_teacher and not lightning.live_teacher and sft.trains_on_answers
    assert set(modes.MODES) == set(typing.get_args(modes.ModeName))  # every name the schema accepts has a mode


@pytest.mark.parametrize(
    "mode, given, missing",
    [
        ("sft", {}, "data.store"),
        ("lightning_opd", {}, "data.store"),
        ("opd", {"data": {"prompts": "p.jsonl"}}, "model.teacher"),
        ("opd", {"model": {"init": "x", "teacher": "t"}}, "data.prompts"),
    ],
)
def test_a_key_the_mode_requires_is_named(tmp_path, mode, given, missing):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"mode": mode, "model": {"init": "x"}, **given}))
    with pytest.raises(ConfigError) as e:
        config_lib.load_config(path)
    assert str(e.value) == f"{path}: {missing}: required in mode {mode!r}: {REASONS[missing]}"


REASONS = {
    "data.store": "the RolloutStore to train on",
    "model.teacher": "the live teacher",
    "data.prompts": "the prompts sampled online",
}


def test_an_unknown_mode_is_refused_by_the_schema():
    with pytest.raises(ConfigError, match="mode: expected one of"):
        build(TrainConfig, {"mode": "rl", "model": {"init": "x"}})
