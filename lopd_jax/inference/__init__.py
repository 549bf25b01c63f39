"""The JAX sampler with its KV cache (sampling) and held-out evaluation: answer grading and pass@k (evaluation)."""
