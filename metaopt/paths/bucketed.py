"""The bucketed path: a rule object (``metaopt.paths.rules``) run over flat buckets, eager or compiled.

It is the fused path with ``HandDerivedRule`` and the compiled path with ``DerivedRule`` or
``ForwardRule``.

Where every parameter of every group has a gradient on the coefficients' device, each group
runs as one flat bucket (``metaopt.state.FlatBucket``) that holds the group's parameters,
gradients and state in flat buffers, each parameter's ``.data``, ``.grad`` and state entries
views into them. A step is then one BLAS dot product per group over the flat gradient for the
hyper-gradient, and the hyper-step and the rule over every group's flat buffers, written in
place: compiled (``compile=True``) into one static-shape graph, nothing gathered and nothing
scattered. Otherwise, and once a parameter has sat a step out (step counts then differ), the
rule runs parameter by parameter (compiled with dynamic shapes: one graph for every length), the
hyper-step eagerly before it. A rule that mixes coordinates (``Family.elementwise`` False) always
runs parameter by parameter, since concatenating its parameters would change it.
"""

from __future__ import annotations

import itertools
import types
import warnings
from dataclasses import dataclass, field

import torch

from ..hyper import update as hyper_update
from ..sharding import is_dtensor
from ..state import FlatBucket, start_state
from ..types import STEP, family_state
from .base import ExecutionPath, PerTensorPlan, coefficient_row, dots, views
from .rules import BucketItem, RuleSpec, rule_for


def hyper_step_into(record, hyper) -> None:
    """The hyper-step (where one is due) inside a compiled step, written into ``record``'s tensors.

    So the graph returns nothing: a graph that returns a new record allocates its outputs every
    step.
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


def run_buckets(rule, spec, record, hyper, items) -> None:
    """The hyper-step (``hyper``, where one is due) and then ``rule`` over every bucket of a step.

    Written to compile into one graph; ``items`` are ``BucketItem``s.
    """
    hyper_step_into(record, hyper)
    for item in items:
        rule.bucket_step(spec, item, coefficient_row(record.coefficients, item.row))


_copies = itertools.count()


def _own_copy(fn):
    """A function with the same body as ``fn`` but a code object of its own.

    Dynamo keeps its cache on the code object; shared between optimizers that learn different
    numbers of coefficients, it trips a dynamo bug (IndexError while checking list guards).
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@dataclass
class BucketPlan(PerTensorPlan):
    """A step over flat buckets: the groups whose bucket is intact, and those that start as one now."""

    intact: list[tuple[dict, FlatBucket]] = field(default_factory=list)
    fresh: list[tuple[int, dict, list]] = field(default_factory=list)
    taken: set[int] = field(default_factory=set)

    def grads(self, bucket: FlatBucket):
        """The bucket's flat gradient, its gradients taken once a step (``FlatBucket.take_grads``)."""
        if id(bucket) not in self.taken:
            self.taken.add(id(bucket))
            return bucket.take_grads()
        return bucket.grad


class BucketedPath(ExecutionPath):
    """A rule object over flat buckets where it can, parameter by parameter where not; eager or compiled.

    ``rule``: a ``metaopt.paths.rules`` rule; the path's name is the rule's (``"fused"`` or
    ``"compiled"``). The other arguments are ``ExecutionPath``'s.
    """

    def __init__(self, rule, family, names, learned, dtype, device, compile=False, forward=None,
                 per_group=False) -> None:
        super().__init__(family, names, learned, dtype, device, compile=compile, forward=forward, per_group=per_group)
        self.rule = rule
        self.name = rule.path_name
        self.bucketed = rule.over_buckets(family)
        decay, keys = forward if forward is not None else (None, None)
        self.spec = RuleSpec(family, self.names, self.learned, tuple(self.learned_index), decay,
                             None if keys is None else tuple((b, tuple(ks)) for b, ks in keys.items()))
        self.flags = torch.tensor([False, True], device=self.device)  # indexed by host bools: no copy
        self._set_functions()

    def _set_functions(self, compiled: bool | None = None) -> None:
        """The step functions: compiled copies where ``compiled`` (default: ``compile``), else the eager ones.

        A path unpickled after falling back to eager tries compiling again.
        """
        self.compiled = False
        self.bucket_fn, self.param_fn, self.dots = run_buckets, self.rule.param_step, dots
        if self.compile if compiled is None else compiled:
            # Each optimizer compiles its own copies (_own_copy says why). The bucketed step sees
            # fixed bucket sizes (static shapes: one graph, compiled once); the per-tensor step
            # sees every tensor's length (dynamic).
            self.compiled = True
            self.bucket_fn = torch.compile(_own_copy(run_buckets), dynamic=False)
            self.param_fn = torch.compile(_own_copy(self.rule.param_step), dynamic=True)
            self.dots = torch.compile(_own_copy(dots), dynamic=True)

    def _eager(self, err) -> None:
        warnings.warn(f"metaopt: torch.compile failed ({err!r:.300}); running eagerly")
        self._set_functions(compiled=False)

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("bucket_fn", "param_fn", "dots"):  # compiled functions do not pickle
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._set_functions()

    def run_param_step(self, *args) -> bool:
        """The compiled per-tensor step on ``args``; False (nothing written) where compilation failed."""
        try:
            self.param_fn(*args)
            return True
        except Exception as err:  # noqa: BLE001 - compilation can fail in many ways, before the graph runs
            if not self.compiled:
                raise
            self._eager(err)
            return False

    # -- plan ------------------------------------------------------------------------------
    def plan(self, groups, state):
        """The step over flat buckets where it applies, else parameter by parameter."""
        return (self.bucket_plan(groups, state) if self.bucketed else None) or PerTensorPlan(groups, state)

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
        # eagerly, as BLAS calls over the flat gradient: inductor's K reductions over N ran slower
        pairs = [(None, work.grads(bucket), bucket.tangents, bucket.group_index) for _, bucket in work.intact]
        return self.hypergradient_of(pairs, self.rows(work.groups), dots)

    # -- the rule --------------------------------------------------------------------------
    def update(self, work, record, hyper):
        """The hyper-step where one is due, then the rule over the buckets (or per tensor)."""
        if not isinstance(work, BucketPlan):
            return super().update(work, record, hyper)  # the hyper-step eagerly, then rule()
        items = self._bucket_items(work)
        if items is None:  # a new group's parameters have different state keys
            return super().update(PerTensorPlan(work.groups, work.state), record, hyper)
        if hyper is not None and self.compiled and self.device.type != "cpu":
            # inside the graph, its flags as data: one graph for every step, and no ~25 small
            # kernel launches of an eager hyper-step
            hyper = hyper.as_data(self.flags, record)
        elif hyper is not None:
            # eagerly, branches on the host; on a CPU always: with the hyper-step inside the
            # graph, fresh runs of the compiled step corrupted the heap now and then (docs:
            # performance), and inductor drops its writes into 0-d float64 CPU tensors such as
            # hyper-Adam's step count (see loses_writes_in_a_graph)
            record, hyper = hyper.apply(record), None
        args = (self.rule, self.spec, record, hyper, items)
        try:
            self.bucket_fn(*args)
        except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
            if not self.compiled:
                raise
            self._eager(err)  # compilation fails before the graph runs, so nothing was written yet
            run_buckets(*args)
        return record

    def _bucket_items(self, work: BucketPlan) -> list[BucketItem] | None:
        """Start the groups that start now as buckets, count the step, and list what the rule reads and writes.

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
            bucket = self.buckets.make(gi, self.device, params, states, owns=True)
            if bucket is None:
                return None
            plan.append((group, bucket))
        items = []
        forward = self.spec.state_tangents
        for group, bucket in plan:
            bucket.step.add_(1)
            items.append(BucketItem(
                grad=work.grads(bucket), param=bucket.param, state=family_state(bucket.flat),
                tangents=bucket.tangents if self.learned else [],
                state_tangents=None if forward is None or not self.learned
                else {b: [bucket.flat[k] for k in ks] for b, ks in forward},
                step=state[bucket.params[0]][STEP], hp=self.hyperparameters(group, compiled=True),
                row=bucket.group_index if self.per_group else None,
            ))
        return items

    def run_rule(self, work, coefficients):
        """The rule parameter by parameter (the step the buckets do not take), eager or compiled."""
        groups, state = work.groups, work.state
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
                self.rule.per_tensor(self, group, state, entries, steps, by_device[key])

    def hyperparameters(self, group, compiled: bool) -> dict:
        """The group's hyperparameters for the rule.

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

    def restore(self, groups, state) -> None:
        """After ``load_state_dict``: the buckets rebuilt from the loaded state, holding their parameters again."""
        self.buckets.clear()
        if self.bucketed:
            self.buckets.restore(groups, state, owns=True)


def _fit_one_buffer(params) -> bool:
    """Parameters whose state can share one flat buffer per key (one dtype, contiguous)."""
    return all(p.dtype == params[0].dtype and p.is_contiguous() for p in params)


def fused_path(family, names, learned, dtype, device, compile=False, forward=None, per_group=False) -> BucketedPath:
    """The fused path: the family's hand-derived rule over flat buckets, eager or compiled."""
    return BucketedPath(rule_for("fused", False), family, names, learned, dtype, device, compile, forward, per_group)


def compiled_path(family, names, learned, dtype, device, compile=True, forward=None,
                  per_group=False) -> BucketedPath:
    """The compiled path: the family's ``update``, its tangents derived (in forward mode too), always compiled."""
    rule = rule_for("compiled", forward is not None and bool(learned))
    return BucketedPath(rule, family, names, learned, dtype, device, True, forward, per_group)
