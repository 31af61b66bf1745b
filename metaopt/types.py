"""Names every part of the engine shares, with no import of its own beyond torch and pydantic.

They are the state keys the engine adds to a parameter's state, the compute precision, and the
EMA-rate field type of families' options. Kept apart so that family, hyper-gradient and path
modules import them without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
from pydantic import AfterValidator

Tensor = torch.Tensor
#: a parameter's state as a family sees it: buffer name -> tensor
State = dict[str, Tensor]

#: key of a parameter's step count t (a 0-d tensor, in the coefficients' dtype) in its state
STEP = "step"
#: prefix of the state keys under which a parameter's tangents are kept, one buffer per learned
#: coefficient: ``state["hypergrad_tangent.rho"] = ∂Δ/∂ρ`` (the parameter's shape)
TANGENT = "hypergrad_tangent"


def tangent_keys(learned: Sequence[str]) -> tuple[str, ...]:
    """The state keys of a parameter's tangents, one per learned coefficient: ``hypergrad_tangent.<name>``."""
    return tuple(f"{TANGENT}.{name}" for name in learned)


def state_tangent_key(name: str, buffer: str) -> str:
    """The key of the forward mode's tangent of state buffer ``buffer`` with respect to coefficient ``name``.

    ``name`` is a learned coefficient: ``state["hypergrad_tangent.beta3@exp_avg"] = ∂exp_avg/∂β3``.
    """
    return f"{TANGENT}.{name}@{buffer}"


def is_tangent_key(key: str) -> bool:
    """A tangent the engine keeps: a parameter's (∂θ/∂c) or, in forward mode, a state buffer's."""
    return key.startswith(TANGENT)


def is_parameter_tangent_key(key: str) -> bool:
    """A parameter's tangent ∂θ/∂c, the kind the hyper-gradient dots with the gradient."""
    return key.startswith(TANGENT) and "@" not in key


def family_state(state: Mapping[str, Tensor]) -> State:
    """A parameter's state as the family sees it: without the engine's step and tangents."""
    return {k: v for k, v in state.items() if k != STEP and not is_tangent_key(k)}


def defined_tangent(tangent: torch.Tensor, primal: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A tangent made 0 where it is NaN and its value is finite, NaN where its value is not finite.

    Where a rule is not differentiable, a derivative comes out as 0·∞ = NaN although the value is
    finite: ``sqrt(v)`` at a coordinate whose gradient is always 0 (a dead unit, an embedding row
    no batch uses) has an infinite derivative in v, times ∂v/∂c = 0. There the value does not move
    with the coefficient, and a central finite difference gives 0; so does this. Where the value
    itself is not finite (a NaN gradient, an overflow) the tangent is NaN, and the hyper-step
    that meets it is skipped and counted. An infinite tangent of a finite value (a derivative that
    is truly unbounded) is kept. ``out=tangent`` works in place: ``primal - primal`` is 0 where the
    value is finite and NaN where it is not, so the whole is one pass over the tangent, not four.
    """
    if out is None and torch.compiler.is_compiling():
        # in a graph, ``t != t`` (NaN) is a packed compare; inductor's C++ isnan goes element by element
        return torch.where(tangent != tangent, 0.0, tangent) + (primal - primal)
    cleaned = torch.nan_to_num(tangent, nan=0.0, posinf=math.inf, neginf=-math.inf, out=out)
    return cleaned.add_(primal - primal)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a rule runs in and its state is kept in.

    fp32 for half-precision parameters (bf16, fp16), else the parameter's own.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _betas_in_range(v: tuple[float, float]) -> tuple[float, float]:
    for i, b in enumerate(v):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must lie in [0, 1), got {b}")
    return v


#: A pair of EMA decay rates, each in [0, 1): a pydantic field type for families' options.
Betas = Annotated[tuple[float, float], AfterValidator(_betas_in_range)]
