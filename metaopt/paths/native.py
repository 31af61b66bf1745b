"""The native path: a family's C kernel (``metaopt.kernels``) on CPU threads.

The kernel is the family's own (``Family.native_rule``, e.g. MADA's), or, for a family that has
none, one written from its ``update`` (``metaopt.codegen``): written once per family and
configuration in a process, and again only for a group whose hyperparameters that the source
holds as constants differ.

Per unit of work — a param group's flat bucket, or one parameter once a parameter of the group
has sat a step out (step counts then differ) — one threaded pass computes the hyper-gradient's
dot products and one threaded pass runs the rule, its tangents and the parameter update.
Gradients and parameters are read where they live. A step with a parameter the kernel cannot
take (another device or dtype, a DTensor, a strided tensor) runs the eager fused rule instead.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .. import codegen, kernels
from ..sharding import is_dtensor
from ..state import start_state
from ..types import STEP
from .base import ExecutionPath, PerTensorPlan, views
from .bucketed import compiled_path, fused_path


@dataclass
class NativePlan:
    """A native step: how each param group runs (bucket, fresh bucket or per parameter), and its gradients."""

    groups: list
    state: dict
    #: per group: its kernel, (NativeRule, options, Kernel); None for a group without parameters
    kernels: list = field(default_factory=list)
    #: per group: ("bucket", bucket) intact, ("fresh", None) starting as one now, or
    #: ("params", None) parameter by parameter
    modes: list = field(default_factory=list)
    #: per unit's parameters: their gradients (copied where strided, kept alive here until the
    #: kernels ran) and a C array of the gradients' addresses, made once for both passes
    grads: dict = field(default_factory=dict)

    def grad_pointers(self, params):
        """A C array of the addresses of ``params``' gradients (contiguous copies where strided), made once a step."""
        key = tuple(map(id, params))
        if key not in self.grads:
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            self.grads[key] = (grads, kernels.pointers(grads))
        return self.grads[key][1]


class NativePath(ExecutionPath):
    """The C kernel; the eager fused path (``eager``, sharing its buckets) for the steps it cannot take.

    Its buckets hold the group's state only: the kernel reads gradients and writes parameters
    where they live.
    """

    name = "native"
    bucketed = True

    def __init__(self, family, names, learned, dtype, device, compile=False, forward=None, per_group=False) -> None:
        super().__init__(family, names, learned, dtype, device, compile=False, forward=forward, per_group=per_group)
        #: no hand-written kernel: each group's is derived from update (metaopt.codegen)
        self.derived = family.native_rule(self.learned) is None
        # the steps the kernel cannot take: the hand-derived rule eagerly where the family has one
        # (its kernel may still be written: MADA's Lion term), else the derived rule compiled
        hand = family.fused_update is not None and family.fused_scalars is not None
        self.eager = (fused_path if hand else compiled_path)(family, names, learned, dtype, device,
                                                             per_group=per_group)
        self.eager.buckets, self.eager.first_steps = self.buckets, self.first_steps
        self._load()
        self.last_units = 0  # how many units the last native step ran (tests)

    def _load(self) -> None:
        #: the family's own kernel: (NativeRule, its options as a C array, the loaded kernel or None)
        self.own_kernel = None
        if not self.derived:
            rule = self.family.native_rule(self.learned)
            self.own_kernel = (rule, kernels.int_array(rule.options), kernels.load(rule.source, rule.flags))

    def kernel_for(self, group) -> tuple | None:
        """(NativeRule, options, Kernel) for ``group``; None where a derived one cannot be written or built."""
        made = self.own_kernel if not self.derived else written_kernel(
            self.family, self.names, self.learned, group, self.dtype)
        return made if made[2] is not None else None

    def ready(self) -> bool:
        """Whether the C kernel loaded in this process (after unpickling it may not).

        A derived path is ready: where its kernels do not build, its steps take the compiled rule.
        """
        return self.derived or self.own_kernel[2] is not None

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("own_kernel", None)  # C handles: rebuilt on unpickling
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._load()

    def fits(self, groups) -> bool:
        """Whether the kernel can take every parameter that has a gradient."""
        for group in groups:
            for p in group["params"]:
                if p.grad is not None and (
                    p.device != self.device or p.dtype != self.dtype or is_dtensor(p) or not p.is_contiguous()
                ):
                    return False
        return True

    # -- plan ------------------------------------------------------------------------------
    def plan(self, groups, state):
        """Each group as an intact bucket, one starting now, or per parameter; the fused rule where the kernel cannot."""
        if not self.fits(groups):
            return PerTensorPlan(groups, state)  # the eager path's rule, parameter by parameter
        made = [self.kernel_for(g) if g["params"] else None for g in groups]
        if any(m is None for m, g in zip(made, groups) if g["params"]):
            return PerTensorPlan(groups, state)  # no kernel for a group here: the same
        work = NativePlan(groups, state, made)
        for gi, group in enumerate(groups):
            params = group["params"]
            whole = bool(params) and all(p.grad is not None for p in params)
            bucket = self.buckets.intact(gi, params, state, self.device) if whole else None
            if bucket is not None:
                work.modes.append(("bucket", bucket))
            elif whole and self.buckets.starts(gi, params, state, self.device):
                work.modes.append(("fresh", None))
            else:
                work.modes.append(("params", None))
        return work

    # -- hyper-gradient --------------------------------------------------------------------
    def hypergradient(self, work):
        """The hyper-gradient h by the kernel's threaded dot products, summed in float64; None without tangents."""
        if not isinstance(work, NativePlan):
            return self.eager.hypergradient(work)
        units = []  # (layout, gradient pointers, tangent pointers, group) of those that kept tangents
        keep = []  # contiguous copies of strided tangents, alive until the kernels ran
        for gi, (group, (mode, bucket)) in enumerate(zip(work.groups, work.modes)):
            if mode == "bucket":
                units.append((self._layout(bucket), work.grad_pointers(bucket.params), self._pointers(bucket)[1], gi))
            elif mode == "params":
                for p in group["params"]:
                    st = work.state.get(p)
                    if p.grad is not None and st and self.tangent_keys and self.tangent_keys[0] in st:
                        tangents = [t if t.is_contiguous() else t.contiguous() for t in (st[k] for k in self.tangent_keys)]
                        keep.append(tangents)
                        units.append((_one(p), work.grad_pointers([p]), kernels.pointers(tangents), gi))
        if not units:
            return None
        k = len(self.learned)
        dots = next(m for m in work.kernels if m)[2].fn("dots", self.dtype)  # every kernel has the same
        rows = self.rows(work.groups)
        h = None if rows is None else torch.zeros(rows, k, dtype=torch.float64)
        for (n, nseg, offsets), grad_ptrs, tangent_ptrs, gi in units:
            threads = kernels.threads_for(n)
            partial = torch.zeros(threads, k, dtype=torch.float64)  # one per thread (an idle one writes none), added in order
            dots(threads, n, nseg, offsets, grad_ptrs, k, tangent_ptrs, partial.data_ptr())
            if rows is not None:
                h[gi] += partial.sum(0)
            else:
                h = partial.sum(0) if h is None else h + partial.sum(0)
        return h.to(self.dtype)

    # -- the rule (after the hyper-step, eagerly: the kernel reads the coefficients from memory) --
    def run_rule(self, work, coefficients):
        """The kernel's threaded pass per unit: the rule, its tangents and the parameter update."""
        if not isinstance(work, NativePlan):
            return self.eager.run_rule(work, coefficients)
        state = work.state
        units = []  # (kernel, group, params, their pointers, state pointers, tangent pointers, step, layout)
        for gi, (group, (mode, bucket)) in enumerate(zip(work.groups, work.modes)):
            params = group["params"]
            made = work.kernels[gi]
            rule = made[0] if made else None
            if mode == "fresh":
                states = [state[p] for p in params]
                for p, st in zip(params, states):
                    _, grad, param = views(p)
                    start_state(self.family, st, grad, param, group, self.dtype, self.tangent_keys, self.first_steps)
                bucket = self.buckets.make(gi, self.device, params, states)
            if bucket is not None:
                bucket.step.add_(1)
                state_ptrs, tangent_ptrs = self._pointers(bucket, rule)
                param_ptrs = bucket.cache.get("params")
                if param_ptrs is None:  # the parameters are the bucket's for its life
                    param_ptrs = bucket.cache["params"] = kernels.pointers(params)
                units.append((made, gi, group, params, param_ptrs, state_ptrs, tangent_ptrs, state[params[0]][STEP],
                              self._layout(bucket)))
                continue
            self.buckets.drop(gi, self.device)  # step counts differ from here on
            for p in params:
                st = state[p]
                if p.grad is None:  # no update, so no tangent: a stale one would bias h
                    for key in self.tangent_keys:
                        st.pop(key, None)
                    continue
                start_state(self.family, st, p.grad, p, group, self.dtype, self.tangent_keys, self.first_steps)
                for key in (*rule.state_keys, *self.tangent_keys):
                    if not st[key].is_contiguous():
                        st[key] = st[key].contiguous()
                st[STEP].add_(1)
                units.append((made, gi, group, [p], kernels.pointers([p]),
                              kernels.pointers([st[k] for k in rule.state_keys]),
                              kernels.pointers([st[k] for k in self.tangent_keys]), st[STEP], _one(p)))
        coefficients = coefficients.contiguous()  # a group's row is then its n values in a row
        fields = self.family.hyperparameters.model_fields
        ntan = len(self.tangent_keys)
        for (rule, options, kernel), gi, group, params, param_ptrs, state_ptrs, tangent_ptrs, step, (n, nseg, offsets) \
                in units:
            # float() of a tensor lr reads its value: a CPU tensor here (the optimizer refuses one
            # on another device than its parameters'), so no device sync
            hp = kernels.double_array([float(group[f]) for f in fields])
            coef = self.coefficient_row(coefficients, gi).data_ptr()
            kernel.fn("step", self.dtype)(
                kernels.threads_for(n), n, nseg, offsets, param_ptrs, work.grad_pointers(params), len(rule.state_keys),
                state_ptrs, ntan, tangent_ptrs, coef, step.data_ptr(), hp, options,
            )
        self.last_units = len(units)

    def _pointers(self, bucket, rule=None):
        """C arrays of the addresses of the bucket's state (in ``rule``'s order) and tangent buffers.

        They are fixed for the bucket's life, so built once.
        """
        state_keys = () if rule is None else rule.state_keys
        key = ("pointers", state_keys, self.tangent_keys)
        if key not in bucket.cache:
            bucket.cache[key] = tuple(
                kernels.pointers([bucket.flat[k] for k in keys]) for keys in (state_keys, self.tangent_keys)
            )
        return bucket.cache[key]

    @staticmethod
    def _layout(bucket):
        """(N, number of parameters, their offsets in the flat index space as a C array)."""
        if "layout" not in bucket.cache:
            offsets = [0]
            for n in bucket.numels:
                offsets.append(offsets[-1] + n)
            bucket.cache["layout"] = (offsets[-1], len(bucket.numels), kernels.int_array(offsets))
        return bucket.cache["layout"]


def _one(p):
    """The layout of a unit of one parameter: (N, one segment, offsets [0, N])."""
    n = p.numel()
    return n, 1, kernels.int_array([0, n])


@dataclass
class _Written:
    """What was written from one family's update in this process, by (names, learned, dtype)."""

    #: -> the hyperparameters the written source holds as constants
    constants: dict = field(default_factory=dict)
    #: (names, learned, dtype, the constants' values) -> (NativeRule, options, Kernel or None)
    kernels: dict = field(default_factory=dict)
    #: the same key -> why no source could be written (NotDerivable's message)
    refused: dict = field(default_factory=dict)


#: family -> _Written. Writing a source traces the rule (a second or so for MADA): selecting a
#: path and stepping share it.
_WRITTEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _key(memo: _Written, names, learned, group, dtype) -> tuple | None:
    base = (tuple(names), tuple(learned), dtype)
    return base + tuple(group[f] for f in memo.constants[base]) if base in memo.constants else None


def written_kernel(family, names, learned, group, dtype) -> tuple:
    """(NativeRule, options, Kernel or None) written from ``family.update`` for ``group``'s hyperparameters.

    Written once per family, configuration and values of the hyperparameters the source holds
    as constants. None as the kernel, with a warning once, where the rule cannot be written as C
    (``refusal`` says why) or not built.
    """
    memo = _WRITTEN.setdefault(family, _Written())
    key = _key(memo, names, learned, group, dtype)
    if key in memo.kernels:
        return memo.kernels[key]
    refused = None
    try:
        rule, constants = codegen.native_rule(family, names, learned, group, dtype)
        made = rule, kernels.int_array(rule.options), kernels.load(rule.source, rule.flags)
    except codegen.NotDerivable as err:
        warnings.warn(f"metaopt: {family.name}'s update cannot be written as a C kernel ({err}); this group's "
                      "steps take the compiled rule")
        constants = tuple(f for f in family.hyperparameters.model_fields if f != "lr")
        made, refused = (None, None, None), str(err)
    memo.constants[(tuple(names), tuple(learned), dtype)] = constants
    key = _key(memo, names, learned, group, dtype)
    memo.kernels[key] = made
    if refused:
        memo.refused[key] = refused
    return made


def refusal(family, names, learned, group, dtype) -> str | None:
    """Why ``written_kernel`` could not write a source for this configuration (None: it could, or has not tried)."""
    memo = _WRITTEN.get(family)
    return memo.refused.get(_key(memo, names, learned, group, dtype)) if memo else None
