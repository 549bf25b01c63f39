"""Provenance: fingerprints by content (weights, tokenizer, chat template), caching, and the consistency checks."""

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lopd_jax.store import provenance as pv
from lopd_jax.store.provenance import ProvenanceError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(pv.CACHE_ENV, str(tmp_path / "cache" / "fingerprints.json"))


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((64, 16)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "model.norm.weight": np.ones(16, np.float16),
        "lm_head.weight": rng.standard_normal((64, 16)).astype(np.float32),
    }


def save_model(d, ts_, shards=1):
    os.makedirs(d, exist_ok=True)
    names = sorted(ts_)
    for s in range(shards):
        part = {n: ts_[n] for n in names[s::shards]}
        save_file(part, os.path.join(d, f"model-{s:05d}-of-{shards:05d}.safetensors"), metadata={"format": "np"})
    return d


def reference_fingerprint(d):
    """The documented formula, computed from safetensors' own loader (not our header parser)."""
    rows = []
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            for name, arr in load_file(os.path.join(d, f)).items():
                dtype = {"float32": "F32", "float16": "F16"}[arr.dtype.name]
                rows.append([name, dtype, list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()])
    text = json.dumps(sorted(rows), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def test_weights_fingerprint_is_content(tmp_path):
    base = save_model(tmp_path / "a", tensors())
    fp = pv.fingerprint_weights(base)
    assert fp == reference_fingerprint(base)
    assert pv.fingerprint_weights(save_model(tmp_path / "b", tensors(), shards=3)) == fp  # re-sharded: same
    changed = tensors()
    changed["model.layers.0.mlp.up_proj.weight"][3, 5] += 1e-3  # one weight
    fp_changed = pv.fingerprint_weights(save_model(tmp_path / "c", changed))
    assert fp_changed != fp and fp_changed == reference_fingerprint(tmp_path / "c")
    recast = {**tensors(), "model.norm.weight": np.ones(16, np.float32)}  # same values, other dtype
    assert pv.fingerprint_weights(save_model(tmp_path / "d", recast)) != fp
    with pytest.raises(ProvenanceError, match="no \\*.safetensors"):
        pv.fingerprint_weights(tmp_path / "cache")


def test_weights_fingerprint_is_cached_and_invalidated(tmp_path, monkeypatch):
    d = save_model(tmp_path / "a", tensors(), shards=2)
    fp = pv.fingerprint_weights(d)
    assert pv.cache_path().exists()
    calls = []
    real = pv.tensor_digests
    monkeypatch.setattr(pv, "tensor_digests", lambda p: calls.append(p) or real(p))
    assert pv.fingerprint_weights(d) == fp and calls == []  # unchanged: no tensor bytes read
    changed = tensors()
    changed["lm_head.weight"][0, 0] = 0.5
    save_model(d, changed, shards=2)  # rewrites both files: size/mtime keys change
    assert pv.fingerprint_weights(d) == reference_fingerprint(d) != fp
    assert len(calls) == 2


def test_truncated_safetensors_is_named(tmp_path):
    d = save_model(tmp_path / "a", tensors())
    f = next(p for p in (tmp_path / "a").iterdir() if p.suffix == ".safetensors")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ProvenanceError, match="truncated"):
        pv.fingerprint_weights(d)


def save_tokenizer(d, eos="<eos>", template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", "<pad>", "a", "b", "c", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token="<unk>", pad_token="<pad>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(d)
    return d


def test_tokenizer_and_chat_template_fingerprints(tmp_path):
    t = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    a = save_tokenizer(tmp_path / "a", template=t)
    assert pv.fingerprint_tokenizer(a) == pv.fingerprint_tokenizer(save_tokenizer(tmp_path / "b", template=t))
    assert pv.fingerprint_tokenizer(
        save_tokenizer(tmp_path / "c", eos="<pad>", template=t)
    ) != pv.fingerprint_tokenizer(a)
    other = save_tokenizer(tmp_path / "d", template=t + "!")
    assert pv.fingerprint_tokenizer(other) == pv.fingerprint_tokenizer(a)  # template is not the tokenizer
    assert pv.fingerprint_chat_template(other) != pv.fingerprint_chat_template(a)
    assert pv.fingerprint_chat_template(a) == pv.fingerprint_text(t) == pv.fingerprint_text(pv.read_chat_template(a))
    e = save_tokenizer(tmp_path / "e")
    assert pv.fingerprint_chat_template(e) is None
    config = json.loads((e / "tokenizer_config.json").read_text())
    (e / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": t}))  # older HF layout
    assert pv.fingerprint_chat_template(e) == pv.fingerprint_text(t)
    with pytest.raises(ProvenanceError, match="no tokenizer.json"):
        pv.fingerprint_tokenizer(tmp_path / "cache")


def test_provenance_record_round_trip(tmp_path):
    assert pv.read_provenance(tmp_path) == {}
    pv.write_provenance(tmp_path, sft_teacher="sha256:aa")
    rec = pv.write_provenance(tmp_path, mode="sft")
    assert pv.read_provenance(tmp_path) == rec and rec["sft_teacher"] == "sha256:aa" and rec["mode"] == "sft"


def test_consistency_checks_name_both_fingerprints():
    t1, t2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert pv.check_teacher_consistency({"teacher": t1}, {"sft_teacher": t1}) is None
    with pytest.raises(ProvenanceError) as e:
        pv.check_teacher_consistency({"teacher": t1}, {"sft_teacher": t2})
    assert t1 in str(e.value) and t2 in str(e.value) and "allow_teacher_inconsistency" in str(e.value)
    warning = pv.check_teacher_consistency({"teacher": t1}, {"sft_teacher": t2}, allow=True)
    assert warning.startswith("ALLOWED") and t1 in warning and t2 in warning
    with pytest.raises(ProvenanceError, match="records no sft_teacher"):
        pv.check_teacher_consistency({"teacher": t1}, {})
    with pytest.raises(ProvenanceError, match="no teacher log-probs"):
        pv.check_teacher_consistency({}, {"sft_teacher": t1}, allow=True)
    assert pv.check_rollout_policy({"policy": t1}, t1) is None
    with pytest.raises(ProvenanceError) as e:
        pv.check_rollout_policy({"policy": t1}, t2)
    assert t1 in str(e.value) and t2 in str(e.value)
    assert t2 in pv.check_rollout_policy({"policy": t1}, t2, allow=True)
    pv.check_same_tokenizer(t1, t1)
    with pytest.raises(ProvenanceError) as e:
        pv.check_same_tokenizer(t1, t2)
    assert t1 in str(e.value) and t2 in str(e.value)
