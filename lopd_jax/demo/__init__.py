"""The CPU demo's synthetic task (synthetic) and its reports: tables and plots of a pipeline's stages (report), drift
and teacher cost (drift_report).
"""
