"""Sharding: ParamSpec, the mesh and its logical-axis rules (the only place mesh axes are named), multi-process start-
up.
"""
