"""One-step hyper-gradients (Baydin et al., ICLR 2018; Ozkara et al., ICML 2024).

After update t the parameters are ``θ_t = θ_{t-1} + Δ(c)``, with the state and ``θ_{t-1}`` held
fixed. The hyper-gradient of coefficient k is

    h_k = ⟨∇L(θ_t), ∂θ_t/∂c_k⟩ = ⟨g_{t+1}, ∂Δ_t/∂c_k⟩,

where ``g_{t+1}`` is the gradient that step t+1 receives anyway: no extra forward or backward
pass. The tangents ``∂Δ_t/∂c_k`` are computed when Δ_t is, by forward-mode differentiation of
the family's rule (``torch.func.jacfwd``), and kept until the next step; the learning rate that
step t applied is inside Δ_t, so a scheduler changing it before step t+1 does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import jacfwd

from .update import HyperOptimizer

Tensor = torch.Tensor

#: key under which a parameter's tangents ``∂Δ/∂c`` (shape ``param.shape + (K,)``) are kept
TANGENT = "hypergrad_tangent"


class OneStep(HyperOptimizer):
    """One-step hyper-gradient mode: reuses the next training gradient, costs one
    forward-mode pass of the rule and K tangent buffers per parameter."""


def update_with_tangents(
    family,
    grad: Tensor,
    param: Tensor,
    state: dict[str, Tensor],
    coefficients: Tensor,
    names: Sequence[str],
    learned_index: Sequence[int],
    group: Mapping[str, Any],
    step: Tensor,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Run the family's rule and its Jacobian with respect to the learned coefficients.

    Returns ``(delta, new_state, tangent)`` with ``tangent[..., j] = ∂delta/∂c_{learned[j]}``.
    """
    learned_pos = {i: j for j, i in enumerate(learned_index)}

    def rule(learned: Tensor):
        coeffs = {
            n: (learned[learned_pos[i]] if i in learned_pos else coefficients[i])
            for i, n in enumerate(names)
        }
        delta, new_state = family.update(grad, param, state, coeffs, group, step)
        return delta, (delta, new_state)

    tangent, (delta, new_state) = jacfwd(rule, has_aux=True)(coefficients[list(learned_index)])
    return delta, new_state, tangent


def hypergradient(pairs: Sequence[tuple[Tensor, Tensor]], k: int, like: Tensor) -> Tensor:
    """``h = Σ_p ⟨g_p, tangent_p⟩`` over (gradient, tangent) pairs, accumulated in ``like``'s
    dtype and device."""
    h = torch.zeros(k, dtype=like.dtype, device=like.device)
    for g, tangent in pairs:
        h += (g.reshape(1, -1).to(tangent.dtype) @ tangent.reshape(-1, k)).reshape(k).to(h)
    return h
