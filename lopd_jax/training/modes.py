"""The training modes as objects: each names its objective, where its batches come from, which teacher it uses and
which config keys it needs. Code asks the mode (``mode.reads_store``), never compares its name.

    sft            cross entropy on a store of answers (SFT data)                    store   no teacher
    lightning_opd  loss.objective on fixed rollouts with stored teacher log-probs   store   stored teacher
    opd            loss.objective on samples of the current student, scored live    online  live teacher
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from lopd_jax import losses

ModeName = Literal["sft", "lightning_opd", "opd"]


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    loss: Callable  # losses.sft_loss | losses.objective_loss (loss.objective): (params, batch, cfg=, loss_cfg=)
    data: Literal["store", "online"]  # the RolloutStore at data.store | prompts sampled by the student every step
    teacher: Literal["none", "stored", "live"]  # no teacher | log-probs in the store | a model in the process
    requires: tuple[tuple[str, str], ...]  # (dotted config key, why) that must be set in this mode

    @property
    def reads_store(self) -> bool:
        return self.data == "store"

    @property
    def samples_online(self) -> bool:
        return self.data == "online"

    @property
    def stored_teacher(self) -> bool:
        """The teacher's log-probs come from the store: its teacher must be the SFT data's (teacher consistency)."""
        return self.teacher == "stored"

    @property
    def live_teacher(self) -> bool:
        return self.teacher == "live"

    @property
    def trains_on_answers(self) -> bool:
        """SFT: the store's samples are the SFT data, whose teacher the exported model records."""
        return self.teacher == "none"


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("sft", losses.sft_loss, "store", "none", (("data.store", "the RolloutStore to train on"),)),
        Mode(
            "lightning_opd", losses.objective_loss, "store", "stored", (("data.store", "the RolloutStore to train on"),)
        ),
        Mode(
            "opd",
            losses.objective_loss,
            "online",
            "live",
            (("model.teacher", "the live teacher"), ("data.prompts", "the prompts sampled online")),
        ),
    )
}


def get(name: str) -> Mode:
    """The mode called ``name`` (the config's ``mode``, already checked against ``ModeName``)."""
    return MODES[name]
