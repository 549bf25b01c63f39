"""The tiny model architectures the tests share."""

# The tiny Qwen3 architecture the tests share (transformers' and lopd_jax's Qwen3Config take the same keywords).
# A test that needs another size says only what differs: ``tiny_arch(head_dim=16)``.
TINY_QWEN3 = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8,
)  # fmt: skip
# Token ids of the tiny HF checkpoints whose tokenizer is the synthetic task's (<|endoftext|> = 0, <|im_end|> = 2).
TINY_TOKENS = dict(eos_token_id=2, bos_token_id=None, pad_token_id=0)


def tiny_arch(**overrides) -> dict:
    """``TINY_QWEN3`` with ``overrides``: keyword arguments for either library's Qwen3Config."""
    return {**TINY_QWEN3, **overrides}
