"""Unrolled hyper-gradients through ``higher`` (truncated back-propagation through time).

``higher``: Grefenstette et al., "Generalized Inner Loop Meta-Learning", 2019, arXiv:1910.01727.

From the current parameters θ_0 and state, K differentiable inner steps θ_k = θ_{k-1} + Δ_k(c)
on K training batches lead to θ_K(c); the meta-objective M(θ_K(c)) (by default a validation
loss) is back-propagated to the learned coefficients:

    h = dM(θ_K(c))/dc,

second-order terms included (the inner gradients g_k = ∇L(θ_{k-1}) depend on c through θ) unless
``first_order=True`` detaches them. The hyper-optimizer then moves c, and the K inner steps are
committed to the real model and optimizer (no training compute is thrown away). With K = 1 and
the next training batch as meta-batch this is the one-step hyper-gradient.

Any family runs here without ``higher`` code of its own:
[`DifferentiableMetaOptimizer`][metaopt.DifferentiableMetaOptimizer] calls the family's
``init``/``update`` on the fast weights, with the learned coefficients as one leaf tensor that
requires grad, and is registered with ``higher.register_optim`` for
[`MetaOptimizer`][metaopt.MetaOptimizer] (and its subclasses), so
``higher.innerloop_ctx(model, opt)`` works as it does for ``torch.optim.Adam``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import higher
import torch
from pydantic import Field

from ..contract import first_step
from ..sharding import is_dtensor
from ..types import STEP, compute_dtype, family_state, is_tangent_key
from .update import HyperOptimizer

Tensor = torch.Tensor


class Unrolled(HyperOptimizer):
    """K-step unrolled hyper-gradient mode.

    ``opt.unrolled_step`` does the work; ``opt.step`` alone then takes plain steps with the
    coefficients fixed. From the current parameters, K differentiable inner steps on K training
    batches lead to θ_K(c), and the meta-objective M(θ_K(c)) (by default a validation loss) is
    back-propagated to the learned coefficients (truncated back-propagation through time,
    through ``higher``: Grefenstette et al., "Generalized Inner Loop Meta-Learning", 2019,
    arXiv:1910.01727); second-order terms are included unless ``first_order=True``. See
    [`MetaOptimizer.unrolled_step`][metaopt.MetaOptimizer.unrolled_step].

    The other keyword arguments are the hyper-optimizer's fields: see
    [`HyperOptimizer`][metaopt.HyperOptimizer].

    Keyword Args:
        steps (int): K, the number of unrolled inner steps, >= 1 (default 1): ``unrolled_step``
            then takes exactly K training batches.
        first_order (bool): detach the inner gradients (drop the second-order terms); default
            False.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown field or a value out of its
            range.
    """

    steps: int = Field(1, ge=1)
    first_order: bool = False

    through_state: ClassVar[bool] = True  # the unroll differentiates through the inner steps' state
    unrolls: ClassVar[bool] = True

    @property
    def unroll_steps(self) -> int:
        """``steps``: ``unrolled_step`` takes exactly that many training batches."""
        return self.steps

    @property
    def unroll_first_order(self) -> bool:
        """``first_order``."""
        return self.first_order


class DifferentiableMetaOptimizer(higher.optim.DifferentiableOptimizer):
    """Any metaopt family as a ``higher`` differentiable optimizer.

    ``learned_coefficients`` is a leaf vector (the family's learned coefficients, in order of
    ``learned``) that requires grad — a (groups, K) matrix with coefficients per param group;
    ``coefficients_for(gi)`` maps every name to the 0-d tensor in the graph that group ``gi``
    runs with.

    ``higher`` (Grefenstette et al., "Generalized Inner Loop Meta-Learning", 2019,
    arXiv:1910.01727) builds it: it is registered for
    [`MetaOptimizer`][metaopt.MetaOptimizer] and its subclasses, so
    ``higher.innerloop_ctx(model, opt)`` makes one from ``opt``; there is no need to construct
    it directly.

    Args:
        other (metaopt.MetaOptimizer): the optimizer whose family, param groups, state and
            coefficients it starts from.
        reference_params (Iterable[torch.Tensor]): the parameters of the original model, as
            for any ``higher.optim.DifferentiableOptimizer``.
        **kwargs: passed to ``higher.optim.DifferentiableOptimizer`` (``fmodel``, ``device``,
            ``override``, ``grad_callback``, ``track_higher_grads``).
    """

    def __init__(self, other, reference_params, **kwargs: Any) -> None:
        super().__init__(other, reference_params, **kwargs)
        self.family = other.family
        self.names = other.family.space.names
        self.learned = other.family.space.learned
        index = [self.names.index(n) for n in self.learned]
        values = other._hyper.coefficients.detach().clone()
        self._fixed = values
        self._index = index
        self.learned_coefficients = values[..., index].clone().requires_grad_()
        self._step_dtype = values.dtype
        self._first_steps: set = set()
        # the rule's reverse pass is NaN where a gradient is always 0 (the contract probe found it)
        self._per_coordinate = other._nan_at_zero_gradient and other.family.elementwise

    def coefficients_for(self, gi: int) -> dict[str, Tensor]:
        """The coefficients param group ``gi`` runs with, as nodes of the graph.

        Args:
            gi: the param group's index.

        Returns:
            Every coefficient's name -> a 0-d tensor: the learned ones are entries of
                ``learned_coefficients`` (so the meta-loss back-propagates to them), the fixed
                ones constants. Shared coefficients are the same for every ``gi``.
        """
        learned, fixed = self.learned_coefficients, self._fixed
        if fixed.dim() == 2:  # coefficients per param group: group gi's row
            learned, fixed = learned[gi], fixed[gi]
        pos = {i: j for j, i in enumerate(self._index)}
        return {n: (learned[pos[i]] if i in pos else fixed[i]) for i, n in enumerate(self.names)}

    def _update(self, grouped_grads, **kwargs: Any) -> None:
        family = self.family
        # shared: one set of graph nodes for every group (as many index nodes per group would
        # sum the hyper-gradient's parts in another order)
        shared = self.coefficients_for(0) if self._fixed.dim() == 1 else None
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            coefficients = shared if shared is not None else self.coefficients_for(gi)
            for pi, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[gi][pi]
                dtype = compute_dtype(p.dtype)  # fp32 rule and state for half-precision params
                pc, gc = p.to(dtype), g.to(dtype)
                if STEP not in state:
                    key = (id(group), tuple(pc.shape), pc.dtype, pc.device)
                    if key not in self._first_steps:  # the contract at this shape, as step() holds it
                        first_step(family, group, pc, self._step_dtype)
                        self._first_steps.add(key)
                    state.update(family.init(pc, gc, group))
                    state[STEP] = torch.zeros((), dtype=self._step_dtype, device=p.device)
                step = state[STEP] + 1
                if self._per_coordinate:
                    delta, new_state = _update_per_coordinate(family, gc, pc, family_state(state), coefficients,
                                                              self.learned, group, step)
                else:
                    delta, new_state = family.update(gc, pc, family_state(state), coefficients, group, step)
                group["params"][pi] = (pc + delta).to(p.dtype)  # rounded once, as step() does
                state.update(new_state)
                state[STEP] = step


def _update_per_coordinate(family, grad, param, state, coefficients, learned, group, step):
    """An elementwise family's ``update``, its reverse pass following the engine's rule at points where it is not differentiable.

    Each learned coefficient enters as a view of the parameter's shape (no memory), and the
    gradient, the parameter and the state as views of themselves, so that the cotangents the
    update's reverse pass hands each input can be seen coordinate by coordinate before they are
    summed or passed on: NaN at a coordinate whose update and new state are finite counts as 0
    (as ``metaopt.types.defined_tangent`` does for the other modes' tangents). Without this, one dead unit (sqrt at 0) made the
    whole hyper-gradient NaN, and in second order the NaN reached every coordinate through the
    loss's Hessian.
    """
    views = {n: coefficients[n].expand(param.shape) for n in learned}
    inputs = [grad.view_as(grad), param.view_as(param)]
    state = {k: (v.view_as(v) if v.requires_grad else v) for k, v in state.items()}
    delta, new_state = family.update(inputs[0], inputs[1], state, {**coefficients, **views}, group, step)
    finite = torch.isfinite(delta.detach())
    for v in new_state.values():
        if v.shape == finite.shape:
            finite = finite & torch.isfinite(v.detach())

    def defined(g, finite=finite):
        return torch.where(torch.isnan(g) & finite, torch.zeros_like(g), g)

    for t in (*views.values(), *inputs, *state.values()):
        if t.requires_grad and t.shape == finite.shape:
            t.register_hook(defined)
    return delta, new_state


def _detach_all(grads):
    return [g.detach() if g is not None else None for g in grads]


def unroll(
    opt,
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], Tensor],
    meta_batch: Any,
    meta_loss_fn: Callable[[torch.nn.Module, Any], Tensor] | None = None,
    *,
    commit: bool = True,
) -> tuple[Tensor, Tensor]:
    """K differentiable steps of ``opt`` on ``model``; returns (meta-loss, h), h detached.

    K and first order as ``opt.hypergrad`` says (``unroll_steps``, ``unroll_first_order``).
    With ``commit`` the K steps are written to ``model`` (parameters, and buffers as they stood
    after the K training forwards) and to ``opt``'s state; otherwise both are left untouched.

    Raises:
        NotImplementedError: a parameter is sharded (DTensor / FSDP2).
        ValueError: ``batches`` is empty, or its length differs from ``unroll_steps``.
    """
    if any(is_dtensor(p) for g in opt.param_groups for p in g["params"]):
        raise NotImplementedError(
            "unrolled_step does not run on sharded (DTensor / FSDP2) parameters; use "
            "OneStep hyper-gradients there"
        )
    batches, steps = list(batches), opt.hypergrad.unroll_steps
    if steps is not None and len(batches) != steps:
        raise ValueError(f"Unrolled(steps={steps}) got {len(batches)} training batches")
    if not batches:
        raise ValueError("unrolled_step needs at least one training batch")
    model_params = list(model.parameters())
    grad_callback = _detach_all if opt.hypergrad.unroll_first_order else None
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True, track_higher_grads=True) as (
        fmodel,
        diffopt,
    ):
        for batch in batches:
            diffopt.step(loss_fn(fmodel, batch), grad_callback=grad_callback)
        # Buffers as the K training forwards left them; the meta-objective's forward (which
        # may run in train mode) must not leak into the committed running statistics.
        trained_buffers = {n: b.detach().clone() for n, b in fmodel.named_buffers()}
        meta_loss = (meta_loss_fn or loss_fn)(fmodel, meta_batch)
        (h,) = torch.autograd.grad(meta_loss, diffopt.learned_coefficients, allow_unused=True)
        if h is None:  # the meta-objective does not depend on the coefficients
            h = torch.zeros_like(diffopt.learned_coefficients)
        if commit:
            with torch.no_grad():
                for p, fast in zip(model_params, fmodel.fast_params):
                    p.copy_(fast)
                for name, b in model.named_buffers():
                    if name in trained_buffers:
                        b.copy_(trained_buffers[name])
                for gi, group in enumerate(opt.param_groups):
                    for pi, p in enumerate(group["params"]):
                        inner = diffopt.state[gi].get(pi)
                        if not inner:
                            continue
                        state = opt.state[p]
                        for k in [k for k in state if is_tangent_key(k)]:
                            del state[k]  # they describe an update that is no longer the last
                        for k, v in inner.items():
                            if is_tangent_key(k):
                                continue
                            state[k] = v.detach() if torch.is_tensor(v) else v
    return meta_loss.detach(), h.detach()


def _register(cls) -> None:
    higher.register_optim(cls, DifferentiableMetaOptimizer)
