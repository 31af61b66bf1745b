"""Optimizer families shipped with metaopt.

They are importable as ``metaopt.plugins.<name>`` and registered under the entry-point group
``metaopt.families``.
"""
