"""An HF-style model directory for the prompt-encoding tests (tests/unit/test_prompts.py, test_prompt_formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

from lopd_jax.demo import synthetic

TINY_HF = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": synthetic.VOCAB_SIZE,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "eos_token_id": 0,  # <|endoftext|>: differs from the tokenizer's eos (<|im_end|> = 2), as in Qwen3 base models
}


def model_dir(root: Path, *, template: bool, generation_eos: list[int] | None) -> Path:
    """An HF-style directory: the synthetic tokenizer (with or without its chat template), a tiny Qwen3 config.json
    and, when ``generation_eos`` is given, a generation_config.json adding those eos ids."""
    root.mkdir(parents=True)
    tok = synthetic.build_tokenizer(root)
    if not template:
        tok.chat_template = None
        (root / "chat_template.jinja").unlink(missing_ok=True)
        tok.save_pretrained(root)
    (root / "config.json").write_text(json.dumps(TINY_HF))
    if generation_eos is not None:
        (root / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return root
