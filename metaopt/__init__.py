"""metaopt: declare an optimizer family once, train with it as a torch optimizer.

The family's coefficients are learned by hyper-gradient descent.
"""

from .check import check_family
from .contract import FamilyContractError
from .family import Family, Hyperparameters
from .hyper import DifferentiableMetaOptimizer, Forward, HyperOptimizer, OneStep, Unrolled
from .optimizer import MetaOptimizer
from .registry import families, get_family
from .space import Coefficient, CoefficientSpace

__all__ = [
    "Coefficient",
    "CoefficientSpace",
    "DifferentiableMetaOptimizer",
    "Family",
    "FamilyContractError",
    "Forward",
    "HyperOptimizer",
    "Hyperparameters",
    "MetaOptimizer",
    "OneStep",
    "Unrolled",
    "check_family",
    "families",
    "get_family",
]
__version__ = "0.1.0"
