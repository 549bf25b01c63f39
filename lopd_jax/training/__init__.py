"""The trainer's machinery: its config (config) and modes (modes), validation before anything is written (setup), the
one step builder (step), checkpoints, metrics, online OPD, drift measurement and rollout refresh, and staged
pipelines of CLI runs cached by their inputs (pipeline).
"""
