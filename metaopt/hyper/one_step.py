"""One-step hyper-gradients (Baydin et al., ICLR 2018; Ozkara et al., ICML 2024).

After update t the parameters are ``θ_t = θ_{t-1} + Δ(c)``, with the state and ``θ_{t-1}`` held
fixed. The hyper-gradient of coefficient k is

    h_k = ⟨∇L(θ_t), ∂θ_t/∂c_k⟩ = ⟨g_{t+1}, ∂Δ_t/∂c_k⟩,

where ``g_{t+1}`` is the gradient that step t+1 receives anyway: no extra forward or backward
pass. The tangents ``∂Δ_t/∂c_k`` are computed when Δ_t is, by differentiating the family's rule
(see ``update_with_tangents``), and kept until the next step; the learning rate that
step t applied is inside Δ_t, so a scheduler changing it before step t+1 does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch.func import jacfwd

from ..types import STEP, TANGENT, defined_tangent, family_state, is_tangent_key, tangent_keys
from .update import HyperOptimizer

Tensor = torch.Tensor

__all__ = [
    "STEP", "TANGENT", "OneStep", "family_state", "hypergradient", "is_tangent_key", "tangent_keys",
    "update_with_tangents", "validation_pairs",
]


class OneStep(HyperOptimizer):
    """One-step hyper-gradient mode: K tangent buffers per parameter, no extra forward or backward pass.

    The hyper-gradient of hypergradient descent (Baydin et al., "Online Learning Rate Adaptation
    with Hypergradient Descent", ICLR 2018) and of MADA (Ozkara et al., "MADA: Meta-Adaptive
    Optimizers through hyper-gradient Descent", ICML 2024, arXiv:2401.08893): after update t,
    h = ⟨∇L(θ_t), ∂θ_t/∂c⟩ with the state and θ_{t-1} held fixed, dotted with the gradient the
    next step receives anyway. Holding the state fixed, it cannot see that a coefficient also
    moves every later moment estimate (the short-horizon bias: Wu, Ren, Liao & Grosse, ICLR
    2018); [`Forward`][metaopt.Forward] carries the tangents through the state.

    ``objective="train"`` (default): each ``step()`` first descends ⟨g_{t+1}, ∂θ_t/∂c⟩ with the
    training gradient it receives. ``objective="validation"``: ``step()`` only keeps tangents,
    and ``opt.validation_hyperstep(val_loss)`` (e.g. every N steps) descends
    ⟨∇L_val(θ_t), ∂θ_t/∂c⟩.

    The other keyword arguments are the hyper-optimizer's fields (``optimizer``, ``lr``,
    ``momentum``, ``betas``, ``eps``, ``clip``, ``clip_style``, ``warmup``): see
    [`HyperOptimizer`][metaopt.HyperOptimizer].

    Keyword Args:
        objective (str): ``"train"`` (default) or ``"validation"``, as above.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown field or a value out of its
            range.
    """

    objective: Literal["train", "validation"] = "train"

    keeps_tangents: ClassVar[bool] = True  # ∂θ_t/∂c, for the next step's (or a validation loss's) h
    one_step_tangents: ClassVar[bool] = True

    @property
    def learns_in_step(self) -> bool:
        """With ``objective="train"``: ``step()`` descends the training gradient's hyper-gradient."""
        return self.objective == "train"



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
    """Run the family's rule and its derivative with respect to the learned coefficients.

    Returns ``(delta, new_state, tangent)`` with ``tangent[j] = ∂delta/∂c_{learned[j]}``
    (shape ``(K, *param.shape)``).

    Per-coordinate rules (``family.elementwise``) get all K tangents from one reverse pass:
    each learned coefficient enters as a full-size leaf holding its value everywhere, and since
    coordinate i of the update depends only on coordinate i of every leaf, the gradient of
    ``sum(delta)`` with respect to leaf k *is* ``∂delta/∂c_k`` coordinate by coordinate. Other
    rules go through ``torch.func.jacfwd`` (forward mode), which is exact for any rule but costs
    far more per operation.
    """
    if family.elementwise:
        return _elementwise_tangents(
            family, grad, param, state, coefficients, names, learned_index, group, step
        )
    learned_pos = {i: j for j, i in enumerate(learned_index)}

    def rule(learned: Tensor):
        coeffs = {
            n: (learned[learned_pos[i]] if i in learned_pos else coefficients[i])
            for i, n in enumerate(names)
        }
        delta, new_state = family.update(grad, param, state, coeffs, group, step)
        return delta, (delta, new_state)

    tangent, (delta, new_state) = jacfwd(rule, has_aux=True)(coefficients[list(learned_index)])
    tangent = tangent.movedim(-1, 0).contiguous()
    return delta, new_state, defined_tangent(tangent, delta, out=tangent)


def _elementwise_tangents(family, grad, param, state, coefficients, names, learned_index, group, step):
    learned = set(learned_index)
    with torch.enable_grad():
        leaves = []
        coeffs = {}
        for i, n in enumerate(names):
            if i in learned:
                # copy_ broadcasts the 0-d value on the device: no host round trip
                leaf = torch.empty_like(param).copy_(coefficients[i]).requires_grad_()
                leaves.append(leaf)
                coeffs[n] = leaf
            else:
                coeffs[n] = coefficients[i]
        delta, new_state = family.update(grad.detach(), param.detach(), state, coeffs, group, step)
        tangents = torch.autograd.grad(
            delta, leaves, grad_outputs=torch.ones_like(delta), allow_unused=True,
            materialize_grads=True,
        )
    new_state = {k: v.detach() for k, v in new_state.items()}
    delta = delta.detach()
    tangent = torch.stack(tangents)
    return delta, new_state, defined_tangent(tangent, delta, out=tangent)  # in place


def hypergradient(pairs: Sequence[tuple[Tensor, Sequence[Tensor], int]], k: int, like: Tensor, dots,
                  rows: int | None = None) -> Tensor:
    """``h_j = Σ_p ⟨g_p, tangent_pj⟩`` over (gradient, tangents, param group index) triples.

    Accumulated in ``like``'s dtype and device; ``dots(g, tangents)`` gives one parameter's K
    products. ``rows``: with coefficients per param group, the number of groups — h is then
    (rows, K), each group's row the sum over its own parameters.
    """
    h = torch.zeros(k if rows is None else (rows, k), dtype=like.dtype, device=like.device)
    for g, tangents, gi in pairs:
        if rows is None:
            h += dots(g, list(tangents)).to(h)
        else:
            h[gi] += dots(g, list(tangents)).to(h)
    return h


def validation_pairs(loss: Tensor, groups: Sequence[Mapping[str, Any]], state: Mapping[Tensor, Mapping[str, Tensor]],
                     keys: Sequence[str]) -> list[tuple[Tensor, Tensor, list[Tensor], int]] | None:
    """(parameter, gradient of ``loss``, its tangents, param group index) of each parameter that kept tangents.

    What ``validation_hyperstep`` dots: ``loss`` is differentiated with respect to those
    parameters alone (``.grad`` is left alone); a parameter the loss does not reach is left out.
    None where no parameter kept tangents (no step has run yet).
    """
    params, tangents, indices = [], [], []
    for gi, group in enumerate(groups):
        for p in group["params"]:
            st = state.get(p)
            if st is not None and keys and keys[0] in st:
                params.append(p)
                tangents.append([st[key] for key in keys])
                indices.append(gi)
    if not params:
        return None
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [(p, g, t, gi) for p, g, t, gi in zip(params, grads, tangents, indices) if g is not None]
