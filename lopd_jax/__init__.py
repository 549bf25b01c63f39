"""lopd_jax: Lightning OPD (offline on-policy distillation) in JAX for Qwen3 and Qwen3-MoE.

The functional API researchers compose inside their own ``jit``: ``lopd_jax.losses`` (objectives),
``lopd_jax.update`` (the pure update step), ``lopd_jax.models.qwen3`` (forward, load/save), ``lopd_jax.store``
(``RolloutStore``) and ``lopd_jax.data.batch.Batch``. The trainer is ``python -m lopd_jax.train``. Packages, bottom to
top (each imports only those below it; ``tests/unit/test_imports.py``): config, parallel, models, store, data,
inference, then losses / update, training, plan, demo, and the CLI. docs/design.md describes each.
"""
