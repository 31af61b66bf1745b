"""The rules a bucketed path runs: what differs between the fused and the compiled path.

A rule object says how one unit of work — a param group's flat bucket, or one parameter — goes
through a family's rule with its tangents, and writes the results in place:

* ``HandDerivedRule``: the family's hand-derived ``fused_scalars`` and ``fused_update`` (the
  fused path);
* ``DerivedRule``: the family's own ``update``, its tangents ∂Δ/∂c_k derived by forward mode, one
  ``torch.func.jvp`` per learned coefficient (the compiled path);
* ``ForwardRule``: the same ``update`` under the forward mode's jvps, the carried parameter and
  state tangents as their tangents ([`Forward`][metaopt.Forward], the compiled path).

``bucket_step`` and ``param_step`` are written to be traced: ``metaopt.paths.bucketed`` runs them
eagerly or compiles its own copies. ``per_tensor`` is the host loop over one group's parameters
on one device. What the three share is a ``RuleSpec``.

Forward mode rather than a reverse pass for the derived tangents: the reverse pass
(``torch.func.vjp`` over full-size coefficient leaves) did not compile on torch 2.13 CPU (a
storage-less zero cotangent inside inductor), and forward mode is exact for rules that mix
coordinates too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..hyper.forward import forward_update
from ..types import Tensor, compute_dtype, defined_tangent, family_state
from .base import loses_writes_in_a_graph


@dataclass(frozen=True)
class RuleSpec:
    """What every rule function takes besides its tensors.

    ``names``: every coefficient, in the space's order (the coefficient vector's); ``learned``:
    the coefficients to keep tangents for; ``learned_index``: their positions in ``names``;
    ``decay`` and ``state_tangents``: the forward mode's decay and (state buffer, its tangent
    keys) pairs, None outside forward mode.
    """

    family: Any
    names: tuple[str, ...]
    learned: tuple[str, ...]
    learned_index: tuple[int, ...]
    decay: float | None = None
    state_tangents: tuple[tuple[str, tuple[str, ...]], ...] | None = None


class BucketItem(NamedTuple):
    """One flat bucket's buffers for one step, as a bucketed rule reads and writes them.

    ``grad`` and ``param`` are the group's flat gradient and parameters (in the parameters'
    dtype: the rule computes in ``state``'s); ``tangents`` the parameter tangents, one flat buffer
    per learned coefficient; ``state_tangents`` the forward mode's ({buffer: its tangents}, else
    None); ``row`` the group's row of per-group coefficients (None: shared).
    """

    grad: Tensor
    param: Tensor
    state: dict[str, Tensor]
    tangents: list[Tensor]
    state_tangents: dict[str, list[Tensor]] | None
    step: Tensor
    hp: dict[str, Any]
    row: int | None


def write_step(param, state, tangent, delta_out, delta, new_state, tangents) -> None:
    """A rule's results written in place.

    The update added to ``param`` (in its own dtype: a half-precision parameter rounds the
    update once), or written to ``delta_out``; the new state into ``state``; each tangent into
    its buffer, row by row (a rule that ignores a coefficient may give a 0-d zero, broadcast).
    """
    if delta_out is None:
        param.add_(delta)
    else:
        delta_out.copy_(delta)
    for k, v in new_state.items():
        state[k].copy_(v)
    for j, t in enumerate(tangents):
        tangent[j].copy_(t.expand_as(tangent[j]))


def coefficient_dict(names, coef: Tensor) -> dict[str, Tensor]:
    """The coefficient vector as the family's rules take it: name -> 0-d tensor."""
    return {n: coef[i] for i, n in enumerate(names)}


def derived_rule(spec: RuleSpec, grad, param, state, coef, group, step, zero_tangents: bool = True):
    """(Δ, new state, [∂Δ/∂c_k for k in learned]) from the family's ``update`` alone.

    ``zero_tangents``: every input besides the coefficient enters with an explicit zero tangent
    (for inductor, below); False: with none, so forward mode leaves out their terms as the
    generic path's reverse mode does (``metaopt.codegen``, which writes no term it leaves out).
    """
    family, values = spec.family, coefficient_dict(spec.names, coef)
    if not spec.learned:
        delta, new_state = family.update(grad, param, state, values, group, step)
        return delta, new_state, []
    tangents = []
    for k in spec.learned:
        others = {n: v for n, v in values.items() if n != k}

        def rule(c, grad, param, state, others, k=k):
            return family.update(grad, param, state, {**others, k: c}, group, step)

        # Every other input enters with an explicit zero tangent: left without one, forward
        # mode gives e.g. torch.add(u, param, alpha=λ) the tangent of param as a storage-less
        # "efficient zero" tensor, which inductor (torch 2.13, CPU) reuses as a buffer and
        # crashes on. Zeros made in the graph are constants in the kernel, not memory traffic.
        # (a parameter's gradient, value and state are views into a bucket's flat buffers; a
        # view with a storage offset cannot be made dual under dynamic shapes, so the duals are
        # made of copies, fused away)
        if not zero_tangents:
            (delta, new_state), (tangent, _) = torch.func.jvp(
                lambda c, k=k, others=others: family.update(grad, param, state, {**others, k: c}, group, step),
                (values[k],), (torch.ones_like(values[k]),))
            tangents.append(defined_tangent(tangent, delta))
            continue
        primals = (values[k], grad.clone(), param.clone(), {n: v.clone() for n, v in state.items()}, others)
        zeros = (torch.zeros_like(grad), torch.zeros_like(param), {n: torch.zeros_like(v) for n, v in state.items()},
                 {n: torch.zeros_like(v) for n, v in others.items()})
        (delta, new_state), (tangent, _) = torch.func.jvp(rule, primals, (torch.ones_like(values[k]), *zeros))
        tangents.append(defined_tangent(tangent, delta))
    return delta, new_state, tangents


class HandDerivedRule:
    """The family's hand-derived ``fused_scalars`` and ``fused_update``: the fused path."""

    path_name = "fused"

    @staticmethod
    def over_buckets(family) -> bool:
        """Whether a group may run as one flat bucket: a hand-derived rule is elementwise."""
        return True

    @staticmethod
    def bucket_step(spec: RuleSpec, item: BucketItem, coef: Tensor) -> None:
        """One bucket through the fused rule, parameters, state and tangents in place."""
        cd = compute_dtype(item.param.dtype)
        scalars = spec.family.fused_scalars(coefficient_dict(spec.names, coef), item.hp, item.step, spec.learned)
        write_step(item.param, item.state, item.tangents, None,
                   *spec.family.fused_update(item.grad.to(cd), item.param.to(cd), item.state, scalars, spec.learned))

    @staticmethod
    def param_step(spec: RuleSpec, grad, param, state, tangents, scalars) -> None:
        """One parameter through the fused rule (``scalars``: its own), written in place."""
        write_step(param, state, tangents, None, *spec.family.fused_update(grad, param, state, scalars, spec.learned))

    def per_tensor(self, path, group, state, entries, steps, coef) -> None:
        """One group's parameters on one device: ``entries`` (parameter, its views), ``coef`` on that device."""
        spec, family = path.spec, path.family
        hp = path.hyperparameters(group, path.compiled)
        # the 0-d work of every parameter at once, vectorised over their step counts
        scalars = family.fused_scalars(coefficient_dict(spec.names, coef), hp, torch.stack(steps), spec.learned)
        per_param = {k: v.unbind(0) for k, v in scalars.items() if torch.is_tensor(v) and v.ndim == 1}
        for i, (p, (loc, grad, _)) in enumerate(entries):
            st = state[p]
            sc = {k: (per_param[k][i] if k in per_param else v) for k, v in scalars.items()}
            fam_state = family_state(st)
            tangents = [st[key] for key in path.tangent_keys]
            if path.compiled and all(t.is_contiguous() for t in (grad, loc, *fam_state.values(), *tangents)):
                # one rank-1 graph with a dynamic length serves every parameter
                flat = {k: v.view(-1) for k, v in fam_state.items()}
                if path.run_param_step(spec, grad.view(-1), loc.view(-1), flat, [t.view(-1) for t in tangents], sc):
                    continue
            self.param_step(spec, grad, loc, fam_state, tangents, sc)


class DerivedRule:
    """The family's ``update``, its tangents derived by forward mode: the compiled path."""

    path_name = "compiled"

    @staticmethod
    def over_buckets(family) -> bool:
        """Whether a group may run as one flat bucket: only a rule that does not mix coordinates."""
        return bool(family.elementwise)

    @staticmethod
    def bucket_step(spec: RuleSpec, item: BucketItem, coef: Tensor) -> None:
        """One bucket through the derived rule, parameters, state and tangents in place."""
        cd = compute_dtype(item.param.dtype)
        write_step(item.param, item.state, item.tangents, None,
                   *derived_rule(spec, item.grad.to(cd), item.param.to(cd), item.state, coef, item.hp, item.step))

    @staticmethod
    def param_step(spec: RuleSpec, grad, param, state, tangents, coef, group, step, delta_out=None) -> None:
        """One parameter through the derived rule, written in place (the update into ``delta_out`` where given)."""
        write_step(param, state, tangents, delta_out, *derived_rule(spec, grad, param, state, coef, group, step))

    def tangents_of(self, path, st) -> Any:
        """What ``param_step`` takes as tangents, from a parameter's state."""
        return [st[key] for key in path.tangent_keys]

    def per_tensor(self, path, group, state, entries, steps, coef) -> None:
        """One group's parameters on one device, each through one dynamic-shape graph."""
        hp = path.hyperparameters(group, compiled=True)
        for (p, (loc, grad, param)), step in zip(entries, steps):
            st = state[p]
            args = (path.spec, grad, param, family_state(st), self.tangents_of(path, st), coef, hp, step)
            delta_out = torch.empty_like(param) if loc.dtype != param.dtype else None
            if loses_writes_in_a_graph(param) or not path.run_param_step(*args, delta_out):
                self.param_step(*args, delta_out)  # a 0-d float64 parameter: its few ops eagerly
            if delta_out is not None:  # half-precision parameter: the fp32 update rounded once
                loc.add_(delta_out)


class ForwardRule(DerivedRule):
    """The family's ``update`` under the forward mode's jvps ([`Forward`][metaopt.Forward]), compiled.

    Its tangents are (the parameter's, {dependent state buffer: its tangents}), each carried
    from step to step and written in place.
    """

    @staticmethod
    def bucket_step(spec: RuleSpec, item: BucketItem, coef: Tensor) -> None:
        """One bucket through the forward mode's rule, parameters, state and both kinds of tangents in place."""
        cd = compute_dtype(item.param.dtype)
        ForwardRule.param_step(spec, item.grad.to(cd), item.param, item.state, (item.tangents, item.state_tangents),
                               coef, item.hp, item.step)

    @staticmethod
    def param_step(spec: RuleSpec, grad, param, state, tangents, coef, group, step, delta_out=None) -> None:
        """One parameter through ``metaopt.hyper.forward.forward_update``, written in place."""
        theta_t, state_t = tangents
        # copies: a view with a storage offset (a state buffer's, a per-group coefficient row) cannot
        # be made dual in a graph (fused away)
        delta, new_state, new_theta, new_state_t = forward_update(
            spec.family, grad, param.to(compute_dtype(param.dtype), copy=True), {n: v.clone() for n, v in state.items()},
            coef.clone(), spec.names, spec.learned_index, group, step, spec.decay, theta_t, state_t,
        )
        write_step(param, state, theta_t, delta_out, delta, new_state, new_theta)
        for b, _ in spec.state_tangents:
            for buf, value in zip(state_t[b], new_state_t[b]):
                buf.copy_(value)

    def tangents_of(self, path, st) -> Any:
        """The parameter's tangents and each dependent state buffer's, from a parameter's state."""
        return [st[key] for key in path.tangent_keys], {b: [st[k] for k in ks] for b, ks in path.spec.state_tangents}


def rule_for(name: str, forward: bool):
    """The rule object of path ``name`` ("fused" or "compiled"), in forward mode or not."""
    if name == "fused":
        return HandDerivedRule()
    return ForwardRule() if forward else DerivedRule()
