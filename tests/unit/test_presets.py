"""Presets reproduce the parameter counts published on the Qwen3 model cards."""

import pytest

from lopd_jax.models import presets, qwen3

# (total, non-embedding) in billions, as printed on each model card ("Number of Parameters").
PUBLISHED = {
    "Qwen3-0.6B": (0.6, 0.44),
    "Qwen3-1.7B": (1.7, 1.4),
    "Qwen3-4B": (4.0, 3.6),
    "Qwen3-8B": (8.2, 6.95),
    "Qwen3-14B": (14.8, 13.2),
    "Qwen3-32B": (32.8, 31.2),
    "Qwen3-30B-A3B": (30.5, 29.9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_model_cards(name):
    cfg = presets.get_preset(name)
    total, non_embed = PUBLISHED[name]
    # The card rounds to two or three significant digits: allow 1% or half a unit of the last printed digit.
    digits = len(str(total).split(".")[1])
    tol = max(0.01 * total, 0.5 * 10**-digits)
    assert abs(presets.param_count(cfg) / 1e9 - total) <= tol
    assert abs(presets.param_count(cfg, embeddings=False) / 1e9 - non_embed) <= 0.01 * non_embed


def test_exact_numbers_for_8b_and_moe():
    assert presets.param_count(presets.get_preset("qwen3-8b")) / 1e9 == pytest.approx(8.19, rel=1e-3)
    moe = presets.get_preset("Qwen/Qwen3-30B-A3B")
    assert presets.param_count(moe) / 1e9 == pytest.approx(30.5, rel=0.01)
    assert presets.active_param_count(moe) / 1e9 == pytest.approx(3.3, rel=0.02)  # card: 3.3B activated
    dense = presets.get_preset("qwen3-8b")
    assert presets.active_param_count(dense) == presets.param_count(dense)


def test_tie_and_shared_fields():
    for name, cfg in presets.PRESETS.items():
        assert cfg.vocab_size == 151936 and cfg.head_dim == 128, name
        assert cfg.tie_word_embeddings == (name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b")), name
    # Hand count for 0.6B: per layer q/o + k/v + SwiGLU MLP + 2 norm vectors of D and 2 of H; tied embedding.
    cfg = presets.get_preset("qwen3-0.6b")
    D, N, K, H, F = 1024, 16, 8, 128, 3072
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F + 2 * D + 2 * H
    assert presets.param_count(cfg) == 28 * per_layer + 151936 * D + D
    assert "lm_head" not in qwen3.param_specs(cfg)


def test_overrides_and_unknown_name():
    cfg = presets.get_preset("qwen3_4b", dtype="bfloat16", remat="full")
    assert cfg.dtype == "bfloat16" and cfg.remat == "full" and cfg.hidden_size == 2560
    with pytest.raises(KeyError, match="qwen3-7b"):
        presets.get_preset("qwen3-7b")
