"""Hugging Face checkpoints <-> (Qwen3Config, params): config.json mapping and safetensors load/save.

Loading streams one tensor at a time (``safe_open``) and builds every leaf with
``jax.make_array_from_callback``, so each device only receives its own shard and the host holds about one
leaf at a time, never the whole model. Saving writes ``model-0000i-of-0000n.safetensors`` files of at most
``max_shard_bytes`` plus ``model.safetensors.index.json``, in the per-expert MoE key format that the released
Qwen3-MoE checkpoints and transformers' ``save_pretrained`` use.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lopd_jax.models.qwen3_specs import Params, Qwen3Config, param_specs
from lopd_jax.parallel import sharding
from lopd_jax.parallel.sharding import ParamSpec, is_param_spec

CONFIG_FILE, INDEX_FILE, SINGLE_FILE = "config.json", "model.safetensors.index.json", "model.safetensors"
_ARCH = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# --------------------------------------------------------------------------- config.json


def _rope_theta(hf: dict, where: str) -> float:
    """rope_theta from either the released format (rope_theta + rope_scaling) or transformers 5's rope_parameters."""
    if hf.get("rope_scaling") is not None:
        raise ValueError(f"{where}: rope_scaling={hf['rope_scaling']!r} is not supported (only plain RoPE)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope.get("type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters={rope!r} is not supported (only rope_type 'default')")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _refuse_unsupported(hf: dict, where: str) -> None:
    """Fields that would change the math and are not implemented fail loudly instead of being ignored."""
    if hf.get("model_type") not in _ARCH:
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; expected one of {sorted(_ARCH)}")
    checks = [
        ("use_sliding_window", False, "sliding-window attention is not implemented"),
        ("attention_bias", False, "q/k/v/o biases are not implemented"),
        ("hidden_act", "silu", "only the SiLU-gated MLP is implemented"),
        ("attention_dropout", 0.0, "attention dropout is not implemented"),
    ]
    for field, ok, why in checks:
        if field in hf and hf[field] != ok:
            raise ValueError(f"{where}: {field}={hf[field]!r} is not supported ({why})")


def config_from_hf(hf: dict, where: str = CONFIG_FILE, **overrides: Any) -> Qwen3Config:
    """An HF config.json dict (Qwen3 or Qwen3-MoE) -> Qwen3Config; ``overrides`` set runtime fields."""
    _refuse_unsupported(hf, where)
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf, where),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
    if hf["model_type"] == "qwen3_moe":
        fields.update(
            num_experts=hf.get("num_experts", hf.get("num_local_experts", 128)),
            num_experts_per_tok=hf.get("num_experts_per_tok", 8),
            moe_intermediate_size=hf.get("moe_intermediate_size", 768),
            norm_topk_prob=hf.get("norm_topk_prob", False),
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        )
    return Qwen3Config(**fields, **overrides)


def config_to_hf(cfg: Qwen3Config, torch_dtype: str) -> dict:
    """Qwen3Config -> config.json dict in the released Qwen3 / Qwen3-MoE format."""
    moe = cfg.num_experts > 0
    hf: dict[str, Any] = {
        "architectures": [_ARCH["qwen3_moe" if moe else "qwen3"]],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _jsonable(cfg.eos_token_id),
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if moe:
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
        )
    return hf


def _jsonable(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def load_config(path: str, **overrides: Any) -> Qwen3Config:
    """Read ``path/config.json`` into a Qwen3Config."""
    file = os.path.join(path, CONFIG_FILE)
    with open(file) as f:
        return config_from_hf(json.load(f), where=file, **overrides)


# --------------------------------------------------------------------------- key mapping


class _Rule(NamedTuple):
    """How one param leaf maps to HF tensors: key template, and the two per-tensor layout transforms."""

    key: str  # formatted with i (global layer), e (expert)
    to_ours: Callable[[np.ndarray, Qwen3Config], np.ndarray]
    to_hf: Callable[[np.ndarray, Qwen3Config], np.ndarray]


def _t(w: np.ndarray, cfg: Qwen3Config) -> np.ndarray:
    return w.T


def _same(w: np.ndarray, cfg: Qwen3Config) -> np.ndarray:
    return w


def _heads_in(n: str) -> Callable:  # torch Linear [n*H, D] -> ours [D, n, H]
    return lambda w, cfg: w.T.reshape(cfg.hidden_size, getattr(cfg, n), cfg.head_dim)


def _heads_out(w: np.ndarray, cfg: Qwen3Config) -> np.ndarray:  # ours [D, n, H] -> torch [n*H, D]
    return w.reshape(w.shape[0], -1).T


_ATTN = "model.layers.{i}.self_attn."
_RULES: dict[tuple[str, str], _Rule] = {
    ("", "embed"): _Rule("model.embed_tokens.weight", _same, _same),
    ("", "final_norm"): _Rule("model.norm.weight", _same, _same),
    ("", "lm_head"): _Rule("lm_head.weight", _t, _t),
    ("layers", "attn_norm"): _Rule("model.layers.{i}.input_layernorm.weight", _same, _same),
    ("layers", "mlp_norm"): _Rule("model.layers.{i}.post_attention_layernorm.weight", _same, _same),
    ("layers", "q"): _Rule(_ATTN + "q_proj.weight", _heads_in("num_attention_heads"), _heads_out),
    ("layers", "k"): _Rule(_ATTN + "k_proj.weight", _heads_in("num_key_value_heads"), _heads_out),
    ("layers", "v"): _Rule(_ATTN + "v_proj.weight", _heads_in("num_key_value_heads"), _heads_out),
    ("layers", "o"): _Rule(
        _ATTN + "o_proj.weight",
        lambda w, cfg: w.T.reshape(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size),
        lambda w, cfg: w.reshape(-1, w.shape[-1]).T,
    ),
    ("layers", "q_norm"): _Rule(_ATTN + "q_norm.weight", _same, _same),
    ("layers", "k_norm"): _Rule(_ATTN + "k_norm.weight", _same, _same),
    ("mlp", "gate"): _Rule("model.layers.{i}.mlp.gate_proj.weight", _t, _t),
    ("mlp", "up"): _Rule("model.layers.{i}.mlp.up_proj.weight", _t, _t),
    ("mlp", "down"): _Rule("model.layers.{i}.mlp.down_proj.weight", _t, _t),
    ("moe", "router"): _Rule("model.layers.{i}.mlp.gate.weight", _t, _t),
    ("moe", "gate"): _Rule("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", _t, _t),
    ("moe", "up"): _Rule("model.layers.{i}.mlp.experts.{e}.up_proj.weight", _t, _t),
    ("moe", "down"): _Rule("model.layers.{i}.mlp.experts.{e}.down_proj.weight", _t, _t),
}


def _stack_depth(group: str, name: str) -> int:
    """Leading leaf axes that index separate HF tensors (layer, then expert)."""
    if not group:
        return 0
    return 2 if group == "moe" and name != "router" else 1


def _layer_ids(cfg: Qwen3Config, group: str) -> tuple[int, ...]:
    return {"layers": tuple(range(cfg.num_hidden_layers)), "mlp": cfg.dense_layers, "moe": cfg.moe_layers}[group]


def _hf_key(cfg: Qwen3Config, group: str, name: str, idx: tuple[int, ...]) -> str:
    i = _layer_ids(cfg, group)[idx[0]] if idx else None
    return _RULES[group, name].key.format(i=i, e=idx[1] if len(idx) > 1 else None)


def _leaves(cfg: Qwen3Config) -> Iterator[tuple[str, str, ParamSpec]]:
    for group, sub in param_specs(cfg).items():
        if is_param_spec(sub):
            yield "", group, sub
        else:
            for name, spec in sub.items():
                yield group, name, spec


# --------------------------------------------------------------------------- load


class CheckpointError(ValueError):
    """A broken HF checkpoint directory; the message names the file and the tensor."""


def _expected_hf_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: the shape config.json implies}, traced abstractly (nothing allocated)."""
    out = {}
    for group, name, spec in _leaves(cfg):
        depth, rule = _stack_depth(group, name), _RULES[group, name]
        one = jax.ShapeDtypeStruct(spec.shape[depth:], jnp.float32)
        shape = tuple(jax.eval_shape(lambda w, rule=rule: rule.to_hf(w, cfg), one).shape)
        for idx in np.ndindex(*spec.shape[:depth]):
            out[_hf_key(cfg, group, name, idx)] = shape
    return out


def _header_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from one safetensors header (reads no tensor data)."""
    try:
        with safe_open(file, framework="np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a truncated or garbled header
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def check_checkpoint(path: str, cfg: Qwen3Config) -> None:
    """Raises CheckpointError naming the file and tensor when ``path`` cannot hold ``cfg``'s weights: a shard the
    index lists is missing or unreadable, a tensor is missing, or its shape disagrees with config.json."""
    try:
        reader = _Reader(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors index ({e})") from None
    except Exception as e:  # a single-file checkpoint: safetensors' own error types for a garbled header
        raise CheckpointError(f"{path}: unreadable safetensors file {SINGLE_FILE} ({e})") from None
    reader.close()
    headers = {}
    for file in sorted(set(reader.weight_map.values())):
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            first = next(k for k, v in sorted(reader.weight_map.items()) if v == file)
            raise CheckpointError(f"{full}: safetensors shard is missing ({INDEX_FILE} lists tensor {first!r} in it)")
        headers[file] = _header_shapes(full)
    for key, want in _expected_hf_shapes(cfg).items():
        file = reader.weight_map.get(key)
        if file is None:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise CheckpointError(f"{path}: tensor {key!r} is missing from the checkpoint")
        got = headers[file].get(key)
        if got is None:
            raise CheckpointError(f"{os.path.join(path, file)}: tensor {key!r} is listed in {INDEX_FILE} but absent")
        if got != want:
            raise CheckpointError(
                f"{os.path.join(path, file)}: tensor {key!r} has shape {list(got)}, but {CONFIG_FILE} implies "
                f"{list(want)}"
            )


class _Reader:
    """Lazily opened safetensors files of one checkpoint; reads a single tensor at a time."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            with safe_open(os.path.join(path, SINGLE_FILE), framework="np") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.path, self._files, self._handles = path, contextlib.ExitStack(), {}

    def _open(self, file: str, framework: str):
        if (file, framework) not in self._handles:
            handle = safe_open(os.path.join(self.path, file), framework=framework)
            self._handles[file, framework] = self._files.enter_context(handle)
        return self._handles[file, framework]

    def read(self, key: str, dtype: np.dtype) -> np.ndarray:
        if key not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
        file = self.weight_map[key]
        f = self._open(file, "np")
        if f.get_slice(key).get_dtype() != "BF16":
            return f.get_tensor(key).astype(dtype, copy=False)
        # numpy has no bfloat16: read through the flax backend, kept on the host CPU device.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(self._open(file, "flax").get_tensor(key)).astype(dtype, copy=False)

    def close(self) -> None:
        self._files.close()


def _leaf_blocks(reader, cfg, group, name, spec, indices, dtype) -> list[np.ndarray]:
    """Blocks ``indices`` (tuples of slices) of one leaf, filled from the HF tensors they overlap.

    Every needed tensor is read once, however many blocks (devices) it feeds, and freed before the next read.
    Blocks are fresh arrays, never views: on the CPU backend a device buffer may alias the array it is made
    from, and a view would pin the whole tensor.
    """
    depth, rule = _stack_depth(group, name), _RULES[group, name]
    ranges = [[range(*s.indices(n)) for s, n in zip(index, spec.shape)] for index in indices]
    blocks = [np.empty(tuple(len(r) for r in rs), dtype) for rs in ranges]
    needed = sorted({idx for rs in ranges for idx in itertools.product(*rs[:depth])})
    for idx in needed:
        tensor = rule.to_ours(reader.read(_hf_key(cfg, group, name, idx), dtype), cfg)
        for block, rs in zip(blocks, ranges):
            if all(i in r for i, r in zip(idx, rs)):
                rest = tuple(slice(r.start, r.stop, r.step) for r in rs[depth:])
                block[tuple(r.index(i) for i, r in zip(idx, rs))] = tensor[rest]
    return blocks


def _check_keys(reader: _Reader, cfg: Qwen3Config) -> None:
    expected = set()
    for group, name, spec in _leaves(cfg):
        for idx in np.ndindex(*spec.shape[: _stack_depth(group, name)]):
            expected.add(_hf_key(cfg, group, name, idx))
    present = set(reader.weight_map)
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the (identical) copy anyway
    if missing := sorted(expected - present):
        raise ValueError(f"{reader.path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    if unexpected := sorted(present - expected):
        raise ValueError(f"{reader.path}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")


def _default_shardings(cfg: Qwen3Config, mesh: Any) -> Params | None:
    if mesh is None:
        return None
    return sharding.shardings(param_specs(cfg), mesh)


def load_hf(
    path: str, mesh: Any = None, dtype: Any = jnp.float32, shardings: Params | None = None
) -> tuple[Qwen3Config, Params]:
    """HF checkpoint directory -> (Qwen3Config, params) with leaves of ``dtype``.

    With a mesh (or an explicit ``shardings`` tree of NamedSharding), every leaf is built by
    ``jax.make_array_from_callback``: each device's block is read from only the tensors it overlaps.
    """
    cfg = load_config(path, param_dtype=jnp.dtype(dtype).name)
    shardings = shardings if shardings is not None else _default_shardings(cfg, mesh)
    check_checkpoint(path, cfg)
    reader = _Reader(path)
    try:
        _check_keys(reader, cfg)
        params: Params = {}
        for group, name, spec in _leaves(cfg):
            leaf = _load_leaf(reader, cfg, group, name, spec, jnp.dtype(dtype), shardings)
            (params.setdefault(group, {}) if group else params)[name] = leaf
    finally:
        reader.close()
    return cfg, params


def _load_leaf(reader, cfg, group, name, spec, dtype, shardings) -> jax.Array:
    leaf_sharding = (shardings[group][name] if group else shardings[name]) if shardings is not None else None
    full = (slice(None),) * len(spec.shape)
    if leaf_sharding is None:
        return jnp.asarray(_leaf_blocks(reader, cfg, group, name, spec, [full], dtype)[0])
    # Replicated devices share a block: build each distinct block once, then hand them out per device.
    indices = {_index_key(i): i for i in leaf_sharding.addressable_devices_indices_map(spec.shape).values()}
    blocks = dict(zip(indices, _leaf_blocks(reader, cfg, group, name, spec, list(indices.values()), dtype)))
    return jax.make_array_from_callback(spec.shape, leaf_sharding, lambda index: blocks[_index_key(index)])


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


# --------------------------------------------------------------------------- save


class _Tensor(NamedTuple):
    key: str
    group: str
    name: str
    idx: tuple[int, ...]
    nbytes: int


def _save_plan(cfg: Qwen3Config, itemsize: int) -> list[_Tensor]:
    """Every HF tensor, in the conventional order (embeddings, layer by layer, final norm, lm_head)."""
    plan = []
    for group, name, spec in _leaves(cfg):
        depth = _stack_depth(group, name)
        size = int(np.prod(spec.shape[depth:])) * itemsize
        for idx in np.ndindex(*spec.shape[:depth]):
            plan.append(_Tensor(_hf_key(cfg, group, name, idx), group, name, idx, size))

    def order(t: _Tensor) -> tuple:
        layer = _layer_ids(cfg, t.group)[t.idx[0]] if t.idx else (-1 if t.name == "embed" else 10**9)
        return (layer, t.idx[1:], t.key)

    return sorted(plan, key=order)


def _split_shards(plan: list[_Tensor], max_shard_bytes: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


class _HostSlabs:
    """Fetches one layer slab of a leaf to the host at a time (all experts of a layer in one transfer)."""

    def __init__(self, params: Params, dtype: np.dtype):
        self.params, self.dtype, self.key, self.slab = params, dtype, None, None

    def get(self, t: _Tensor) -> np.ndarray:
        leaf = self.params[t.group][t.name] if t.group else self.params[t.name]
        key = (t.group, t.name, t.idx[:1])
        if key != self.key:
            self.key, self.slab = key, _to_numpy(leaf[t.idx[0]] if t.idx else leaf).astype(self.dtype)
        return self.slab[t.idx[1]] if len(t.idx) > 1 else self.slab


def save_hf(
    path: str,
    cfg: Qwen3Config,
    params: Params,
    max_shard_bytes: int = 5 * 2**30,
    dtype: Any = None,
) -> str:
    """Write params as an HF checkpoint directory (safetensors shards + index, config, generation config).

    ``dtype`` (default: the params' own dtype) is the stored dtype. At most one shard file's tensors are on
    the host at a time. Returns ``path``.
    """
    dtype = np.dtype(dtype or params["embed"].dtype)
    torch_dtype = _TORCH_DTYPE.get("bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.name)
    if torch_dtype is None:
        raise ValueError(f"save_hf: dtype {dtype} has no HF equivalent")
    os.makedirs(path, exist_ok=True)
    shards = _split_shards(_save_plan(cfg, dtype.itemsize), max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    slabs, weight_map = _HostSlabs(params, dtype), {}
    for name, shard in zip(names, shards):
        tensors = {t.key: np.ascontiguousarray(_RULES[t.group, t.name].to_hf(slabs.get(t), cfg)) for t in shard}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({t.key: name for t in shard})
    if len(shards) > 1:
        total = sum(t.nbytes for shard in shards for t in shard)
        _write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(path, CONFIG_FILE), config_to_hf(cfg, torch_dtype))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": _jsonable(cfg.eos_token_id)}
    _write_json(os.path.join(path, "generation_config.json"), {k: v for k, v in generation.items() if v is not None})
    return path


def _write_json(file: str, obj: Any) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


__all__ = ["CheckpointError", "check_checkpoint", "config_from_hf", "config_to_hf", "load_config", "load_hf", "save_hf"]
