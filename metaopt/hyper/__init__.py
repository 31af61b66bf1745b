"""Hyper-gradient modes and the hyper-optimizer."""

from .forward import Forward
from .one_step import OneStep
from .unrolled import DifferentiableMetaOptimizer, Unrolled
from .update import HyperOptimizer

__all__ = ["DifferentiableMetaOptimizer", "Forward", "HyperOptimizer", "OneStep", "Unrolled"]
