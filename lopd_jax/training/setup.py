"""What a training run needs, validated before it writes anything: model config, mesh, tokenizer, store,
provenance (teacher consistency), prompts and eval set. ``lopd_jax.train`` calls ``validated(cfg)`` before it
creates the run directory, so any invalid input ends as one ``error:`` line and an untouched disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lopd_jax.config.errors import TrainError
from lopd_jax.data import prompts
from lopd_jax.data.batch import DataError
from lopd_jax.data.prompts import PromptError
from lopd_jax.inference import evaluation
from lopd_jax.models import grouped_matmul, hf, presets, qwen3
from lopd_jax.parallel import distributed, sharding
from lopd_jax.store import RolloutStore, StoreError, provenance
from lopd_jax.store.provenance import ProvenanceError
from lopd_jax.training import config as config_lib
from lopd_jax.training import drift, modes, refresh, run_dir
from lopd_jax.training.checkpoint import CheckpointCorruptError, CheckpointWriteError
from lopd_jax.training.config import ConfigError, TrainConfig

SCRATCH = "scratch"  # model.init value: random weights of model.config


# Errors that mean "bad input": reported as one line with exit status 2, never as a traceback.
USER_ERRORS = (
    ConfigError,
    ProvenanceError,
    StoreError,
    DataError,
    TrainError,
    CheckpointCorruptError,
    CheckpointWriteError,
    distributed.DistributedError,
)


# ----------------------------------------------------------------------------------------------------------------
# Validation: everything that can fail before the run directory exists
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What ``validated`` found; nothing here has touched the run directory."""

    model_cfg: qwen3.Qwen3Config
    mesh: Any
    rules: dict
    tokenizer_dir: str
    store: RolloutStore | None = None
    manifest: dict = dataclasses.field(default_factory=dict)
    store_identity: dict | None = None  # {"manifest", "content", "samples"}: what resume and the export compare
    init_fingerprint: str | None = None
    init_provenance: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    resume_changes: dict = dataclasses.field(default_factory=dict)  # {dotted key: [saved, now]} allowed on resume
    prompts: list[list[int]] | None = None  # opd
    stop_ids: tuple[int, ...] = ()  # opd and evaluation: where sampling stops (lopd_jax.data.prompts.stop_ids)
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use (online OPD prompts, evaluation)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer


def runtime_knobs(m: config_lib.ModelConfig, **overrides: Any) -> dict[str, Any]:
    """The Qwen3Config runtime knobs ``model.*`` sets, with ``overrides`` (``--plan``'s attention / MoE choice)."""
    return {**config_lib.model_knobs(m), **overrides}


def architecture(init: str, **knobs: Any) -> qwen3.Qwen3Config:
    """An HF checkpoint directory (its config.json only, never the weights) or a preset name (``qwen3-8b``)
    -> Qwen3Config with ``knobs``; ConfigError naming ``model.init`` when it is neither."""
    if (Path(init) / hf.CONFIG_FILE).is_file():
        return hf.load_config(init, **knobs)
    try:
        return presets.get_preset(init, **knobs)
    except KeyError:
        raise ConfigError(
            f"model.init: {init!r} is neither an HF checkpoint directory (no {hf.CONFIG_FILE}) nor a preset "
            f"({sorted(presets.PRESETS)})"
        ) from None


def model_config(run_cfg: TrainConfig, **overrides: Any) -> qwen3.Qwen3Config:
    """The student's Qwen3Config with the config's runtime knobs (and ``overrides``): ``model.config`` (file or
    dir) for scratch, else ``model.init``'s config.json, or a preset's architecture (``--plan`` only; ``validated``
    refuses to train one). The one resolution the trainer, ``--plan`` and the lowering tests share."""
    m = run_cfg.model
    knobs = runtime_knobs(m, **overrides)
    if m.init == SCRATCH:
        if not m.config:
            raise ConfigError("model.config: required when model.init is 'scratch' (an HF config.json)")
        path = Path(m.config)
        file = path / hf.CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"model.config: {file} does not exist")
        return hf.config_from_hf(json.loads(file.read_text()), where=str(file), **knobs)
    return architecture(m.init, **knobs)


def _check_moe_impl(model_cfg: qwen3.Qwen3Config, mesh: Any) -> None:
    """``model.moe_impl`` must be one the mesh's backend can run (triton: NVIDIA GPUs only)."""
    if not model_cfg.num_experts:
        return
    backend = mesh.devices.flat[0].platform
    try:
        grouped_matmul.resolve_moe_impl(model_cfg.moe_impl, backend, model_cfg.pallas_interpret)
    except ValueError as e:
        raise ConfigError(f"model.moe_impl: {e}") from None


def _check_not_preset(run_cfg: TrainConfig) -> None:
    """A preset names an architecture without weights: ``--plan`` compiles it, training cannot start from it."""
    m = run_cfg.model
    if m.init != SCRATCH and not (Path(m.init) / hf.CONFIG_FILE).is_file():
        raise ConfigError(
            f"model.init: {m.init!r} is a preset (an architecture, no weights), which only --plan takes; train from "
            "an HF checkpoint directory, or from 'scratch' with model.config"
        )


def _tokenizer_dir(run_cfg: TrainConfig) -> str:
    tok_dir = run_cfg.model.tokenizer or (run_cfg.model.init if run_cfg.model.init != SCRATCH else None)
    if not tok_dir:
        raise ConfigError("model.tokenizer: required when model.init is 'scratch'")
    if not Path(tok_dir).is_dir():
        raise ConfigError(f"model.tokenizer: {tok_dir} is not a directory")
    return tok_dir


def load_tokenizer(tok_dir: str) -> Any:
    """The HF tokenizer in ``tok_dir`` (``prompts.load_tokenizer``: never runs repository code)."""
    try:
        return prompts.load_tokenizer(tok_dir)
    except PromptError as e:
        raise ConfigError(f"model.tokenizer: {e}") from None


def tokenizer_size(tok_dir: str) -> int:
    """Number of token ids the tokenizer can produce (added tokens included).

    Read with the ``tokenizers`` library from tokenizer.json when there is one: importing transformers costs
    seconds that sft / lightning_opd runs without evaluation never need."""
    file = Path(tok_dir) / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
        except Exception as e:  # the Rust library raises its own exception type for a malformed file
            raise ConfigError(f"model.tokenizer: {file} is not a valid tokenizer.json ({e})") from None
    return len(load_tokenizer(tok_dir))


def _scan_tokens(store: RolloutStore, block: int = 1 << 24) -> tuple[int, int, str]:
    """(largest token id in the store, index of a sample holding it, content fingerprint), reading the tokens
    array once in blocks. The fingerprint hashes the sample offsets, prompt lengths and every token: other rollouts
    at the same path (another seed, temperature, length, prompt set) have another one."""
    best, where = -1, 0
    h = hashlib.sha256()
    h.update(np.asarray(store.offsets, np.int64).tobytes())
    h.update(np.asarray(store.prompt_lengths, np.int64).tobytes())
    for lo in range(0, store.num_tokens, block):
        hi = min(lo + block, store.num_tokens)
        tokens = store.read_array("tokens", lo, hi)  # a damaged chunk: StoreError naming array and sample
        h.update(np.ascontiguousarray(tokens, np.int32).tobytes())
        if tokens.size and int(tokens.max()) > best:
            best = int(tokens.max())
            where = int(np.searchsorted(store.offsets, lo + int(tokens.argmax()), side="right") - 1)
    return best, where, "sha256:" + h.hexdigest()


def _check_store(run_cfg: TrainConfig, setup: Setup) -> None:
    try:
        store = RolloutStore.open(run_cfg.data.store)  # a store, or a sharded dataset (lopd_jax.store.dataset)
    except StoreError as e:
        raise StoreError(f"data.store: {e}") from None
    if (problem := store.incomplete()) is not None:  # a dataset's shard still being written
        raise StoreError(f"data.store: {problem}")
    m = store.manifest
    if len(store) == 0:
        raise StoreError(f"data.store: {store.path} has no committed samples")
    mode = modes.get(run_cfg.mode)
    if mode.stored_teacher and (m.get("teacher") is None or store.teacher_committed < len(store)):
        raise StoreError(
            f"data.store: {store.path} has no teacher columns for every sample (teacher_committed "
            f"{store.teacher_committed} of {len(store)}, teacher {m.get('teacher')}): mode lightning_opd needs "
            "teacher log-probs; run precompute.teacher_logprobs on it"
        )
    if mode.stored_teacher and run_cfg.loss.old_policy == "behavior" and m.get("behavior_logprobs") == "none":
        raise StoreError(
            f"data.store: {store.path} has no behaviour log-probs (manifest behavior_logprobs: none), but "
            "loss.old_policy: behavior takes the PPO ratio against them; use rollouts with recorded log-probs "
            "(precompute.rollouts) or loss.old_policy: current"
        )
    if isinstance(m.get("shard"), dict) and m["shard"].get("count", 1) > 1:
        parent = os.path.dirname(store.path.rstrip("/"))
        raise StoreError(
            f"data.store: {store.path} is shard {m['shard'].get('index')} of {m['shard']['count']} of the dataset "
            f"{parent}; training on it alone would use part of the data: set data.store: {parent}"
        )
    used = min(int(store.lengths.max()), run_cfg.train.seq_len)  # positions restart per packed sample
    if used > setup.model_cfg.max_position_embeddings:
        i = int(np.argmax(store.lengths))
        raise StoreError(
            f"data.store: {store.path} sample {i} has {int(store.lengths[i])} tokens and train.seq_len is "
            f"{run_cfg.train.seq_len}: positions up to {used - 1} exceed the model's max_position_embeddings "
            f"{setup.model_cfg.max_position_embeddings}; lower train.seq_len to at most that"
        )
    if modes.get(run_cfg.mode).stored_teacher and run_cfg.loss.objective != "sampled_token":
        _check_topk_columns(run_cfg, store, m, setup.model_cfg.vocab_size)
    top, sample, content = _scan_tokens(store)
    if top >= setup.model_cfg.vocab_size:
        raise StoreError(
            f"vocab size mismatch: data.store {store.path} sample {sample} has token id {top}, but the model's "
            f"vocab_size is {setup.model_cfg.vocab_size}"
        )
    setup.store, setup.manifest = store, m
    setup.store_identity = run_dir.store_identity(m, content, len(store))
    _check_store_tokenizer(store.path, m, setup.tokenizer_dir)


def _check_topk_columns(run_cfg: TrainConfig, store, m: dict, vocab_size: int) -> None:
    """A topk_* objective needs the store's top-k columns of its source, of width loss.topk <= the vocabulary."""
    k, obj = run_cfg.loss.topk, run_cfg.loss.objective
    if k > vocab_size:
        raise ConfigError(f"loss.topk {k} > the model's vocabulary ({vocab_size} ids)")
    if obj == "topk_reverse_kl":
        have, key = getattr(store, "behavior_topk", 0), "behavior_topk"
        make = (
            f"sample the rollouts with precompute.rollouts --record-topk {k}, then score them with "
            "precompute.teacher_logprobs --engine jax"
        )
        missing = "behavior_topk_ids"  # with it, the teacher pass always writes teacher_behavior_topk_*
    else:
        have, key = store.topk, "topk"
        make = f"score the rollouts with precompute.teacher_logprobs --top-k {k} --engine jax (--out a new store)"
        missing = "teacher_topk_ids" if not have else "teacher_topk_tail"
        if have and not m.get("topk_tail"):  # a top-k store made before the tail column existed
            raise StoreError(
                f"data.store: {store.path} has teacher_topk_ids but no teacher_topk_tail column, which loss.objective "
                f"{obj} needs: {make}"
            )
    if not have:
        raise StoreError(f"data.store: {store.path} has no {missing} column, which loss.objective {obj} needs: {make}")
    if have != k:
        raise StoreError(f"data.store: {store.path} has {key} {have}, but loss.topk is {k}; set loss.topk: {have}")


def _check_store_tokenizer(store_path: str, manifest: dict, tok_dir: str) -> None:
    """The store's token ids mean what the trainer's tokenizer says they mean: same vocabulary, merges and special
    tokens (``tokenizer`` fingerprint) and, when the prompts were chat-encoded, the same chat template (the
    exported model ships this tokenizer's template, so a different one would serve another prompt format)."""
    ours = provenance.fingerprint_tokenizer(tok_dir)
    theirs = manifest.get("tokenizer")
    if theirs != ours:
        raise ProvenanceError(
            f"tokenizer mismatch: data.store {store_path} was made with tokenizer {theirs}, but the tokenizer in "
            f"{tok_dir} is {ours}; its token ids would be read with another vocabulary"
        )
    template = manifest.get("chat_template")
    ours_template = provenance.fingerprint_chat_template(tok_dir)
    if template is not None and template != ours_template:
        raise ProvenanceError(
            f"chat template mismatch: data.store {store_path} encoded its prompts with chat template {template}, "
            f"but the tokenizer in {tok_dir} has chat template {ours_template}"
        )


def _check_teacher_consistency(run_cfg: TrainConfig, setup: Setup) -> None:
    """Lightning OPD's rules (docs/design.md "Provenance"): raise ProvenanceError, or collect the allowed warnings."""
    allow = run_cfg.allow_teacher_inconsistency
    for warning in (
        provenance.check_teacher_consistency(setup.manifest, setup.init_provenance, allow),
        # pi_ref for the first generation; a refreshed generation's rollouts come from the exported student
        provenance.check_rollout_policy(setup.manifest, refresh.rollout_policy(run_cfg, setup.init_fingerprint), allow),
    ):
        if warning:
            setup.warnings.append(warning)


def _check_teacher_model(run_cfg: TrainConfig, setup: Setup) -> None:
    teacher = run_cfg.model.teacher
    if not (Path(teacher) / hf.CONFIG_FILE).is_file():
        raise ConfigError(f"model.teacher: {teacher} is not an HF checkpoint directory")
    tcfg = hf.load_config(teacher)
    if tcfg.vocab_size != setup.model_cfg.vocab_size:
        raise ConfigError(
            f"vocab size mismatch: model.teacher {teacher} has vocab_size {tcfg.vocab_size}, the student "
            f"{setup.model_cfg.vocab_size}"
        )
    _check_weights(teacher, tcfg, "model.teacher")
    provenance.check_same_tokenizer(
        provenance.fingerprint_tokenizer(teacher),
        provenance.fingerprint_tokenizer(setup.tokenizer_dir),
        f"model.teacher {teacher}",
        f"student ({setup.tokenizer_dir})",
    )


def _check_weights(path: str, model_cfg: qwen3.Qwen3Config, key: str) -> None:
    """Every tensor the model needs is in a present safetensors file with the shape config.json implies."""
    try:
        hf.check_checkpoint(path, model_cfg)
    except hf.CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None


def _generation_dir(run_cfg: TrainConfig, setup: Setup) -> str:
    """The directory whose generation_config.json / config.json names the student's eos ids (``prompts.stop_ids``):
    the init checkpoint, or the tokenizer's directory for a student trained from scratch."""
    return run_cfg.model.init if run_cfg.model.init != SCRATCH else setup.tokenizer_dir


def _check_prompts(run_cfg: TrainConfig, setup: Setup) -> None:
    """Online OPD's prompts, encoded with ``lopd_jax.data.prompts`` (the precompute rollouts' encoder)."""
    try:
        rows = prompts.read_prompts(run_cfg.data.prompts, prompt_key=run_cfg.data.prompt_key)
        setup.prompts = prompts.encode_prompts(setup.tokenizer, rows, run_cfg.prompt)
    except (OSError, ValueError) as e:  # PromptError, or the chat template's own error
        raise ConfigError(f"data.prompts: {e}") from None


def _check_stop_ids(run_cfg: TrainConfig, setup: Setup) -> None:
    """Where online OPD and evaluation stop sampling: ``prompts.stop_ids`` plus ``sampling.stop_token_ids``."""
    try:
        setup.stop_ids = prompts.stop_ids(
            _generation_dir(run_cfg, setup), setup.tokenizer, run_cfg.sampling.stop_token_ids
        )
    except PromptError as e:
        raise ConfigError(f"model.init: {e}") from None


def _check_eval_set(run_cfg: TrainConfig, setup: Setup) -> None:
    try:
        rows = evaluation.load_eval_set(run_cfg.eval.prompts, run_cfg.eval.prompt_key, run_cfg.eval.answer_key)
        rows = rows[: run_cfg.eval.num_prompts] if run_cfg.eval.num_prompts > 0 else rows
        prompts.encode_prompts(setup.tokenizer, rows, run_cfg.prompt)  # a row the tokenizer cannot encode fails now
    except (OSError, ValueError) as e:  # PromptError, or the chat template's own error
        raise ConfigError(f"eval.prompts: {e}") from None


def check_expert_axis(mesh_cfg: sharding.MeshConfig, model_cfg: qwen3.Qwen3Config, num_devices: int) -> None:
    """Expert parallelism places whole experts per device: ConfigError naming mesh.expert when its size does not
    divide the model's expert count (checked before anything compiles, by the trainer and by --plan)."""
    try:
        why = sharding.check_expert_axis(mesh_cfg, num_devices, model_cfg.num_experts)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    if why:
        raise ConfigError(f"mesh.expert: {why}")


def _check_shapes(run_cfg: TrainConfig, setup: Setup) -> None:
    shards = sharding.batch_shard_count(setup.mesh, setup.rules)
    if run_cfg.train.batch_size % shards or run_cfg.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size: {run_cfg.train.batch_size} must be a multiple of the batch shards ({shards}) and "
            f"of the JAX processes ({jax.process_count()})"
        )
    if (run_cfg.train.batch_size // run_cfg.train.grad_accum) % shards:
        raise ConfigError(
            f"train.grad_accum: micro-batches of {run_cfg.train.batch_size // run_cfg.train.grad_accum} rows do "
            f"not split over the {shards} batch shards"
        )


def _prepare(run_cfg: TrainConfig) -> Setup:
    """Validates the whole run (config, mesh, model, tokenizer, store, provenance) without writing anything."""
    model_cfg = model_config(run_cfg)
    _check_not_preset(run_cfg)
    try:
        mesh = sharding.make_mesh(run_cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    check_expert_axis(run_cfg.mesh, model_cfg, mesh.size)
    tok_dir = _tokenizer_dir(run_cfg)
    setup = Setup(model_cfg, mesh, run_cfg.mesh.logical_rules(), tok_dir)
    n_tokens = tokenizer_size(tok_dir)
    if n_tokens > model_cfg.vocab_size:
        raise ConfigError(
            f"vocab size mismatch: the tokenizer in {tok_dir} has {n_tokens} tokens, the model's vocab_size "
            f"is {model_cfg.vocab_size}"
        )
    _check_shapes(run_cfg, setup)
    _check_moe_impl(model_cfg, mesh)
    run_dir.check_writable(run_cfg)
    run_dir.check_run_dir(run_cfg)
    if run_cfg.resume:
        setup.resume_changes = run_dir.check_resume_config(run_cfg)
    if run_cfg.model.init != SCRATCH:
        _check_weights(run_cfg.model.init, model_cfg, "model.init")
        setup.init_fingerprint = provenance.fingerprint_weights(run_cfg.model.init)
        setup.init_provenance = provenance.read_provenance(run_cfg.model.init)
    mode = modes.get(run_cfg.mode)
    if mode.reads_store:
        _check_store(run_cfg, setup)
        if run_cfg.resume:
            run_dir.check_resume_store(run_cfg, setup.store_identity)
    if mode.stored_teacher:
        if setup.init_fingerprint is None:
            raise ConfigError("model.init: lightning_opd starts from the SFT checkpoint, not from scratch")
        _check_teacher_consistency(run_cfg, setup)
    if mode.live_teacher:
        _check_teacher_model(run_cfg, setup)
    if mode.samples_online:
        _check_prompts(run_cfg, setup)
    if run_cfg.eval.prompts:
        _check_eval_set(run_cfg, setup)
    drift.check(run_cfg)
    if mode.samples_online or run_cfg.eval.prompts:
        _check_stop_ids(run_cfg, setup)
    return setup


def validated(run_cfg: TrainConfig) -> Setup:
    """The one entry point: validates the whole run (``_prepare``), with any other ValueError / OSError (an
    unsupported config.json, an unreadable file) turned
    into a ConfigError, so that every invalid input ends as one ``error:`` line."""
    try:
        return _prepare(run_cfg)
    except USER_ERRORS:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"{type(e).__name__}: {e}") from None
