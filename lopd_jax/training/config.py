"""The training config: frozen dataclasses as the schema, YAML files setting fields, dotted CLI overrides.

Each module owns the dataclass of its own settings (docs/internals.md); ``TrainConfig`` composes them::

    mode: lightning_opd            # sft | lightning_opd | opd
    model: {init: runs/sft/hf, dtype: bfloat16, remat: full}
    data: {store: runs/rollouts/store, max_response_len: 4096}
    train: {steps: 150, batch_size: 256, seq_len: 8192}
    optimizer: {lr: 2.0e-6}
    ...

``load_config(path, ["optimizer.lr=1e-5", "train.steps=10"])`` reads the file with ``yaml.safe_load``, applies the
overrides (each value parsed by ``yaml.safe_load`` too), and builds the dataclass tree field by field from the
type hints. An unknown key or a value of the wrong type raises ``ConfigError`` naming the dotted key and where it
came from (the file or the command line). A file whose top level lists ``stages`` is a pipeline, not a training
config: callers check ``is_pipeline(read_yaml(path))`` and hand it to ``lopd_jax.training.pipeline``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

from lopd_jax.config.errors import ConfigError
from lopd_jax.data.batch import DataConfig
from lopd_jax.data.prompts import PromptConfig
from lopd_jax.inference.sampling import SamplingConfig
from lopd_jax.losses import LossConfig
from lopd_jax.models.qwen3_specs import Attention, Qwen3Config
from lopd_jax.parallel.sharding import MeshConfig
from lopd_jax.training import modes
from lopd_jax.training.checkpoint import CheckpointConfig
from lopd_jax.training.drift import DriftConfig
from lopd_jax.training.modes import ModeName
from lopd_jax.training.refresh import RefreshConfig
from lopd_jax.update import OptimizerConfig

# ----------------------------------------------------------------------------------------------------------------
# Sections owned here (the others are imported from their modules above)
# ----------------------------------------------------------------------------------------------------------------


# The runtime knobs of Qwen3Config that the trainer's ``model`` section sets (model.dtype, model.remat, ...): their
# types and defaults are read from Qwen3Config's own fields, so a knob is declared once. Two differ on purpose:
# the trainer trains in fp32 or bf16 only, and its attention is a real kernel (no benchmark ablation) defaulting to
# the backend's choice ("auto").
# moe_impl: auto (triton on NVIDIA GPUs, ragged_dot on TPU, padded on CPU) | triton | ragged_dot | padded | scan
# (models/grouped_matmul.py); one the backend cannot run is refused before anything compiles.
MODEL_KNOBS = ("dtype", "param_dtype", "remat", "attention", "scan_layers", "matmuls", "decode_attention", "moe_impl")
_TRAINER_DTYPE = Literal["float32", "bfloat16"]
_TRAINER_KNOB_TYPES = {"dtype": _TRAINER_DTYPE, "param_dtype": _TRAINER_DTYPE, "attention": Attention}
_TRAINER_KNOB_DEFAULTS = {"attention": "auto"}


def _knob_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(Qwen3Config)
    defaults = {f.name: f.default for f in dataclasses.fields(Qwen3Config)}
    return [
        (k, _TRAINER_KNOB_TYPES.get(k, hints[k]), dataclasses.field(default=_TRAINER_KNOB_DEFAULTS.get(k, defaults[k])))
        for k in MODEL_KNOBS
    ]


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [
        ("init", str, dataclasses.field(default="")),  # HF checkpoint dir; "scratch": random weights of ``config``;
        # a preset name for --plan
        ("config", str | None, dataclasses.field(default=None)),  # HF config.json (or dir) when init is "scratch"
        ("teacher", str | None, dataclasses.field(default=None)),  # HF dir of the live teacher (mode opd only)
        ("tokenizer", str | None, dataclasses.field(default=None)),  # None: the tokenizer saved with ``init``
        *_knob_fields(),
    ],
    frozen=True,
)
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = """The student to start from (and the teacher for online OPD), plus Qwen3Config's runtime knobs
(``MODEL_KNOBS``, declared by Qwen3Config)."""


def model_knobs(m: ModelConfig) -> dict[str, Any]:
    """The Qwen3Config runtime knobs the ``model`` section sets."""
    return {k: getattr(m, k) for k in MODEL_KNOBS}


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """The training loop. ``batch_size`` (rows of ``seq_len`` tokens per optimizer step) and ``seq_len`` are set
    here; ``data.batch_size`` / ``data.seq_len`` inherit them."""

    steps: int = 100
    batch_size: int = 8  # rows per optimizer step; one sequence per row unless data.pack (then >= 1 per row)
    seq_len: int = 1024  # T
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only after the last step (when eval.prompts is set)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: sample ``k`` answers per prompt, grade them, report pass@1 and avg@k."""

    prompts: str | None = (
        None  # prompt set with reference answers (lopd_jax.data.prompts' formats); None: no evaluation
    )
    prompt_key: str | None = None  # column of the prompt (None: prompt / messages / problem)
    answer_key: str | None = None  # column of the answer (None: answer, else reward_model.ground_truth)
    k: int = 1
    grading: Literal["math", "exact"] = "math"  # math-verify equivalence | exact string match
    max_new_tokens: int = 256
    num_prompts: int = 0  # 0: all prompts in the file
    temperature: float = 0.6
    top_p: float = 0.95


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    run_dir: str = "runs/default"  # metrics.jsonl, events (TensorBoard), plots, checkpoints, hf/ export
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True  # tqdm progress bar


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """The ``plan`` section (``--plan`` only): the per-device memory budget the compiled step is checked against.

    Owned here, not by plan.py: plan.py reads the whole TrainConfig, so the schema must not import it back."""

    device_memory_gb: float = 80.0  # H100 / A100-80GB

    def __post_init__(self):
        if self.device_memory_gb <= 0:
            raise ValueError(f"plan.device_memory_gb must be > 0, got {self.device_memory_gb}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole run; ``to_dict(cfg)`` is what the run saves as its resolved config."""

    mode: ModeName  # training.modes: the objective, the data source and the teacher of each
    model: ModelConfig
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    eval: EvalConfig = EvalConfig()
    prompt: PromptConfig = PromptConfig()  # how online OPD's data.prompts and eval.prompts are encoded
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    plan: PlanConfig = PlanConfig()  # --plan only: the per-device memory budget
    drift: DriftConfig = DriftConfig()  # the direct KL(pi_student || pi_ref) estimate at each evaluation
    refresh: RefreshConfig = RefreshConfig()  # lightning_opd: resample the rollouts when the student drifts
    allow_teacher_inconsistency: bool = False  # run lightning_opd despite a teacher mismatch (ablations only)
    resume: bool = False  # continue from the latest checkpoint in checkpoint.directory
    # Dotted keys (e.g. train.steps) that a resume may change; any other difference from the run's config.yaml is
    # refused, because the checkpoint and the exported provenance would then describe a run that never happened.
    resume_may_change: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Building dataclasses from dicts
# ----------------------------------------------------------------------------------------------------------------


class _KeyError(Exception):
    """Internal: a problem at a dotted key, turned into ConfigError once the key's source is known."""

    def __init__(self, key: str, msg: str):
        super().__init__(key, msg)
        self.key, self.msg = key, msg


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Checks/converts one YAML value to the field type ``tp``; raises _KeyError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _KeyError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        if value not in args:
            raise _KeyError(key, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, key)
    if origin in (tuple, list, Sequence):
        return _convert_sequence(tp, origin, args, value, key)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _KeyError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    return _convert_scalar(tp, value, key)


def _convert_union(args: tuple, value: Any, key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _KeyError(key, f"must not be null (expected {' | '.join(map(_type_name, args))})")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, key)
        except _KeyError as e:
            errors.append(e.msg)
    raise _KeyError(key, " or ".join(errors))


def _convert_sequence(tp: Any, origin: Any, args: tuple, value: Any, key: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _KeyError(key, f"expected a list ({_type_name(tp)}), got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[A, B]
        if len(value) != len(args):
            raise _KeyError(key, f"expected {len(args)} items ({_type_name(tp)}), got {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return items if origin is list else tuple(items)


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "2e-6" as a string; accept what Python's float() accepts.
            try:
                return float(value)
            except ValueError:
                raise _KeyError(key, f"expected float, got {value!r} (str)") from None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        raise _KeyError(key, f"unsupported field type {tp!r} in the config schema")
    if not ok:
        raise _KeyError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _freeze(value: Any) -> Any:
    """Lists -> tuples (recursively) so untyped values keep the frozen dataclasses hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], *, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a (YAML) mapping, recursing into nested dataclass fields.

    Raises ``_KeyError`` (wrapped into ConfigError by ``build``/``load_config``) on unknown keys, missing
    required keys, wrong types, and values the dataclass's own ``__post_init__`` rejects.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _KeyError(prefix + str(unknown[0]), f"unknown key (allowed in this section: {', '.join(fields)})")
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    for name, value in kwargs.items():  # ranges first: a section's own __post_init__ message lacks the dotted key
        _check_field(prefix + name, value)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _KeyError(prefix + name, "required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the section's own __post_init__ validation
        raise _KeyError(prefix.rstrip(".") or cls.__name__, str(e)) from None


def build(cls: type, data: Mapping[str, Any], source: str = "<dict>") -> Any:
    """``from_dict`` with errors as ConfigError("SOURCE: dotted.key: problem")."""
    try:
        return from_dict(cls, data)
    except _KeyError as e:
        raise ConfigError(f"{source}: {e.key}: {e.msg}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass tree -> plain dict of YAML-safe values (tuples become lists); inverse of ``build``."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML file (safe_load), with errors naming the file."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        raw = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections, got {type(raw).__name__}")
    return raw


def is_pipeline(raw: Mapping[str, Any]) -> bool:
    """Whether a config file lists ``stages`` (run by lopd_jax.training.pipeline) instead of describing one run."""
    return "stages" in raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Applies ``a.b.c=value`` overrides (value parsed with yaml.safe_load) to a copy of ``raw``.

    Returns the new dict and {dotted key: the override text} so errors can point at the command line.
    """
    out = _copy(raw)
    origin = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command-line override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"command-line override {item!r}: value is not valid YAML: {e}") from None
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node[leaf] = value
        origin[key] = item
    return out, origin


def _copy(x: Any) -> Any:
    return {k: _copy(v) for k, v in x.items()} if isinstance(x, dict) else x


def _source_of(key: str, origin: Mapping[str, str], path: str) -> str:
    """The override that set ``key`` (or a section above it, or, for an unknown section such as ``trian``, a
    key inside it), else the file."""
    parts = key.replace("[", ".").split(".")
    for n in range(len(parts), 0, -1):
        hit = origin.get(".".join(parts[:n]))
        if hit is not None:
            return f"command-line override {hit!r}"
    inside = [text for k, text in origin.items() if k.startswith(key + ".")]
    if inside:
        return f"command-line override {inside[0]!r}"
    return str(path)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file + ``key.sub=value`` overrides -> a validated, resolved TrainConfig.

    Resolution: ``data.batch_size``/``data.seq_len`` left at 0 take ``train.batch_size``/``train.seq_len``;
    ``lightning_opd`` always requires teacher log-probs on every response token (``data.require_teacher``).
    """
    raw = read_yaml(path)
    if is_pipeline(raw):
        raise ConfigError(f"{path}: lists 'stages': it is a pipeline config (run it with lopd_jax.training.pipeline)")
    raw, origin = apply_overrides(raw, overrides)
    try:
        cfg = from_dict(TrainConfig, raw)
        check_ranges(cfg)  # before resolve: train.batch_size=-4 must be blamed on train, not on data
        return validate(resolve(cfg))
    except _KeyError as e:
        raise ConfigError(f"{_source_of(e.key, origin, str(path))}: {e.key}: {e.msg}") from None


# Allowed ranges of numeric values: (low, high, low_open, high_open); None = unbounded. Every float must also be
# finite (NaN passes no comparison, so it is refused explicitly). Seeds are >= 0 because Grain and numpy refuse
# negative seeds later, mid-run.
_AT_LEAST_0, _AT_LEAST_1, _POSITIVE = (0, None, False, False), (1, None, False, False), (0, None, True, False)
_UNIT, _PROB = (0, 1, False, False), (0, 1, True, False)
RANGES: dict[str, tuple] = {
    "train.steps": _AT_LEAST_1,
    "train.batch_size": _AT_LEAST_1,
    "train.seq_len": _AT_LEAST_1,
    "train.grad_accum": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.eval_every": _AT_LEAST_0,
    "train.seed": _AT_LEAST_0,
    "data.batch_size": _AT_LEAST_0,
    "data.seq_len": _AT_LEAST_0,
    "data.max_response_len": _AT_LEAST_0,
    "data.seed": _AT_LEAST_0,
    "data.num_epochs": _AT_LEAST_1,
    "data.read_threads": _AT_LEAST_0,
    "data.prefetch": _AT_LEAST_0,
    "optimizer.lr": _POSITIVE,
    "optimizer.warmup_steps": _AT_LEAST_0,
    "optimizer.total_steps": _AT_LEAST_0,
    "optimizer.b1": (0, 1, False, True),
    "optimizer.b2": (0, 1, False, True),
    "optimizer.weight_decay": _AT_LEAST_0,
    "optimizer.grad_clip": _AT_LEAST_0,
    "optimizer.eps": _POSITIVE,
    "optimizer.min_lr_ratio": _UNIT,
    "loss.clip_eps_low": (0, 1, False, True),  # the ratio's lower bound 1 - eps must stay > 0
    "loss.clip_eps_high": _AT_LEAST_0,
    "loss.tis_cap": _POSITIVE,
    "loss.logprob_chunk_size": _AT_LEAST_0,
    "sampling.temperature": _AT_LEAST_0,
    "sampling.top_p": _PROB,
    "sampling.top_k": _AT_LEAST_0,
    "sampling.max_new_tokens": _AT_LEAST_1,
    "sampling.stop_token_ids": _AT_LEAST_0,
    "sampling.seed": _AT_LEAST_0,
    "sampling.min_prompt_bucket": _AT_LEAST_1,
    "eval.k": _AT_LEAST_1,
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.num_prompts": _AT_LEAST_0,
    "eval.temperature": _AT_LEAST_0,
    "eval.top_p": _PROB,
    "checkpoint.every_steps": _AT_LEAST_0,
    "checkpoint.keep": _AT_LEAST_0,
    "plan.device_memory_gb": _POSITIVE,
    "data.topk": _AT_LEAST_0,
    "loss.topk": _AT_LEAST_0,
    "loss.sampled_token_weight": _UNIT,
    "sampling.record_topk": _AT_LEAST_0,
    "drift.ref_kl_prompts": _AT_LEAST_0,
    "drift.ref_kl_samples": _AT_LEAST_1,
    "drift.ref_kl_max_new_tokens": _AT_LEAST_0,
    "refresh.every_steps": _AT_LEAST_0,
    "refresh.window": _AT_LEAST_1,
    "refresh.prompts": _POSITIVE,  # a fraction (<= 1.0) of the pool or a count
    "refresh.generation": _AT_LEAST_0,
}


def _range_text(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _check_value(key: str, value: Any, bounds: tuple | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _KeyError(key, f"must be a finite number, got {value}")
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_open, high_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise _KeyError(key, f"must be {_range_text(*bounds)}, got {value}")


def _check_field(key: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, RANGES.get(key))
    elif not dataclasses.is_dataclass(value):
        _check_value(key, value, RANGES.get(key))


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every numeric value within its range (``RANGES``) and every float finite; raises _KeyError naming the
    dotted key. Mesh axis sizes are -1 (all remaining devices) or >= 1."""
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        else:
            _check_field(key, value)
    if prefix == "mesh.":
        for name in ("data", "fsdp", "tensor", "expert"):
            if getattr(cfg, name) != -1 and getattr(cfg, name) < 1:
                raise _KeyError(f"mesh.{name}", f"must be -1 (all remaining devices) or >= 1, got {getattr(cfg, name)}")


def resolve(run_cfg: TrainConfig) -> TrainConfig:
    """Fills derived fields (see ``load_config``); raises _KeyError when explicit values contradict them."""
    data = run_cfg.data
    for name in ("batch_size", "seq_len"):
        want, got = getattr(run_cfg.train, name), getattr(data, name)
        if got and got != want:
            raise _KeyError(f"data.{name}", f"{got} contradicts train.{name} = {want}; set it in train only")
        data = dataclasses.replace(data, **{name: want})
    mode = modes.get(run_cfg.mode)
    if mode.stored_teacher:
        data = dataclasses.replace(data, require_teacher=True)
    if mode.stored_teacher and run_cfg.loss.old_policy == "behavior":
        data = dataclasses.replace(data, require_behavior=True)
    if run_cfg.loss.topk_columns:  # a topk_* objective: the loader reads the store's top-k columns of that source
        data = dataclasses.replace(data, topk_columns=run_cfg.loss.topk_columns, topk=run_cfg.loss.topk)
    return dataclasses.replace(run_cfg, data=data)


def validate(run_cfg: TrainConfig) -> TrainConfig:
    """Cross-section checks that no single section can make; raises _KeyError naming the key."""
    t = run_cfg.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
        if getattr(t, name) < 1:
            raise _KeyError(f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    if t.batch_size % t.grad_accum:
        raise _KeyError("train.grad_accum", f"{t.grad_accum} does not divide train.batch_size {t.batch_size}")
    if not run_cfg.model.init:
        raise _KeyError("model.init", "required: an HF checkpoint directory or a preset name")
    values = flatten(to_dict(run_cfg))
    for key, why in modes.get(run_cfg.mode).requires:
        if not values.get(key):
            raise _KeyError(key, f"required in mode {run_cfg.mode!r}: {why}")
    if run_cfg.loss.objective != "sampled_token" and not modes.get(run_cfg.mode).stored_teacher:
        raise _KeyError(
            "loss.objective",
            f"{run_cfg.loss.objective} reads the teacher's stored top-k scores: mode lightning_opd only",
        )
    known = flatten(to_dict(run_cfg))
    for i, key in enumerate(run_cfg.resume_may_change):
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise _KeyError(f"resume_may_change[{i}]", f"{key!r} is not a config key")
    return run_cfg


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 3}} -> {"train.steps": 3}: the dotted keys a resume compares."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def config_fingerprint(run_cfg: TrainConfig) -> str:
    """sha256 of the resolved config's canonical JSON; saved with the run, exported with its provenance."""
    text = json.dumps(to_dict(run_cfg), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
