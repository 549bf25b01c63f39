"""The Batch contract and its row assembler (batch), the Grain loader over a RolloutStore (loader), prompt and eval
sets and the one prompt encoder (prompts).
"""
