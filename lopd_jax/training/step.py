"""The one step builder: ``build(cfg, setup) -> TrainStep`` (abstract state, jitted step, shardings).

The trainer (``lopd_jax.train``), ``--plan`` (``lopd_jax.plan.planner``) and the benchmarks
(``benchmarks.train_step``) all
get their update step here, so what ``--plan`` compiles and what a benchmark times is the program the trainer runs.
They differ only in the ``setup`` they pass: its model config (``--plan`` may choose another attention or MoE
implementation for a backend that cannot compile the configured one, and says so) and its mesh.

``setup`` is anything with ``model_cfg`` (Qwen3Config), ``mesh`` and ``rules`` (the logical-axis rules): the
trainer's ``training.setup.Setup``, or a ``StepSetup``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lopd_jax import losses, update
from lopd_jax.data.batch import Batch
from lopd_jax.models import qwen3
from lopd_jax.parallel import sharding
from lopd_jax.training import modes

if TYPE_CHECKING:
    from lopd_jax.training.config import TrainConfig

# The Batch contract's dtypes (docs/design.md): token ids int32, masks and log-probs float32; the optional top-k fields
# (None by default) only for a topk_* loss.objective.
TOPK_FIELDS = ("topk_ids", "topk_teacher_logprobs", "topk_teacher_tail")
BATCH_DTYPES = {f.name: jnp.int32 for f in dataclasses.fields(Batch) if f.name not in TOPK_FIELDS}
BATCH_DTYPES.update(loss_mask=jnp.float32, teacher_logprobs=jnp.float32, behavior_logprobs=jnp.float32)


class HasStepSetup(Protocol):
    """What the step needs of a run's setup: ``training.setup.Setup`` (the trainer) or ``StepSetup``."""

    model_cfg: qwen3.Qwen3Config
    mesh: Mesh
    rules: sharding.Rules


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The step's setup where there is no run to validate (``--plan``, the benchmarks)."""

    model_cfg: qwen3.Qwen3Config
    mesh: Mesh
    rules: sharding.Rules


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """What ``build`` returns. ``abstract_state`` is a TrainState of ShapeDtypeStructs carrying their shardings
    (the restore target, and the argument to lower the step with); nothing is allocated."""

    abstract_state: update.TrainState
    step: Callable[[update.TrainState, Batch], tuple[update.TrainState, dict[str, jax.Array]]]
    state_shardings: update.TrainState
    batch_sharding: NamedSharding
    optimizer: optax.GradientTransformation
    topk: int = 0  # K of a topk_* loss.objective: the batch carries its [B, T, K] fields

    def abstract_batch(self, batch_size: int, seq_len: int) -> Batch:
        """A [batch_size, seq_len] Batch of ShapeDtypeStructs on the batch sharding (with the top-k fields
        [batch_size, seq_len, K] when the step's objective reads them)."""
        spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding)  # noqa: E731
        fields = {k: spec((batch_size, seq_len), dt) for k, dt in BATCH_DTYPES.items()}
        if self.topk:
            fields["topk_ids"] = spec((batch_size, seq_len, self.topk), jnp.int32)
            fields["topk_teacher_logprobs"] = spec((batch_size, seq_len, self.topk), jnp.float32)
            fields["topk_teacher_tail"] = spec((batch_size, seq_len), jnp.float32)
        return Batch(**fields)

    def lower(self, batch_size: int, seq_len: int) -> jax.stages.Lowered:
        """The step lowered on abstract shapes (``.as_text()`` is its StableHLO; ``.compile()`` XLA's program)."""
        return self.step.lower(self.abstract_state, self.abstract_batch(batch_size, seq_len))

    def init_state(self, params: Any, seed: int) -> update.TrainState:
        """A fresh TrainState (zero moments, step 0) from ``params``, placed on the state shardings."""
        state = update.init_train_state(params, self.optimizer, jax.random.key(seed))
        return jax.device_put(state, self.state_shardings)


def loss_fn(mode: str, model_cfg: qwen3.Qwen3Config, loss_cfg: losses.LossConfig) -> update.LossFn:
    """The loss of ``mode``: SFT cross entropy, or the (Lightning / online) OPD objective of ``loss.objective``."""
    return functools.partial(modes.get(mode).loss, cfg=model_cfg, loss_cfg=loss_cfg)


def abstract_state(setup: HasStepSetup, optimizer: optax.GradientTransformation, seed: int) -> update.TrainState:
    """The TrainState as sharded ShapeDtypeStructs; the optimizer moments follow the params' shardings."""
    params = sharding.abstract_arrays(qwen3.param_specs(setup.model_cfg), setup.mesh, setup.rules)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    state = jax.eval_shape(lambda p: update.init_train_state(p, optimizer, jax.random.key(seed)), params)
    shardings = update.state_shardings(state, setup.mesh, param_shardings=param_sh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def settings(run_cfg: TrainConfig) -> dict[str, Any]:
    """The sections of a run's config that ``build`` takes, as keyword arguments: what the trainer runs is what
    ``--plan`` compiles (both call ``build(setup, **settings(run_cfg))``)."""
    return dict(
        mode=run_cfg.mode,
        optimizer=run_cfg.optimizer,
        loss=run_cfg.loss,
        grad_accum=run_cfg.train.grad_accum,
        seed=run_cfg.train.seed,
    )


def build(
    setup: HasStepSetup,
    *,
    mode: str,
    optimizer: update.OptimizerConfig,
    loss: losses.LossConfig,
    grad_accum: int = 1,
    seed: int = 0,
) -> TrainStep:
    """The update step of a run: ``mode``'s loss, the ``optimizer``, ``grad_accum`` micro-batches per step, jitted
    over ``setup.mesh`` with explicit state / batch shardings and the state donated. The trainer and ``--plan`` pass
    their config's sections (``settings``); the benchmarks pass their own."""
    opt = update.make_optimizer(optimizer)
    abstract = abstract_state(setup, opt, seed)
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)
    batch_sh = sharding.batch_sharding(setup.mesh, 2, setup.rules)
    step = update.make_update_step(
        loss_fn(mode, setup.model_cfg, loss),
        opt,
        grad_accum=grad_accum,
        mesh=setup.mesh,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
    )
    return TrainStep(abstract, step, state_sh, batch_sh, opt, topk=loss.topk if mode != "sft" else 0)
