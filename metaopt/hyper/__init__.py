"""Hyper-gradient modes and the hyper-optimizer."""

from .one_step import OneStep
from .unrolled import DifferentiableMetaOptimizer, Unrolled
from .update import HyperOptimizer

__all__ = ["DifferentiableMetaOptimizer", "HyperOptimizer", "OneStep", "Unrolled"]
