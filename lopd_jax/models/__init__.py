"""Qwen3 dense and MoE: the declaration (qwen3_specs), the model (qwen3), attention kernels, MoE grouped GEMMs and
expert parallelism, HF checkpoints (hf), published sizes (presets).
"""
