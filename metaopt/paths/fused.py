"""The fused path: a family's hand-derived rule and tangents in plain elementwise torch ops.

The rule and tangents are the family's ``fused_scalars`` and ``fused_update``, run eagerly or
through ``torch.compile``.

Where every parameter of every group has a gradient on the coefficients' device, each group runs
as one flat bucket (``metaopt.state``): the hyper-gradient's dot products as one BLAS call
per group, then the hyper-step and the rule over every group's flat buffers, compiled into one
graph (``compile=True``, static shapes: compiled once; on a CPU the hyper-step runs eagerly
before the graph, see ``FusedPath.update``). Otherwise, and once a parameter has sat
a step out, it runs parameter by parameter (compiled with dynamic shapes: one graph for every
length), the hyper-step eagerly before it.
"""

from __future__ import annotations

import itertools
import types
import warnings
from dataclasses import dataclass, field

import torch

from ..hyper import update as hyper_update
from ..state import FlatBucket, start_state
from ..types import STEP, family_state
from ..sharding import is_dtensor
from .base import ExecutionPath, PerTensorPlan, coefficient_row, dots, views


def fused_param_step(family, learned, grad, param, state, scalars, tangent, delta_out=None):
    """One parameter (or a bucket's flat buffers) through the family's fused rule.

    State and tangents (one buffer per learned coefficient, so that one compiled kernel writes
    them all) are updated in place. The update is added to ``param``, or written to
    ``delta_out`` for a bucket, whose parameters are not contiguous with each other.
    """
    write_step(param, state, tangent, delta_out, *family.fused_update(grad, param, state, scalars, learned))


def write_step(param, state, tangent, delta_out, delta, new_state, tangents) -> None:
    """A rule's results written in place.

    The update is added to ``param`` (or written to ``delta_out`` for a bucket, whose parameters
    are not contiguous with each other), the new state into ``state``, each tangent into its
    buffer, row by row (no stacked temporary; a rule that ignores a coefficient may give a 0-d
    zero, broadcast).
    """
    if delta_out is None:
        param.add_(delta)
    else:
        delta_out.copy_(delta)
    for k, v in new_state.items():
        state[k].copy_(v)
    for j, t in enumerate(tangents):
        tangent[j].copy_(t.expand_as(tangent[j]))


def hyper_step_into(record, hyper) -> None:
    """The hyper-step (where one is due) inside a compiled step, written into ``record``'s tensors.

    So the graph returns nothing (building a record of new outputs every step cost the
    one-element problem 5%).
    """
    if hyper is None:
        return
    coefficients, buffers, last_h, skipped = hyper_update.step_values(
        hyper.config, record, hyper.h, active=hyper.active, record=hyper.record
    )
    for old, value in zip((record.coefficients, record.last_h, record.skipped), (coefficients, last_h, skipped)):
        old.copy_(value)
    for k, buf in record.buffers.items():
        buf.copy_(buffers[k])


def flat_params(params, grad):
    """A bucket's parameters as one vector in the rule's precision (``grad``'s), copied.

    Every step, whether the rule reads them or not: the engine does not know what a family's
    rule reads. (Made inside the compiled graph, where an unused one would be dropped, the
    concatenation made inductor synchronise with a CUDA device while compiling.)
    """
    return torch.cat([p.reshape(-1) for p in params]).to(grad.dtype)


def rule_reads_param(rule, family, hp, names, learned, dtype) -> bool:
    """Whether ``rule(family, grad, param, state, coef, hp, step, learned)`` reads ``param``.

    Run on six elements with two different parameters: equal outputs, bit for bit, mean it does
    not. ``hp`` as the bucketed step passes it (lr a 0-d tensor).
    """
    grad = torch.linspace(-1.0, 1.0, 6, dtype=dtype)
    coef = family.space.tensors(dtype)[0]
    step = torch.ones((), dtype=dtype)
    hp = {k: (v.detach().to("cpu", dtype) if torch.is_tensor(v) else v) for k, v in hp.items()}
    outputs = []
    for param in (torch.linspace(0.5, 1.5, 6, dtype=dtype), torch.linspace(-3.0, -2.0, 6, dtype=dtype)):
        state = family.init(param, grad, hp)
        delta, new_state, *rest = rule(family, grad, param, state, coef, hp, step, learned)
        outputs.append([delta, *new_state.values(), *(rest[0] if rest else [])])
    return not all(torch.equal(a, b) for a, b in zip(*outputs))


def bucket_rules(family, learned, names, record, hyper, buckets):
    """The hyper-step (``hyper``, where one is due) and then the rule over every bucket of a step.

    Written to compile into one graph. ``buckets``: (grad, param, state, tangents, delta_out,
    step, hyperparameters, row) per group, ``param`` the group's parameters as one vector
    (``flat_params``), ``row`` the group's row of per-group coefficients (None: the coefficients
    are shared).
    """
    hyper_step_into(record, hyper)
    for grad, param, state, tangents, delta, step, hp, row in buckets:
        coef = coefficient_row(record.coefficients, row)
        coef_dict = {n: coef[i] for i, n in enumerate(names)}
        scalars = family.fused_scalars(coef_dict, hp, step, learned)  # equal steps in a bucket
        fused_param_step(family, learned, grad, param, state, scalars, tangents, delta)


_copies = itertools.count()


def _own_copy(fn):
    """A function with the same body as ``fn`` but a code object of its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@dataclass
class BucketPlan(PerTensorPlan):
    """A step over flat buckets.

    It lists the groups whose bucket is intact, those that start as one now, and the buckets
    whose gradients were already gathered this step.
    """

    intact: list[tuple[dict, FlatBucket]] = field(default_factory=list)
    fresh: list[tuple[int, dict, list]] = field(default_factory=list)
    gathered: set[int] = field(default_factory=set)

    def grads(self, bucket: FlatBucket):
        """The bucket's flat gradient, gathered once per step (the first call gathers it)."""
        if id(bucket) not in self.gathered:
            bucket.gather_grads()
            self.gathered.add(id(bucket))
        return bucket.grad


class FusedPath(ExecutionPath):
    """The family's hand-derived ``fused_update`` in torch ops, over flat buckets where it can, eager or compiled."""

    name = "fused"
    bucketed = True
    #: the step over buckets and the step of one parameter, eagerly (compiled copies of them
    #: run under compile=True); the compiled path puts its own here
    BUCKETS_STEP = staticmethod(bucket_rules)
    PARAM_STEP = staticmethod(fused_param_step)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flags = torch.tensor([False, True], device=self.device)  # indexed by host bools: no copy
        self._set_functions()

    def _set_functions(self) -> None:
        self._eager_functions()
        if self.compile:
            # Each optimizer compiles its own copies: dynamo keeps its cache on the code
            # object, and sharing it between optimizers that learn different numbers of
            # coefficients trips a dynamo bug (IndexError while checking list guards).
            # The bucketed rule sees fixed bucket sizes (static shapes: one graph, compiled
            # once); the per-tensor fallbacks see every tensor's length (dynamic). On a GPU
            # the hyper-step (~25 ops on K numbers) runs inside the bucketed graph: eagerly, or
            # as a graph of its own, it was the fixed cost of a step on a small model (measured
            # on the CPU: benchmarks/compare_commits.py, the overhead section); on a CPU it runs
            # eagerly (update() says why).
            self.bucketed_step = torch.compile(_own_copy(self.BUCKETS_STEP), dynamic=False)
            self.param_step = torch.compile(_own_copy(self.PARAM_STEP), dynamic=True)
            self.dots = torch.compile(_own_copy(dots), dynamic=True)

    def _eager_functions(self) -> None:
        self.bucketed_step, self.param_step, self.dots = self.BUCKETS_STEP, self.PARAM_STEP, dots

    @property
    def compiled(self) -> bool:
        """Whether the compiled functions are in use (compile on, and not fallen back)."""
        return self.param_step is not self.PARAM_STEP

    def _eager(self, err) -> None:
        warnings.warn(f"metaopt: torch.compile failed ({err!r:.300}); running eagerly")
        self._eager_functions()

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("bucketed_step", "param_step", "dots"):  # compiled functions do not pickle
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._set_functions()

    # -- plan ------------------------------------------------------------------------------
    def plan(self, groups, state):
        """The step over flat buckets where it applies, else parameter by parameter."""
        return self.bucket_plan(groups, state) or PerTensorPlan(groups, state)

    def bucket_plan(self, groups, state) -> BucketPlan | None:
        """The step over flat buckets, where it applies.

        It applies where every parameter has a dense gradient on the coefficients' device, and
        each group's state is one intact bucket or starts now with parameters that fit one.
        None leaves the step to the per-tensor path.
        """
        device = self.device
        intact, fresh = [], []
        for gi, group in enumerate(groups):
            params = group["params"]
            if not params:
                continue
            if any(p.grad is None or p.device != device or is_dtensor(p) for p in params):
                return None
            bucket = self.buckets.intact(gi, params, state, device)
            if bucket is not None:
                intact.append((group, bucket))
            elif self.buckets.starts(gi, params, state, device) and _fit_one_buffer(params):
                fresh.append((gi, group, params))
            else:
                return None
        return BucketPlan(groups, state, intact, fresh) if intact or fresh else None

    # -- hyper-gradient --------------------------------------------------------------------
    def hypergradient(self, work):
        """The hyper-gradient h from the last step's tangents: one dot product per intact bucket, or per tensor."""
        if not isinstance(work, BucketPlan):
            return self.per_tensor_hypergradient(work.groups, work.state)
        if not work.intact:  # every group starts now: no tangents to learn from
            return None
        # the dot products eagerly, as BLAS calls: inductor's K reductions over N ran slower
        pairs = [(None, work.grads(bucket), bucket.tangents, bucket.group_index) for _, bucket in work.intact]
        return self.hypergradient_of(pairs, self.rows(work.groups), dots)

    # -- the rule --------------------------------------------------------------------------
    def update(self, work, record, hyper):
        """The hyper-step where one is due, then the fused rule over the buckets (or per tensor)."""
        if isinstance(work, BucketPlan):
            items = self._bucket_items(work)
            if items is not None:
                if hyper is not None and self.compiled and self.device.type != "cpu":
                    # inside the graph, its flags as data: one graph for every step, and no ~25
                    # small kernel launches of an eager hyper-step
                    hyper = hyper.as_data(self.flags, record)
                elif hyper is not None:
                    # eagerly, branches on the host. On a CPU always: with the hyper-step inside
                    # the graph, fresh runs of the nanoGPT char model's compiled step corrupted the
                    # heap in 5 of 11 (none in 9 with it eager) and the step was slower (7-10x
                    # fused Adam against 5-6x; AMD EPYC, AVX-512, 2 cores); and inductor drops its
                    # writes into 0-d float64 CPU tensors such as hyper-Adam's step count (see
                    # loses_writes_in_a_graph)
                    record, hyper = hyper.apply(record), None
                return self._run_rules(record, hyper, items)
        return super().update(work, record, hyper)  # the hyper-step eagerly, then rule()

    def rule(self, work, coefficients):
        """The fused rule parameter by parameter (the step the buckets do not take)."""
        self.rule_per_tensor(work.groups, work.state, coefficients)

    @property
    def rule_learned(self):
        """What the rule functions take as ``learned``: the learned coefficients' names."""
        return self.learned

    def _bucket_items(self, work: BucketPlan):
        """Start the groups that start now as buckets, count the step, and list what the bucketed rule reads.

        None (the per-tensor rule takes the step) where a new group's parameters turn out to
        have different state keys.
        """
        state = work.state
        plan = list(work.intact)
        for gi, group, params in work.fresh:
            states = [state[p] for p in params]
            for p, st in zip(params, states):
                _, grad, param = views(p)
                start_state(self.family, st, grad, param, group, self.dtype, self.all_tangent_keys, self.first_steps)
            bucket = self.buckets.make(gi, self.device, params, states)
            if bucket is None:  # the family's state keys differ between parameters
                return None
            plan.append((group, bucket))
        items = []
        for group, bucket in plan:
            bucket.step.add_(1)
            step = state[bucket.params[0]][STEP]  # equal in a bucket
            hp = self.hyperparameters(group, compiled=True)
            grad = work.grads(bucket)
            tangents = bucket.tangents if self.learned else []
            param = flat_params(bucket.params, grad) if self.reads_param(hp) else grad
            items.append((grad, param, family_state(bucket.flat), tangents,
                          bucket.delta, step, hp, bucket.group_index if self.per_group else None))
        return plan, items

    def _run_rules(self, record, hyper, plan_items):
        plan, items = plan_items
        args = (self.family, self.rule_learned, self.names, record, hyper, items)
        try:
            self.bucketed_step(*args)
        except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
            if self.bucketed_step is self.BUCKETS_STEP:
                raise
            self._eager(err)  # compilation fails before the graph runs, so nothing was written yet
            self.BUCKETS_STEP(*args)
        for _, bucket in plan:
            torch._foreach_add_(bucket.params, bucket.delta_views)
        return record

    def rule_per_tensor(self, groups, state, coefficients) -> None:
        """The fused rule parameter by parameter, eager or compiled."""
        by_device: dict[tuple, torch.Tensor] = {}
        for gi, group in enumerate(groups):
            row = self.coefficient_row(coefficients, gi)
            for device, entries in self.ready_by_device(group, state, tangents=bool(self.learned)).items():
                key = (device, gi if self.per_group else None)
                if key not in by_device:
                    by_device[key] = row.to(device)
                steps = [state[p][STEP] for p, _ in entries]
                torch._foreach_add_(steps, 1)
                bucket = self.buckets.get(gi, device)
                if bucket is not None and len(entries) != len(bucket.params):
                    self.buckets.drop(gi, device)  # a parameter sat out: step counts differ
                self._group_per_tensor(group, state, entries, steps, by_device[key])

    def prepare(self, groups) -> None:
        """Ask the rule, for each group's hyperparameters, whether it reads the parameters (``reads_param``).

        Outside a step, so that a step asks only for a setting it has not met (a scheduler
        moving a hyperparameter other than lr).
        """
        for group in groups:
            self.reads_param(self.hyperparameters(group, compiled=False))

    def reads_param(self, hp: dict) -> bool:
        """Whether the rule reads the parameters with these hyperparameters (asked once per setting).

        The bucketed rule reads a group's parameters as one vector, a copy of them all; a rule
        that never reads them (MADA's without weight decay) is handed the gradient in their place,
        which saved a third of the compiled fused step. The engine does not know what a rule
        reads: it asks, running the rule on a few elements of the CPU with two sets of parameters
        (lr, a multiplier of the update, does not take part in the question).
        """
        key = tuple(sorted((k, v) for k, v in hp.items() if k != "lr" and not torch.is_tensor(v)))
        known = self.__dict__.setdefault("_reads_param", {})
        if key not in known:
            known[key] = rule_reads_param(self.probe_rule, self.family, hp, self.names, self.rule_learned, self.dtype)
        return known[key]

    @staticmethod
    def probe_rule(family, grad, param, state, coef, hp, step, learned):
        """The rule as the bucketed step runs it, for ``rule_reads_param``: the family's fused rule."""
        coef_dict = {n: coef[i] for i, n in enumerate(family.space.names)}
        scalars = family.fused_scalars(coef_dict, hp, step, learned)
        return family.fused_update(grad, param, state, scalars, learned)

    def hyperparameters(self, group, compiled: bool) -> dict:
        """The group's hyperparameters for the fused rule.

        Compiled, lr is a tensor, so that a scheduler changing it does not trigger recompilation.
        A tensor lr (kept as the user gave it) is read where it lives: as the graph's input in
        the coefficients' dtype and device (a copy to the device, never a read on the host), or
        eagerly as it is.
        """
        hp = {k: group[k] for k in self.family.hyperparameters.model_fields}
        if compiled:
            lr = group["lr"]
            hp["lr"] = (lr.to(device=self.device, dtype=self.dtype, non_blocking=True) if torch.is_tensor(lr)
                        else torch.full((), lr, dtype=self.dtype, device=self.device))
        return hp

    def _group_per_tensor(self, group, state, entries, steps, coef) -> None:
        """The parameters of one group on one device.

        ``entries`` are (parameter, its (local, grad, param) views), ``coef`` the coefficient
        vector on that device.
        """
        coef_dict = {n: coef[i] for i, n in enumerate(self.names)}
        family = self.family
        learned = self.learned
        compiled = self.compiled
        hp = self.hyperparameters(group, compiled)
        # The 0-d work of every parameter at once, vectorised over their step counts.
        scalars = family.fused_scalars(coef_dict, hp, torch.stack(steps), learned)
        per_param = {k: v.unbind(0) for k, v in scalars.items() if torch.is_tensor(v) and v.ndim == 1}
        for i, (p, (loc, grad, _)) in enumerate(entries):
            st = state[p]
            sc = {k: (per_param[k][i] if k in per_param else v) for k, v in scalars.items()}
            fam_state = family_state(st)
            tangents = [st[key] for key in self.tangent_keys]
            if compiled and all(t.is_contiguous() for t in (grad, loc, *fam_state.values(), *tangents)):
                # one rank-1 graph with a dynamic length serves every parameter
                flat = {k: v.view(-1) for k, v in fam_state.items()}
                args = (family, learned, grad.view(-1), loc.view(-1), flat, sc, [t.view(-1) for t in tangents])
                try:
                    self.param_step(*args)
                    continue
                except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
                    self._eager(err)
            fused_param_step(family, learned, grad, loc, fam_state, sc, tangents)


def _fit_one_buffer(params) -> bool:
    """Parameters whose state can share one flat buffer per key (one dtype, contiguous)."""
    return all(p.dtype == params[0].dtype and p.is_contiguous() for p in params)
