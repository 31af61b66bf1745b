"""The compiled path: any family's own ``update``, its tangents derived automatically, compiled.

A family author writes ``init`` and ``update`` and nothing else; under ``compile=True`` (or
``path="compiled"``) the engine differentiates ``update`` with respect to each learned
coefficient in forward mode — one ``torch.func.jvp`` per coefficient, the tangent 1 on that
coefficient's 0-d value, so that ``∂Δ/∂c_k`` comes out exact for any rule — and compiles the rule
with its K tangents into one inductor graph, where the K forward passes share the primal's
arithmetic. An elementwise family (``Family.elementwise``) runs over flat buckets like the fused
path: per step one BLAS dot product per group for the hyper-gradient, then the hyper-step and
the rule over every group's flat buffers in one static-shape graph. A family that mixes
coordinates runs parameter by parameter (one dynamic-shape graph serves every length), since
concatenating its parameters would change its rule.

Forward mode rather than the reverse pass the generic path takes for elementwise rules: the
reverse pass (``torch.func.vjp`` over full-size coefficient leaves) did not compile on torch 2.13
CPU (a storage-less zero cotangent inside inductor), and forward mode is exact for rules that
mix coordinates too. Costs: ``benchmarks/compiled_cost.py``.
"""

from __future__ import annotations

import torch

from ..hyper.forward import forward_update
from ..types import defined_tangent, family_state
from .base import coefficient_row, loses_writes_in_a_graph
from .fused import FusedPath, hyper_step_into, write_step


def derived_rule(family, learned, names, grad, param, state, coef, group, step):
    """(Δ, new state, [∂Δ/∂c_k for k in learned]) from the family's ``update`` alone."""
    values = {n: coef[i] for i, n in enumerate(names)}
    if not learned:
        delta, new_state = family.update(grad, param, state, values, group, step)
        return delta, new_state, []
    tangents = []
    for k in learned:
        others = {n: v for n, v in values.items() if n != k}

        def rule(c, grad, param, state, others, k=k):
            return family.update(grad, param, state, {**others, k: c}, group, step)

        # Every other input enters with an explicit zero tangent: left without one, forward
        # mode gives e.g. torch.add(u, param, alpha=λ) the tangent of param as a storage-less
        # "efficient zero" tensor, which inductor (torch 2.13, CPU) reuses as a buffer and
        # crashes on. Zeros made in the graph are constants in the kernel, not memory traffic.
        # (state entries are often views into a flat buffer; a view with a storage offset cannot
        # be made dual under dynamic shapes, so the duals are made of copies, fused away)
        primals = (values[k], grad, param, {n: v.clone() for n, v in state.items()}, others)
        zeros = (torch.zeros_like(grad), torch.zeros_like(param), {n: torch.zeros_like(v) for n, v in state.items()},
                 {n: torch.zeros_like(v) for n, v in others.items()})
        (delta, new_state), (tangent, _) = torch.func.jvp(rule, primals, (torch.ones_like(values[k]), *zeros))
        tangents.append(defined_tangent(tangent, delta))
    return delta, new_state, tangents


def derived_param_step(family, learned, names, grad, param, state, tangent, coef, group, step, delta_out=None):
    """One parameter (or a bucket's flat buffers) through ``derived_rule``.

    State and tangents are written in place, the update added to ``param`` or written to
    ``delta_out``.
    """
    write_step(param, state, tangent, delta_out,
               *derived_rule(family, learned, names, grad, param, state, coef, group, step))


def derived_buckets(family, learned, names, record, hyper, buckets):
    """The hyper-step (where one is due) and the derived rule over every bucket of a step, one graph.

    ``buckets``: (grad, param, state, tangents, delta_out, step, hyperparameters, row), as for
    ``metaopt.paths.fused.bucket_rules``.
    """
    hyper_step_into(record, hyper)
    for grad, param, state, tangents, delta, step, hp, row in buckets:
        coef = coefficient_row(record.coefficients, row)
        derived_param_step(family, learned, names, grad, param, state, tangents, coef, hp, step, delta)


def forward_param_step(family, spec, names, grad, param, state, tangents, coef, group, step, delta_out=None):
    """One parameter (or a bucket's flat buffers) through the forward mode's rule.

    The rule is ``metaopt.hyper.forward.forward_update``: the family's ``update`` under one jvp
    per learned coefficient, the carried parameter and state tangents as the jvp's tangents.
    ``spec``: (indices of the learned coefficients, decay, the dependent state buffers);
    ``tangents``: (the parameter's tangents, {buffer: its tangents}), each written in place.
    """
    learned_index, decay, buffers = spec
    theta_t, state_t = tangents
    # copies: a view with a storage offset (a state buffer's, a per-group coefficient row) cannot
    # be made dual in a graph (fused away)
    delta, new_state, new_theta, new_state_t = forward_update(
        family, grad, param.clone(), {n: v.clone() for n, v in state.items()}, coef.clone(), names, learned_index, group,
        step, decay, theta_t, state_t,
    )
    write_step(param, state, theta_t, delta_out, delta, new_state, new_theta)
    for b in buffers:
        for buf, value in zip(state_t[b], new_state_t[b]):
            buf.copy_(value)


def forward_buckets(family, spec, names, record, hyper, buckets):
    """The hyper-step (where one is due) and the forward mode's rule over every bucket of a step.

    One graph (as ``derived_buckets``).
    """
    hyper_step_into(record, hyper)
    for grad, param, state, tangents, delta, step, hp, row in buckets:
        coef = coefficient_row(record.coefficients, row)
        forward_param_step(family, spec, names, grad, param, state, tangents, coef, hp, step, delta)


class CompiledPath(FusedPath):
    """The family's ``update`` with automatically derived tangents, through ``torch.compile``.

    In forward mode ([`Forward`][metaopt.Forward]) its state tangents too.
    """

    name = "compiled"
    BUCKETS_STEP = staticmethod(derived_buckets)
    PARAM_STEP = staticmethod(derived_param_step)
    forward_mode = False  # (a path pickled before forward mode ran here has none)

    def __init__(self, family, names, learned, dtype, device, compile=True, forward=None, per_group=False) -> None:
        #: forward mode with something to learn: the rule functions carry state tangents too
        self.forward_mode = forward is not None and bool(learned)
        if self.forward_mode:
            # an instance attribute: FusedPath compiles copies of whichever pair is here
            self.BUCKETS_STEP, self.PARAM_STEP = forward_buckets, forward_param_step
        super().__init__(family, names, learned, dtype, device, compile=True, forward=forward, per_group=per_group)
        # a rule that mixes coordinates must see each parameter whole
        self.bucketed = bool(family.elementwise)

    @property
    def rule_learned(self):
        """What the rule functions take as ``learned``.

        The learned coefficients' names, or in forward mode (their indices, decay, the dependent
        state buffers).
        """
        if self.forward_mode:
            decay, keys = self.forward
            return tuple(self.learned_index), decay, tuple(keys)
        return self.learned

    @staticmethod
    def probe_rule(family, grad, param, state, coef, hp, step, learned):
        """The rule as the bucketed step runs it, for ``rule_reads_param``: the family's ``update``."""
        return family.update(grad, param, state, {n: coef[i] for i, n in enumerate(family.space.names)}, hp, step)

    def _tangents(self, tangents, flat):
        """The tangents the rule functions take.

        The parameter's, and in forward mode with each dependent state buffer's (read from
        ``flat``: the bucket's buffers or the state).
        """
        if self.forward_mode:
            return tangents, {b: [flat[k] for k in ks] for b, ks in self.forward[1].items()}
        return tangents

    def _bucket_items(self, work):
        out = super()._bucket_items(work)
        if out is None or not self.forward_mode:
            return out
        plan, items = out
        items = [(*item[:3], self._tangents(item[3], bucket.flat), *item[4:]) for (_, bucket), item in zip(plan, items)]
        return plan, items

    def bucket_plan(self, groups, state):
        """The step over flat buckets for an elementwise family; None for one that mixes coordinates."""
        return super().bucket_plan(groups, state) if self.bucketed else None

    def _group_per_tensor(self, group, state, entries, steps, coef) -> None:
        hp = self.hyperparameters(group, compiled=True)
        for (p, (loc, grad, param)), step in zip(entries, steps):
            st = state[p]
            fam_state = family_state(st)
            tangents = self._tangents([st[key] for key in self.tangent_keys], st)
            args = (self.family, self.rule_learned, self.names, grad, param, fam_state, tangents, coef, hp, step)
            delta_out = torch.empty_like(param) if loc.dtype != param.dtype else None
            if loses_writes_in_a_graph(param):  # a 0-d float64 parameter: its few ops eagerly
                self.PARAM_STEP(*args, delta_out)
            else:
                try:
                    self.param_step(*args, delta_out)
                except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
                    if self.param_step is self.PARAM_STEP:
                        raise
                    self._eager(err)
                    self.PARAM_STEP(*args, delta_out)
            if delta_out is not None:  # half-precision parameter: the fp32 update rounded once
                loc.add_(delta_out)
