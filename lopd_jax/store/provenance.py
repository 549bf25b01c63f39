"""Provenance: content fingerprints of weights, tokenizer and chat template, and the teacher-consistency checks.

Fingerprints are ``"sha256:<hex>"`` strings that identify content, not paths:

* weights: over every tensor of every ``*.safetensors`` file in the directory, sorted by tensor name, the line
  ``name, dtype, shape, sha256(raw tensor bytes)``. Changing any weight changes it; re-sharding the same tensors
  into different files does not. Tensor bytes are streamed (never materialised), and the per-file digests are
  cached on (absolute path, size, mtime, inode, ctime) in a small JSON file, so an unchanged checkpoint costs a
  ``stat``.
* tokenizer: the canonical JSON of ``tokenizer.json`` (or the raw vocab/merges/sentencepiece files) plus the
  special tokens of ``tokenizer_config.json`` / ``special_tokens_map.json``.
* chat template: the template text (``chat_template.jinja``, ``tokenizer_config.json`` or ``chat_template.json``).

Who records what (docs/design.md): SFT data records ``sft_teacher`` in its store manifest; the SFT checkpoint records
``sft_teacher`` in ``lopd_provenance.json`` beside its weights (``write_provenance``); a rollout store records
``policy`` (weights fingerprint of the rollout model), ``tokenizer`` and ``chat_template``; teacher columns record
``teacher``. The cache lives at ``$LOPD_JAX_FINGERPRINT_CACHE`` or ``$XDG_CACHE_HOME/lopd_jax/fingerprints.json``
(model directories are often read-only, so nothing is written beside them except by ``write_provenance``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

from lopd_jax.atomic import write_atomic

PROVENANCE_FILE = "lopd_provenance.json"
CACHE_ENV = "LOPD_JAX_FINGERPRINT_CACHE"
_BLOCK = 1 << 24  # bytes hashed per read: bounded memory for multi-GB shards
_TOKENIZER_FALLBACK_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "additional_special_tokens",
    "extra_special_tokens",
)


class ProvenanceError(ValueError):
    """Missing or inconsistent provenance; the message names both fingerprints (or the file)."""


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------------------------ cache


def cache_path() -> Path:
    """Where per-file digests are cached (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lopd_jax" / "fingerprints.json"


def _file_key(path: Path) -> str:
    st = path.stat()
    # The inode and ctime too: mtime can be set (cp -p, rsync -t) or coarse (1 s on some NFS servers) and a clock can
    # jump back, but a file replaced by rename has a new inode and any write moves ctime, which no user can set.
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # a missing or corrupt cache only costs a recomputation


def _save_cache(updates: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {**_load_cache(), **updates}  # re-read: another process may have added entries meanwhile
        write_atomic(path, json.dumps(cache), durable=False)  # a cache: losing it only costs a recomputation
    except OSError:
        pass  # read-only home: fingerprints stay correct, just not cached


# ------------------------------------------------------------------------------------------------ weights


def _read_header(f, path: Path) -> tuple[dict, int]:
    """The safetensors header (8-byte little-endian length, then JSON) and the offset where data starts."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ProvenanceError(f"{path}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(n))
    except ValueError as e:
        raise ProvenanceError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_digests(path: str | os.PathLike) -> list[list]:
    """[[name, dtype, shape, sha256 hex of the raw bytes], ...] sorted by name, for one safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    out = []
    with open(path, "rb") as f:
        header, base = _read_header(f, path)
        for name in sorted(header):
            info = header[name]
            start, end = info["data_offsets"]
            if base + end > size:
                raise ProvenanceError(f"{path}: tensor {name!r} ends at byte {base + end}, file has {size} (truncated)")
            f.seek(base + start)
            h = hashlib.sha256()
            for pos in range(start, end, _BLOCK):
                h.update(f.read(min(_BLOCK, end - pos)))
            out.append([name, info["dtype"], list(info["shape"]), h.hexdigest()])
    return out


def fingerprint_weights(model_dir: str | os.PathLike) -> str:
    """Content fingerprint of every tensor in ``model_dir/*.safetensors`` (cached on path, size, mtime)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ProvenanceError(f"{model_dir}: no *.safetensors files to fingerprint")
    cache, updates, rows = _load_cache(), {}, {}
    for path in files:
        key = "weights|" + _file_key(path)
        digests = cache.get(key)
        if digests is None:
            digests = updates[key] = tensor_digests(path)
        for name, *rest in digests:
            if name in rows:
                raise ProvenanceError(f"{model_dir}: tensor {name!r} appears in more than one safetensors file")
            rows[name] = rest
    if updates:
        _save_cache(updates)
    return _sha(_canonical(sorted([name, *rest] for name, rest in rows.items())))


# ------------------------------------------------------------------------------------------------ tokenizer


def _json_file(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ProvenanceError(f"{path}: not valid JSON ({e})") from None


def fingerprint_tokenizer(model_dir: str | os.PathLike) -> str:
    """Fingerprint of the tokenizer (vocabulary, merges, normalisation, added tokens) and its special tokens."""
    d = Path(model_dir)
    if (d / "tokenizer.json").exists():
        body = {"tokenizer.json": _sha(_canonical(_json_file(d / "tokenizer.json")))}
    else:
        body = {n: _sha((d / n).read_bytes()) for n in _TOKENIZER_FALLBACK_FILES if (d / n).exists()}
    if not body:
        raise ProvenanceError(f"{d}: no tokenizer.json (nor {', '.join(_TOKENIZER_FALLBACK_FILES)}) to fingerprint")
    config = _json_file(d / "tokenizer_config.json")
    body["special_tokens"] = {k: config[k] for k in _SPECIAL_KEYS if k in config}
    body["special_tokens_map"] = _json_file(d / "special_tokens_map.json")
    return _sha(_canonical(body))


def read_chat_template(model_dir: str | os.PathLike) -> str | None:
    """The chat template text saved with a tokenizer, or None when it has none."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        template = _json_file(d / name).get("chat_template")
        if template is not None:  # may be a list of named templates: canonical JSON keeps it exact
            return template if isinstance(template, str) else _canonical(template).decode("utf-8")
    return None


def fingerprint_text(text: str) -> str:
    """Fingerprint of a string (e.g. a chat template given on the command line)."""
    return _sha(text.encode("utf-8"))


def fingerprint_chat_template(model_dir: str | os.PathLike) -> str | None:
    """Fingerprint of the directory's chat template; None when it has none."""
    template = read_chat_template(model_dir)
    return None if template is None else fingerprint_text(template)


def fingerprint_model(model_dir: str | os.PathLike) -> dict[str, str | None]:
    """{"weights", "tokenizer", "chat_template"} fingerprints of an HF model directory."""
    return {
        "weights": fingerprint_weights(model_dir),
        "tokenizer": fingerprint_tokenizer(model_dir),
        "chat_template": fingerprint_chat_template(model_dir),
    }


# ------------------------------------------------------------------------------------------------ records


def write_provenance(model_dir: str | os.PathLike, **fields) -> dict:
    """Merge ``fields`` (e.g. sft_teacher=fingerprint) into ``model_dir/lopd_provenance.json``; returns it all."""
    path = Path(model_dir) / PROVENANCE_FILE
    record = {**read_provenance(model_dir), **fields, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(path, json.dumps(record, indent=1, sort_keys=True))
    return record


def read_provenance(model_dir: str | os.PathLike) -> dict:
    """The ``lopd_provenance.json`` record beside the weights; {} when there is none."""
    return _json_file(Path(model_dir) / PROVENANCE_FILE)


# ------------------------------------------------------------------------------------------------ checks


def _refuse_or_allow(message: str, allow: bool) -> str:
    if not allow:
        raise ProvenanceError(message + " (set allow_teacher_inconsistency: true to run anyway, e.g. for ablations)")
    return "ALLOWED TEACHER INCONSISTENCY: " + message


def check_teacher_consistency(store_manifest: dict, init_provenance: dict, allow: bool = False) -> str | None:
    """Lightning OPD's rule: the store's teacher must be the teacher whose answers SFT'd the init checkpoint.

    Returns None when consistent; with ``allow`` returns the warning line (for every log header) instead of
    raising ProvenanceError. A store without teacher log-probs is always refused."""
    teacher = store_manifest.get("teacher")
    if teacher is None:
        raise ProvenanceError(
            "the store has no teacher log-probs (no 'teacher' fingerprint): run precompute.teacher_logprobs"
        )
    sft_teacher = init_provenance.get("sft_teacher")
    if sft_teacher is None:
        return _refuse_or_allow(
            f"the init checkpoint records no sft_teacher ({PROVENANCE_FILE}); store teacher is {teacher}", allow
        )
    if teacher != sft_teacher:
        return _refuse_or_allow(
            f"the store's teacher log-probs come from teacher {teacher}, but the init checkpoint was SFT'd "
            f"on answers of teacher {sft_teacher}",
            allow,
        )
    return None


def check_rollout_policy(store_manifest: dict, init_weights: str, allow: bool = False) -> str | None:
    """The rollouts must come from the init checkpoint (pi_ref): store ``policy`` == init weights fingerprint."""
    policy = store_manifest.get("policy")
    if policy != init_weights:
        return _refuse_or_allow(
            f"the store's rollouts were sampled from policy {policy}, but training starts from weights {init_weights}",
            allow,
        )
    return None


def check_same_tokenizer(a: str | None, b: str | None, what_a: str = "store", what_b: str = "teacher") -> None:
    """Refuse to mix token ids of two different tokenizers (e.g. scoring a store with another teacher)."""
    if a is None or b is None or a != b:
        raise ProvenanceError(f"tokenizer mismatch: {what_a} tokenizer {a} != {what_b} tokenizer {b}")
