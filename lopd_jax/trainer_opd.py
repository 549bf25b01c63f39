"""Deprecated alias of ``lopd_jax.online_opd`` (kept so existing imports keep working); the ``Evaluator`` moved
to ``lopd_jax.eval`` and the prompt helpers to ``lopd_jax.prompts``."""

from lopd_jax.online_opd import OnlineOPD, PromptStream, make_teacher_scorer, sampler_config, samples_to_batch

__all__ = ["OnlineOPD", "PromptStream", "make_teacher_scorer", "samples_to_batch", "sampler_config"]
