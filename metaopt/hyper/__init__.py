"""Hyper-gradient modes and the hyper-optimizer."""

from .one_step import OneStep
from .update import HyperOptimizer

__all__ = ["HyperOptimizer", "OneStep"]
