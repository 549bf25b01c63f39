"""The optimizer, the train state and one pure, jitted update step for every training mode.

``make_update_step(loss_fn, optimizer)`` returns ``step(state, batch) -> (state, metrics)``: the same function
serves ``sft``, ``lightning_opd`` and ``opd`` by the loss it is given. Gradient accumulation runs inside the step
as a ``lax.scan`` over micro-batches, weighted by each loss's ``data/loss_denominator`` so that k micro-batches
give exactly the update of one batch normalised by the global count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lopd_jax.config.schema import check_choices
from lopd_jax.models import qwen3

LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]
DENOM_KEY = "data/loss_denominator"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; defaults are the reference's (lr 2e-6 constant, betas 0.9/0.98)."""

    lr: float = 2e-6
    schedule: Literal["constant", "cosine", "warmup_cosine"] = "constant"
    warmup_steps: int = 0
    total_steps: int = 0  # needed by the cosine schedules
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global norm; 0 = no clipping
    eps: float = 1e-8
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    # Storage dtype of the Adam moments between steps ("bfloat16" halves their memory, e.g. to fit 30B-A3B on
    # 8 x 80 GB; the update itself is computed in fp32). The reference keeps them in fp32.
    moments_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        check_choices(self, "optimizer")
        if self.schedule == "cosine" and self.warmup_steps > 0:
            raise ValueError(
                f"optimizer.warmup_steps ({self.warmup_steps}) does nothing with schedule 'cosine' (it starts at lr); "
                "use schedule 'warmup_cosine' for a warmup"
            )
        if self.schedule != "constant" and self.total_steps <= max(self.warmup_steps, 0):
            raise ValueError(
                f"optimizer.total_steps ({self.total_steps}) must exceed optimizer.warmup_steps "
                f"({self.warmup_steps}) for schedule {self.schedule!r}"
            )


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps > 0:
            return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.constant_schedule(cfg.lr)
    warmup = cfg.warmup_steps if cfg.schedule == "warmup_cosine" else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=cfg.total_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW (decoupled decay on every parameter, as the reference)."""
    # inject_hyperparams keeps the current lr in the optimizer state, where the step reads it for train/lr.
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    # Always, not only for bfloat16: optax keeps the moments in the params' dtype, so bf16 params would otherwise
    # get bf16 moments whatever moments_dtype says. (fp32 params and moments: the casts are no-ops.)
    adamw = store_state_in(adamw, jnp.dtype(cfg.moments_dtype))
    if cfg.grad_clip <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def store_state_in(inner: optax.GradientTransformation, dtype: jnp.dtype) -> optax.GradientTransformation:
    """Keeps ``inner``'s floating array state (the Adam moments; scalars such as the lr stay fp32) in ``dtype``
    between steps, computing each update from an fp32 view of it."""

    def cast(tree: Any, dt: jnp.dtype) -> Any:
        keep = lambda x: not (jnp.issubdtype(x.dtype, jnp.floating) and x.ndim)  # noqa: E731
        return jax.tree.map(lambda x: x if keep(x) else x.astype(dt), tree)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


@struct.dataclass
class TrainState:
    """Everything a step reads and writes: a pytree, so it jits, shards, donates and checkpoints as one."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # PRNG key, advanced once per step


def init_train_state(params: Any, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh state; the optimizer moments inherit the params' shardings (zeros_like keeps placement)."""
    opt_state = jax.jit(optimizer.init)(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=key)


def state_shardings(state: TrainState, mesh: Mesh, *, cfg: Any = None, param_shardings: Any = None) -> TrainState:
    """A TrainState-shaped tree of NamedSharding: params (and every params-shaped optimizer subtree, i.e. the
    Adam moments) on ``param_shardings`` (default ``qwen3.param_shardings(cfg, mesh)``), the rest replicated.

    ``state`` may be abstract (``jax.eval_shape`` output).
    """
    if param_shardings is None:
        param_shardings = qwen3.param_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    params_def = jax.tree.structure(state.params)

    def is_params_like(x: Any) -> bool:
        return jax.tree.structure(x) == params_def

    opt_sh = jax.tree.map(
        lambda x: param_shardings if is_params_like(x) else replicated, state.opt_state, is_leaf=is_params_like
    )
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_sh, rng=replicated)


def _split_micro(batch: Any, k: int) -> Any:
    """[B, ...] -> [k, B / k, ...]; micro-batch i takes rows i, i + k, ... so a B sharded in contiguous blocks
    keeps every micro-batch spread over all batch shards."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _combine_metrics(stacked: dict[str, jax.Array], weights: jax.Array) -> dict[str, jax.Array]:
    """Reduce [k]-stacked micro-batch metrics: counts (data/*) summed, *_max maxed, the rest weighted means."""
    total = jnp.maximum(jnp.sum(weights), 1e-30)
    out = {}
    for name, v in stacked.items():
        if name.startswith("data/"):
            out[name] = jnp.sum(v)
        elif name.endswith("_max"):
            out[name] = jnp.max(v)
        else:
            out[name] = jnp.sum(v * weights) / total
    return out


def _accumulated_grads(loss_fn: LossFn, params: Any, batch: Any, k: int, micro_sharding: Any):
    """(loss, grads, metrics) of the whole batch as k micro-batches, each weighted by its loss denominator."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, grads, metrics

    def body(acc, micro):
        if micro_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
        (loss, metrics), grads = grad_fn(params, micro)
        # loss_i = sum_i / denom_i, so denom_i * grad_i = grad(sum_i): summing these and dividing by the global
        # denominator reproduces the one-big-batch loss exactly (a loss without a denominator weighs 1).
        w = metrics.get(DENOM_KEY, jnp.ones((), jnp.float32)).astype(jnp.float32)  # a count: exact in fp32
        acc = jax.tree.map(lambda a, g: a + w * g.astype(a.dtype), acc, grads)
        return acc, (loss, w, metrics)

    # fp32 accumulators for bf16/fp32 params; float64 params (identity tests under x64) keep float64.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    gsum, (losses, ws, metrics) = jax.lax.scan(body, zeros, _split_micro(batch, k))
    total = jnp.maximum(jnp.sum(ws), 1e-30)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), gsum, params)
    return jnp.sum(losses * ws) / total, grads, _combine_metrics(metrics, ws)


def _injected_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate an ``optax.inject_hyperparams`` state used for the step just taken, if any."""
    found = []

    def visit(x):
        if isinstance(x, optax.InjectStatefulHyperparamsState | optax.InjectHyperparamsState):
            found.append(x.hyperparams["learning_rate"])
            return True
        return False

    jax.tree.map(lambda _: None, opt_state, is_leaf=visit)
    return jnp.asarray(found[0], jnp.float32) if found else None


def make_update_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
    state_shardings: TrainState | None = None,
    batch_sharding: Any = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted pure step ``(state, batch) -> (new_state, metrics)``; ``state`` is donated.

    Args:
      loss_fn: ``(params, batch) -> (scalar loss, metrics)``, e.g.
        ``functools.partial(losses.opd_loss, cfg=cfg, loss_cfg=loss_cfg)``.
      optimizer: an optax transformation (``make_optimizer``).
      grad_accum: micro-batches per step; the batch's leading dim B must be divisible by it.
      mesh, state_shardings, batch_sharding: with a mesh, the step is compiled with these explicit in/out
        shardings (``state_shardings(...)``, ``sharding.batch_sharding(mesh)``); metrics come out replicated.

    Returns:
      The jitted step. Metrics: the loss's own, plus train/loss, train/grad_norm (before clipping) and train/lr
      (the lr this step used, when the optimizer keeps it in its state as ``make_optimizer``'s does).
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads, metrics = _accumulated_grads(loss_fn, state.params, batch, grad_accum, batch_sharding)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "train/loss": loss, "train/grad_norm": optax.tree.norm(grads)}
        lr = _injected_lr(opt_state)
        if lr is not None:
            metrics["train/lr"] = lr
        rng, _ = jax.random.split(state.rng)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnames="state")
    if state_shardings is None or batch_sharding is None:
        raise ValueError("make_update_step: with a mesh, pass state_shardings and batch_sharding")
    replicated = NamedSharding(mesh, PartitionSpec())

    def step_in_mesh(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        # Kernels XLA cannot partition (splash attention) shard_map over the mesh they find here.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, batch)

    return jax.jit(
        step_in_mesh,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnames="state",
    )
