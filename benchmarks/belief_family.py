"""Adam <-> AdaBelief: a family written the way a user writes one, with only ``init`` and ``update``.

Used by ``benchmarks/memory_floor.py`` as the "family with nothing but the two functions"
contender: no hand-derived tangents, no fused rule, no C kernel, so ``compile=True`` takes the
engine's automatic compiled path. Written from the formulas, not copied from the tests:

    m_t = β1 m_{t-1} + (1-β1) g_t
    s_t = β2 s_{t-1} + (1-β2) ((1-κ) g_t² + κ (g_t - m_t)²)
    Δ_t = -lr · m̂_t / (sqrt(ŝ_t) + ε),   m̂_t = m_t / (1-β1^t),  ŝ_t = s_t / (1-β2^t)

κ = 0 is Adam, κ = 1 is AdaBelief; κ in [0, 1] is the one learned coefficient. The square root
is a plain ``torch.sqrt``, as an author would write it: where a coordinate's gradient has always
been 0 its derivative is infinite, and the engine (not the family) sets those tangents to 0. The
benchmark thereby also times that cleaning, which every such family pays for.
"""

from __future__ import annotations

import torch

from metaopt import Coefficient, CoefficientSpace, Family, Hyperparameters
from metaopt.plugins.mada import MADA


class BeliefHyperparameters(Hyperparameters):
    """Per-group options: ``lr`` (built in) and Adam's ε, outside the bias-corrected root."""

    eps: float = 1e-8


class AdamBelief(Family):
    """Adam at κ = 0, AdaBelief at κ = 1; betas fixed at (0.9, 0.999)."""

    name = "adam_belief_bench"
    hyperparameters = BeliefHyperparameters
    elementwise = True  # coordinate i of Δ depends on coordinate i only: one flat graph per group
    points = {"adam": {"kappa": 0.0}, "adabelief": {"kappa": 1.0}}
    betas = (0.9, 0.999)

    def __init__(self, kappa: float = 0.5) -> None:
        self.space = CoefficientSpace(kappa=Coefficient(init=kappa, low=0.0, high=1.0))

    def init(self, param, grad, group):
        """Both moments start at zero, as torch.optim.Adam's."""
        return {"m": torch.zeros_like(param), "s": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        """(Δ, new state); out-of-place ops only, as the contract asks."""
        b1, b2 = self.betas
        k = coefficients["kappa"]
        m = torch.lerp(grad, state["m"], b1)  # b1·m + (1-b1)·g in one op
        belief = grad - m
        mixed = torch.lerp(grad * grad, belief * belief, k)  # (1-κ) g² + κ (g-m)²
        s = torch.lerp(mixed, state["s"], b2)
        m_hat = m / (1 - b1**step)
        s_hat = s / (1 - b2**step)
        # group["lr"] is a 0-d tensor under compile=True: a multiplier, never read on the host
        return -group["lr"] * m_hat / (torch.sqrt(s_hat) + group["eps"]), {"m": m, "s": s}


class MADAUpdateOnly(MADA):
    """MADA as a family author who wrote only ``init`` and ``update`` would have it.

    No hand-derived rule and no C kernel: ``compile=True`` runs the C kernel the engine writes
    from ``update`` (``metaopt.codegen``), ``path="compiled"`` the inductor graph. The contender
    that says how close the automatic kernel comes to the hand-written ``mada.c``.
    """

    name = "mada_update_only"
    fused_update = None
    fused_scalars = None

    def native_rule(self, learned):
        """None: no hand-written kernel."""
        return None
