"""The interface every execution path implements, and what the paths share.

An execution path is one way to run a family's rule over an optimizer's param groups. The
optimizer drives every path through the same three calls per step, in the order of the data::

    work = path.plan(param_groups, state)      # what runs how; reads, changes nothing
    h = path.hypergradient(work)                # Σ ⟨g_t, ∂θ_{t-1}/∂c⟩, None: nothing to learn from
    record = path.update(work, record, hyper)   # the hyper-step (hyper: a HyperStep, or None),
                                                # then the rule with the coefficients it leaves

A path implements ``plan``, ``hypergradient`` and ``run_rule(work, coefficients)`` (parameters,
state and tangents in place); ``update`` applies the hyper-step eagerly and then runs ``run_rule``,
and a path that compiles may run both in one graph instead.

A path keeps tangents for the coefficients ``learned`` it was built with (none: the rule alone).
It owns whatever it derives for speed (flat buckets, compiled functions, a C kernel) and nothing
else; ``opt.state`` stays the one place per-parameter state lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..hyper.one_step import hypergradient
from ..hyper.update import HyperState, HyperStep
from ..state import Buckets, start_state
from ..sharding import is_dtensor, local, shard_key
from ..types import Tensor, compute_dtype, tangent_keys

def views(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(local parameter, its gradient and its value in the compute precision): what the rule reads.

    The update is added to the local parameter.
    """
    loc = local(p)
    dtype = compute_dtype(loc.dtype)
    return loc, local(p.grad).to(dtype), loc.to(dtype)


def loses_writes_in_a_graph(t: Tensor) -> bool:
    """Whether a compiled graph would silently drop a write into ``t``.

    Torch 2.13's inductor hands a 0-d float64 CPU input to its C++ kernel by value (a float64
    run's hyper-Adam step count stayed 0, a 0-d parameter never moved). Writing through a 1-d
    view made inside the graph kept the value but corrupted the heap; so such tensors are
    written eagerly: the hyper-step runs eagerly on a CPU anyway (FusedPath.update), and the
    compiled path's per-tensor rule asks this of each parameter (the fused path's already sees
    1-d views).
    """
    return t.dim() == 0 and t.dtype == torch.float64 and t.device.type == "cpu"


def coefficient_row(coefficients: Tensor, gi: int | None) -> Tensor:
    """The coefficient vector param group ``gi`` runs with.

    The shared one (a vector; ``gi`` may then be None), or the group's own row of the per-group
    matrix.
    """
    return coefficients if coefficients.dim() == 1 else coefficients[gi]


def dots(g: Tensor, tangents: list[Tensor]) -> Tensor:
    """[⟨g, t⟩ for t in tangents]: one pass over g when compiled."""
    flat = g.reshape(-1)
    return torch.stack([torch.dot(flat.to(t.dtype), t.reshape(-1)) for t in tangents])


@dataclass
class PerTensorPlan:
    """A step parameter by parameter: nothing to decide beforehand."""

    groups: list
    state: Any


class ExecutionPath:
    """One way to run ``family``'s rule (see the module docstring for the three calls).

    ``names``: every coefficient, in the family space's order (the order of the coefficient
    vector ``update`` receives); ``learned``: the coefficients to keep tangents for; ``dtype``
    and ``device``: the coefficients', which step counts and hyper-gradients share;
    ``forward``: the forward mode's (decay, state buffer -> its tangent keys), None otherwise;
    ``per_group``: each param group has coefficients of its own — the coefficient vector a
    path receives is then a (groups, n) matrix, group i's row the coefficients of group i, and
    a hyper-gradient is (groups, K), each row summed over that group's parameters.
    """

    #: "generic", "fused", "compiled" or "native"
    name: str
    #: whether this path keeps flat buckets (``load_state_dict`` rebuilds them)
    bucketed: bool = False

    @property
    def all_tangent_keys(self) -> tuple[str, ...]:
        """Every tangent buffer a parameter's state holds once it has stepped.

        The parameter's (one per learned coefficient) and, in forward mode, each dependent
        state buffer's.
        """
        extra = () if self.forward is None else tuple(k for keys in self.forward[1].values() for k in keys)
        return self.tangent_keys + extra

    def __init__(self, family, names: Sequence[str], learned: Sequence[str], dtype: torch.dtype, device,
                 compile: bool = False, forward: tuple[float, dict[str, tuple[str, ...]]] | None = None,
                 per_group: bool = False) -> None:
        self.family = family
        self.forward = forward
        self.per_group = per_group
        self.names = tuple(names)
        self.learned = tuple(learned)
        self.tangent_keys = tangent_keys(self.learned)
        self.learned_index = [self.names.index(n) for n in self.learned]
        self.dtype, self.device = dtype, torch.device(device)
        self.compile = compile
        self.buckets = Buckets()
        #: the (group, shape, dtype, device) kinds of parameter whose first step was held to the
        #: family's contract (``metaopt.state.start_state``)
        self.first_steps: set = set()
        self.dots = dots
        self._like = torch.empty(0, dtype=dtype, device=self.device)  # h's dtype and device

    # -- the interface ---------------------------------------------------------------------
    def plan(self, groups: list[dict[str, Any]], state) -> Any:
        """What this step runs how, from the param groups and the state; reads, changes nothing."""
        raise NotImplementedError

    def hypergradient(self, work) -> Tensor | None:
        """Σ ⟨g_t, ∂θ_{t-1}/∂c⟩ from the tangents the last step kept; None: nothing to learn from."""
        raise NotImplementedError

    def run_rule(self, work, coefficients: Tensor) -> None:
        """Run the family's rule with ``coefficients``: parameters, state and tangents in place."""
        raise NotImplementedError

    def update(self, work, record: HyperState, hyper: HyperStep | None) -> HyperState:
        """The hyper-step where one is due, then the rule with the coefficients it leaves."""
        if hyper is not None:
            record = hyper.apply(record)
        self.run_rule(work, record.coefficients)
        return record

    def restore(self, groups, state) -> None:
        """After ``load_state_dict`` replaced the state: rebuild what the path derives from it."""
        self.buckets.clear()
        if self.bucketed:
            self.buckets.restore(groups, state)

    def zero_flat_grads(self) -> set[int]:
        """Zero the gradients that are views into a flat bucket, in place; the ids of their parameters."""
        done: set[int] = set()
        for bucket in self.buckets.values():
            if bucket.zero_grad():
                done.update(id(p) for p in bucket.params)
        return done

    def ready(self) -> bool:
        """Whether the path can run in this process.

        A native kernel that no longer loads after unpickling cannot.
        """
        return True

    # -- shared by the per-tensor paths ----------------------------------------------------
    coefficient_row = staticmethod(coefficient_row)

    def rows(self, groups) -> int | None:
        """How many rows a hyper-gradient has: one per group with coefficients per group."""
        return len(groups) if self.per_group else None

    def hypergradient_of(self, pairs, rows: int | None, dots=None) -> Tensor:
        """``h = Σ ⟨g, tangents⟩`` over (param, grad, tangents, param group index) quadruples.

        Each parameter's K products come from ``dots`` (the path's own by default); ``rows``
        (``rows()``): per group, h is (rows, K). A sharded (DTensor) parameter contributes a
        partial sum: those are all-reduced over the mesh dimensions it is sharded on — one
        collective of K numbers, G×K per group, per hyper-step (FSDP2); replicated and plain
        tensors (DDP: gradients already averaged) need none.
        """
        k = len(self.learned)
        like = self._like
        plain, sharded = [], {}
        for p, g, tangents, gi in pairs:
            key = shard_key(p)
            (plain if key is None else sharded.setdefault(key, [])).append((local(g), tangents, gi))
        dots = dots or self.dots
        h = hypergradient(plain, k, like, dots, rows)
        for (mesh, dims), part in sharded.items():
            partial = hypergradient(part, k, like, dots, rows)
            for d in dims:
                torch.distributed.all_reduce(partial, group=mesh.get_group(d))
            h = h + partial
        return h

    def per_tensor_hypergradient(self, groups, state) -> Tensor | None:
        """The hyper-gradient h from the tangents the last step kept, parameter by parameter.

        A whole intact bucket's gradients are gathered and dotted at once; None where no
        parameter kept any.
        """
        pairs, covered = [], set()
        for (gi, _), bucket in list(self.buckets.items()):
            params = [p for p in groups[gi]["params"] if p.device == bucket.params[0].device]
            states = [state[p] for p in params]
            if bucket.owns and bucket.intact(params, states) and all(p.grad is not None for p in params):
                pairs.append((None, bucket.take_grads(), bucket.tangents, gi))
                covered.update(id(p) for p in params)
        for gi, group in enumerate(groups):
            for p in group["params"]:
                if id(p) in covered:
                    continue
                st = state.get(p)
                if p.grad is not None and st is not None and self.tangent_keys and self.tangent_keys[0] in st:
                    pairs.append((p, p.grad, [st[key] for key in self.tangent_keys], gi))
        return self.hypergradient_of(pairs, self.rows(groups)) if pairs else None

    def ready_by_device(self, group, state, tangents: bool):
        """A group's parameters that take this step, by device, as (param, its views).

        Their state is started (zero tangents where ``tangents``: a fast rule updates them in
        place); a parameter without a gradient drops its tangents (a stale one would bias the
        next h).
        """
        ready: dict[torch.device, list[tuple[Tensor, tuple[Tensor, Tensor, Tensor]]]] = {}
        for p in group["params"]:
            st = state[p]
            if p.grad is None:
                if self.forward is None:  # forward mode: θ and s unchanged, their tangents still hold
                    for key in self.tangent_keys:
                        st.pop(key, None)
                continue
            v = loc, grad, param = views(p)
            start_state(self.family, st, grad, param, group, self.dtype, self.all_tangent_keys if tangents else (),
                        self.first_steps)
            ready.setdefault(loc.device, []).append((p, v))
        return ready
