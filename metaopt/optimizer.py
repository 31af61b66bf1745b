"""MetaOptimizer: runs any family as a ``torch.optim.Optimizer`` and learns its coefficients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import itertools
import operator
import types
import warnings
from typing import Any, Literal

import torch

from . import native
from .family import Family, compute_dtype
from .hyper import update as hyper_update
from .hyper.one_step import (
    STEP,
    OneStep,
    family_state,
    hypergradient,
    is_tangent_key,
    tangent_keys,
    update_with_tangents,
)
from .hyper.unrolled import Unrolled, _register, unroll
from .hyper.update import HyperOptimizer

Tensor = torch.Tensor

try:  # FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None


class MetaOptimizer(torch.optim.Optimizer):
    """A family run as a torch optimizer, its learned coefficients moved by hyper-gradients.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        family: a :class:`~metaopt.Family` instance or the name of a registered family.
        hypergrad: :class:`~metaopt.OneStep`, :class:`~metaopt.Unrolled` (then
            :meth:`unrolled_step` learns and :meth:`step` takes plain steps), ``None`` for
            fixed coefficients, or ``"default"``: the family's ``default_hypergrad()``
            (``OneStep()`` unless the family says otherwise).
        path: ``"generic"`` runs the family's ``update`` differentiated by the engine;
            ``"fused"`` runs its hand-derived ``fused_scalars``/``fused_update`` in torch ops
            (one-step or fixed modes only); ``"native"`` runs the family's C kernel on CPU
            threads (:mod:`metaopt.native`; float32/float64 CPU parameters, one-step or fixed
            modes, configurations the family's ``native_rule`` accepts); ``"auto"`` (default)
            takes the native path where it applies and a C compiler works, else the fused path
            when ``compile`` is on, else the generic path (faster than eager fused).
        compile: run the fused path through ``torch.compile`` (the whole step one graph);
            falls back to eager, with a warning, where compilation fails. The first step then
            takes tens of seconds on a CPU. Where the native path runs, compile is not used.
        **defaults: the family's hyperparameters (``lr``, ``eps``, ``weight_decay`` …), the
            defaults of every param group; validated by the family's pydantic model.

    One step, in order: (1) the hyper-gradient ``h = Σ⟨g_t, ∂θ_{t-1}/∂c⟩`` from the tangents
    kept by the previous step and the gradients now in ``.grad``; (2) the hyper-optimizer moves
    the learned coefficients and projects them into their boxes; (3) the rule updates every
    parameter that has a gradient with the new coefficients, and keeps its tangents for the
    next step. Nothing in a step reads a tensor value back to the host.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        family: Family | str,
        hypergrad: HyperOptimizer | Literal["default"] | None = "default",
        *,
        path: Literal["auto", "fused", "native", "generic"] = "auto",
        compile: bool = False,
        **defaults: Any,
    ) -> None:
        if isinstance(family, str):
            from .registry import get_family

            family = get_family(family)
        if not isinstance(family, Family):
            raise TypeError(f"family must be a metaopt.Family or a registered name, got {family!r}")
        if isinstance(hypergrad, str) and hypergrad == "default":
            hypergrad = family.default_hypergrad()
        if hypergrad is not None and not isinstance(hypergrad, HyperOptimizer):
            raise TypeError(
                f"hypergrad must be metaopt.OneStep(...), metaopt.Unrolled(...) or None, got {hypergrad!r}"
            )
        self.family = family
        self.hypergrad = hypergrad
        fusable = family.fused_update is not None and family.fused_scalars is not None
        fusable = fusable and not isinstance(hypergrad, Unrolled)
        if path == "fused" and not fusable:
            raise ValueError(
                f"path='fused' needs a family with fused_update and a one-step or fixed mode; "
                f"{family.name} with {type(hypergrad).__name__} has none"
            )
        if path == "native" and not fusable:
            raise ValueError(
                f"path='native' needs a family with a fused rule and a one-step or fixed mode; "
                f"{family.name} with {type(hypergrad).__name__} has none"
            )
        validated = family.hyperparameters.model_validate({**family.defaults(), **defaults})
        super().__init__(params, validated.model_dump())

        all_params = [p for g in self.param_groups for p in g["params"]]
        dtype = torch.float32
        for p in all_params:
            if p.is_floating_point():
                dtype = torch.promote_types(dtype, p.dtype)
        device = all_params[0].device
        space = family.space
        self._names: tuple[str, ...] = space.names
        learned = space.learned if hypergrad is not None else ()
        self._learned: tuple[str, ...] = learned
        if fusable and path in ("auto", "native"):
            why = _native_unfit(family, learned, all_params, dtype)
            if why and path == "native":
                raise ValueError(f"path='native' does not apply: {why}")
            if not why and native.load(family.native_rule(learned).source) is not None:
                path = "native"
            elif path == "native":  # no working C compiler (native.load warned): as "auto" would
                path = "auto"
        # Eagerly, the fused rule's tangent arithmetic costs more than the generic path's one
        # reverse pass (measured: benchmarks/step_cost.py, mada_cost.py); compiled, it is one
        # graph. So "auto" takes it when compiling.
        if path != "native":
            path = "fused" if fusable and (path == "fused" or (path == "auto" and compile)) else "generic"
        self.path = path
        self.compile = compile
        self._set_kernels()
        self._learned_index = [self._names.index(n) for n in learned]
        self._idx = torch.tensor(self._learned_index, dtype=torch.long, device=device)
        self._tangent_keys = tangent_keys(learned)
        self._coef, self._low, self._high = space.tensors(dtype, device)
        k = len(learned)
        self._last_h = torch.zeros(k, dtype=dtype, device=device)
        self._flags = torch.tensor([False, True], device=device)  # indexed by host bools: no copy
        self._meta_step = 0
        if hypergrad is not None:
            self._hyper_state = hyper_update.init_state(hypergrad, k, dtype, device)
            self._hyper_lr = torch.tensor(hypergrad.per_coefficient("lr", learned), dtype=dtype, device=device)
            self._hyper_momentum = torch.tensor(
                hypergrad.per_coefficient("momentum", learned), dtype=dtype, device=device
            )
        else:
            self._hyper_state = {}
            self._hyper_lr = self._hyper_momentum = torch.zeros(0, dtype=dtype, device=device)

    # torch.optim.Optimizer pickles only defaults, state and param_groups; deepcopy and pickle
    # must carry the family, the coefficients and the hyper-optimizer too.
    _OWN = (
        "family", "hypergrad", "path", "compile", "_names", "_tangent_keys", "_learned",
        "_learned_index", "_idx", "_coef", "_low", "_high", "_last_h", "_meta_step",
        "_hyper_state", "_hyper_lr", "_hyper_momentum", "_buckets", "_flags",
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._OWN if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._set_kernels()  # compiled functions do not pickle; rebuild them

    def _set_kernels(self) -> None:
        self._fused_step, self._dots, self._whole_step = _fused_param_step, _dots, _whole_step
        self._native, self._native_units = None, 0  # units: what the last native step ran (tests)
        if self.__dict__.get("path") == "native":
            # the rule with tangents (learning) and without (fixed, or a group that sits out)
            rules = {flag: self.family.native_rule(self._learned if flag else ()) for flag in (False, True)}
            rules = {flag: (rule, native.int_array(rule.options)) for flag, rule in rules.items()}
            kernel = native.load(rules[True][0].source)
            if kernel is None:  # unpickled where no compiler works (load warned): as "auto" would
                self.path = "fused" if self.__dict__.get("compile") else "generic"
            else:
                self._native = (kernel, rules)
        if self.__dict__.get("compile") and self.__dict__.get("path") == "fused":
            # Each optimizer compiles its own copies: dynamo keeps its cache on the code
            # object, and sharing it between optimizers that learn different numbers of
            # coefficients trips a dynamo bug (IndexError while checking list guards).
            # The whole step sees fixed bucket sizes (static shapes: one graph, compiled
            # once); the per-tensor fallbacks see every tensor's length (dynamic).
            self._whole_step = torch.compile(_own_copy(_whole_step), dynamic=False)
            self._fused_step = torch.compile(_own_copy(_fused_param_step), dynamic=True)
            self._dots = torch.compile(_own_copy(_dots), dynamic=True)
        if "_buckets" not in self.__dict__:
            self._buckets: dict[tuple[int, torch.device], _Bucket] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)  # higher maps exact optimizer types

    # -- param groups ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the family's hyperparameters of this group; other keys (a group's "name",
        # a scheduler's "initial_lr") pass through as torch allows.
        fields = self.family.hyperparameters.model_fields
        given = {k: v for k, v in param_group.items() if k in fields}
        validated = self.family.hyperparameters.model_validate({**self.defaults, **given})
        param_group = {**param_group, **validated.model_dump()}
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for pi, p in enumerate(params):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"metaopt: parameter {pi} of param group {len(self.param_groups)} (shape "
                    f"{tuple(p.shape)}, {p.dtype}) is complex; families are real rules — keep a "
                    f"real parameter (torch.view_as_real of your complex tensor) instead"
                )
        super().add_param_group({**param_group, "params": params})

    # -- coefficients ----------------------------------------------------------------------
    @property
    def coefficients(self) -> dict[str, Tensor]:
        """Current coefficient values, name -> 0-d tensor (copies)."""
        return {n: self._coef[i].clone() for i, n in enumerate(self._names)}

    @property
    def learned(self) -> tuple[str, ...]:
        """Names of the coefficients that hyper-gradient descent moves."""
        return self._learned

    @property
    def last_hypergrad(self) -> dict[str, Tensor]:
        """The last hyper-gradient, learned coefficient name -> 0-d tensor (zeros before any)."""
        return {n: self._last_h[j].clone() for j, n in enumerate(self._learned)}

    @property
    def skipped_hypersteps(self) -> Tensor:
        """How many hyper-steps were skipped because the hyper-gradient was not finite."""
        skipped = self._hyper_state.get("skipped")
        return skipped.clone() if skipped is not None else torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def set_coefficients(self, **values: float | Tensor) -> None:
        """Set coefficients by name; each value is projected into its box."""
        for name, value in values.items():
            if name not in self._names:
                raise KeyError(
                    f"{self.family.name} has no coefficient {name!r}; known: {list(self._names)}"
                )
            i = self._names.index(name)
            v = torch.as_tensor(value, dtype=self._coef.dtype, device=self._coef.device)
            self._coef[i].copy_(torch.clamp(v, self._low[i], self._high[i]))

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()  # before anything changes
        learning = isinstance(self.hypergrad, OneStep) and len(self._learned) > 0
        hyper = learning and self.hypergrad.objective == "train"
        fast = self.path != "generic"  # fused or native: the hand-derived rule
        # the whole step over the groups' flat buckets where it applies, else per tensor
        if (self.path == "native" and self._native_step(learning, hyper)) or (
            self.path == "fused" and self._step_buckets(learning, hyper)
        ):
            self._meta_step += 1
            return loss
        if hyper:
            self._hyper_step()
        family = self.family
        coef_by_device: dict[torch.device, tuple[Tensor, dict[str, Tensor]]] = {}
        for gi, group in enumerate(self.param_groups):
            # parameters to update, by device, with their (local, grad, param) views: built once,
            # since for half-precision parameters each view is an fp32 copy
            ready: dict[torch.device, list[tuple[Tensor, tuple[Tensor, Tensor, Tensor]]]] = {}
            for pi, p in enumerate(group["params"]):
                state = self.state[p]
                grad = p.grad
                if grad is None:
                    # No update, so no tangent: a stale one would bias the next hyper-gradient.
                    for key in self._tangent_keys:
                        state.pop(key, None)
                    continue
                views = local, grad, param = _views(p)
                # the generic path makes tangents itself; the fused rule updates them in place
                self._start_state(state, grad, param, group, tangents=fast and learning)
                ready.setdefault(local.device, []).append((p, views))
            for device, entries in ready.items():
                params = [p for p, _ in entries]
                if device not in coef_by_device:
                    c = self._coef.to(device)
                    coef_by_device[device] = (c, {n: c[i] for i, n in enumerate(self._names)})
                coef, coef_dict = coef_by_device[device]
                steps = [self.state[p][STEP] for p in params]
                torch._foreach_add_(steps, 1)
                if fast:  # per tensor: the fused rule, eager or compiled
                    bucket = self._buckets.get((gi, device))
                    if bucket is not None and len(params) != len(bucket.params):
                        del self._buckets[(gi, device)]  # a parameter sat out: step counts differ
                    self._fused_group(group, entries, steps, coef_dict, learning)
                    continue
                for (p, (local, grad, param)), step in zip(entries, steps):
                    state = self.state[p]
                    fam_state = family_state(state)
                    if learning:
                        delta, new_state, tangent = update_with_tangents(
                            family, grad, param, fam_state, coef, self._names, self._learned_index,
                            group, step,
                        )
                        state.update(zip(self._tangent_keys, tangent.unbind(0)))
                    else:
                        delta, new_state = family.update(grad, param, fam_state, coef_dict, group, step)
                    local.add_(delta)  # computed in the state's precision, rounded once
                    state.update(new_state)
        self._meta_step += 1
        return loss

    def _check_gradients(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"metaopt: parameter {pi} of param group {gi} (shape {tuple(p.shape)}) "
                        f"has a sparse gradient; {self.family.name} supports dense gradients only"
                    )

    def _step_buckets(self, learning: bool, hyper: bool) -> bool:
        """The whole step in one call over flat buckets (compiled: one graph): hyper-gradient
        dot products, hyper-step, then the rule and its tangents for every group. Applies when
        every parameter has a dense gradient on the coefficients' device and each group's
        state is one intact bucket (or starts now); sparse gradients were refused before.
        Returns False to leave the step to the per-tensor path."""
        device = self._coef.device
        plan, fresh = [], []
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue
            if any(p.grad is None or p.device != device or _is_dtensor(p) for p in params):
                return False
            bucket = self._intact_bucket(gi, params, device)
            if bucket is not None:
                plan.append((group, bucket))
            elif self._state_starts(gi, params, device):
                fresh.append((gi, group, params))
            else:
                return False
        record = learning and bool(plan)  # tangents from a previous step exist
        for gi, group, params in fresh:  # only once every group is known to fit
            bucket = self._new_bucket(gi, group, params, device, learning)
            if bucket is None:
                return False  # state is set up; the per-tensor path takes the step
            plan.append((group, bucket))
        if not plan:
            return False
        items = []
        for group, bucket in plan:
            bucket.step.add_(1)
            step = self.state[bucket.params[0]][STEP]  # equal in a bucket
            hp = self._fused_hyperparameters(group, device, compiled=True)
            grad = bucket.gather_grads()
            param = grad  # only read for weight decay
            if hp.get("weight_decay", 0.0) != 0.0:
                param = torch.cat([p.reshape(-1) for p in bucket.params])
            tangents = bucket.tangents if learning else []
            items.append((grad, param, family_state(bucket.flat), tangents, bucket.delta, step, hp))
        active = hyper and record and self._meta_step >= self.hypergrad.warmup
        # the dot products eagerly, as BLAS calls: inductor's K reductions over N ran slower
        h = hypergradient([(it[0], it[3]) for it in items], len(self._learned), self._coef, _dots) if hyper else None
        args = (
            self.family, self.hypergrad if hyper else None, self._learned if learning else (),
            self._names, h, self._flags[int(record)], self._flags[int(active)], self._coef, self._low,
            self._high, self._idx, self._hyper_state, self._hyper_lr, self._hyper_momentum,
            self._last_h, items,
        )
        try:
            self._whole_step(*args)
        except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
            if self._whole_step is _whole_step:
                raise
            # compilation fails before the graph runs, so nothing was written yet
            warnings.warn(f"metaopt: torch.compile failed ({err!r:.300}); running eagerly")
            self._whole_step, self._fused_step, self._dots = _whole_step, _fused_param_step, _dots
            _whole_step(*args)
        for _, bucket in plan:
            torch._foreach_add_(bucket.params, bucket.delta_views)
        return True

    def _native_step(self, learning: bool, hyper: bool) -> bool:
        """The step by the family's C kernel: one threaded pass for the hyper-gradient's dot
        products, the hyper-step in torch ops on the K coefficients, one threaded pass for the
        rule, its tangents and the parameter update. A param group runs as one unit over its
        flat bucket, or parameter by parameter once one of them has sat out a step (step counts
        then differ). Gradients are read in place. Returns False, before changing anything, to
        leave the step to the torch-ops path (a parameter the kernel cannot take)."""
        kernel, rules = self._native
        rule, options = rules[learning]
        dtype, device = self._coef.dtype, self._coef.device
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and (
                    p.device != device or p.dtype != dtype or _is_dtensor(p) or not p.is_contiguous()
                ):
                    return False
        tangent_keys = self._tangent_keys if learning else ()
        family = self.family
        units, record = [], False  # unit: (group, params, state buffers, tangents, step, layout)
        fresh: set[int] = set()  # parameters whose state starts now: no tangents to learn from
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            whole = bool(params) and all(p.grad is not None for p in params)
            bucket = self._intact_bucket(gi, params, device) if whole else None
            if bucket is not None:
                record = record or learning
            elif whole and self._state_starts(gi, params, device):
                fresh.update(id(p) for p in params)
                bucket = self._new_bucket(gi, group, params, device, learning)
            if bucket is not None:
                bucket.step.add_(1)
                state_ptrs, tangent_ptrs = bucket.native_pointers(rule.state_keys, tangent_keys)
                step = self.state[params[0]][STEP]  # equal in a bucket
                units.append((group, params, state_ptrs, tangent_ptrs, step, bucket.native_layout()))
                continue
            self._buckets.pop((gi, device), None)  # step counts differ from here on
            for p in params:
                st = self.state[p]
                if p.grad is None:  # no update, so no tangent: a stale one would bias h
                    for key in self._tangent_keys:
                        st.pop(key, None)
                    continue
                if learning and tangent_keys[0] in st and id(p) not in fresh:
                    record = True  # it kept the tangents of its update last step
                self._start_state(st, p.grad, p, group, tangents=learning)
                for key in (*rule.state_keys, *tangent_keys):
                    if not st[key].is_contiguous():
                        st[key] = st[key].contiguous()
                st[STEP].add_(1)
                n = p.numel()
                units.append((group, [p], native.pointers([st[k] for k in rule.state_keys]),
                              native.pointers([st[k] for k in tangent_keys]), st[STEP], (n, 1, native.int_array([0, n]))))
        # gradients of another layout are copied once, and kept alive until the kernels ran
        grads = [[p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in u[1]] for u in units]
        grad_ptrs = [native.pointers(g) for g in grads]
        k = len(self._learned)
        if hyper:
            h = torch.zeros(k, dtype=torch.float64)
            if record:
                dots = kernel.fn("dots", dtype)
                for (_, _, _, tangents, _, (n, nseg, offsets)), gptr in zip(units, grad_ptrs):
                    threads = native.threads_for(n)
                    rows = torch.zeros(threads, k, dtype=torch.float64)  # one per thread
                    dots(threads, n, nseg, offsets, gptr, k, tangents, rows.data_ptr())
                    h += rows.sum(0)
            active = self._flags[int(record and self._meta_step >= self.hypergrad.warmup)]
            _hyper_in_step(
                self.hypergrad, h.to(dtype), self._flags[int(record)], active, self._coef, self._low,
                self._high, self._idx, self._hyper_state, self._hyper_lr, self._hyper_momentum, self._last_h,
            )
        step_fn = kernel.fn("step", dtype)
        coef = self._coef.data_ptr()
        fields = family.hyperparameters.model_fields
        nstate, ntan = len(rule.state_keys), len(tangent_keys)
        for (group, params, state, tangents, step, (n, nseg, offsets)), gptr in zip(units, grad_ptrs):
            hp = native.double_array([float(group[f]) for f in fields])
            step_fn(
                native.threads_for(n), n, nseg, offsets, native.pointers(params), gptr, nstate, state, ntan,
                tangents, coef, step.data_ptr(), hp, options,
            )
        self._native_units = len(units)
        return True

    def _start_state(self, state, grad, param, group, tangents: bool) -> None:
        """A parameter's state at first sight (the family's buffers, step 0), and zero tangents
        where ``tangents`` and none are kept (a fast path updates them in place)."""
        if STEP not in state:
            state.update(self.family.init(param, grad, group))
            state[STEP] = torch.zeros((), dtype=self._coef.dtype, device=param.device)
        if tangents:
            for key in self._tangent_keys:
                if key not in state:
                    state[key] = torch.zeros_like(param)

    def _intact_bucket(self, gi, params, device) -> _Bucket | None:
        """The group's flat bucket, if it still holds every parameter's state."""
        bucket = self._buckets.get((gi, device))
        if bucket is not None and bucket.intact(params, [self.state[p] for p in params]):
            return bucket
        return None

    def _state_starts(self, gi, params, device) -> bool:
        """No bucket yet and no state: the group starts now, and can start as one bucket."""
        return (gi, device) not in self._buckets and not any(self.state[p] for p in params)

    def _new_bucket(self, gi, group, params, device, learning: bool) -> _Bucket | None:
        """Start the group's state and gather it into a bucket (None if it does not fit one:
        the state is set up all the same)."""
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            _, grad, param = _views(p)
            self._start_state(st, grad, param, group, tangents=learning)
        return self._make_bucket(gi, device, params, states)

    def _make_bucket(self, gi, device, params, states) -> _Bucket | None:
        keys = [k for k in states[0] if k != STEP]
        same = all(p.dtype == params[0].dtype and p.is_contiguous() for p in params) and all(
            list(k for k in st if k != STEP) == keys for st in states
        )
        if not same:
            return None
        bucket = self._buckets[(gi, device)] = _Bucket(params, states, keys)
        return bucket

    def _fused_hyperparameters(self, group, device, compiled: bool) -> dict[str, Any]:
        """The group's hyperparameters for the fused rule; compiled, lr is a tensor, so that a
        scheduler changing it does not trigger recompilation."""
        hp = {k: group[k] for k in self.family.hyperparameters.model_fields}
        if compiled:
            hp["lr"] = torch.full((), group["lr"], dtype=self._coef.dtype, device=device)
        return hp

    def _fused_group(self, group, entries, steps, coef_dict, learning) -> None:
        """The fast path for the parameters of one group on one device; ``entries`` are
        (parameter, its (local, grad, param) views)."""
        family = self.family
        learned = self._learned if learning else ()
        compiled = self._fused_step is not _fused_param_step
        hp = self._fused_hyperparameters(group, steps[0].device, compiled)
        # The 0-d work of every parameter at once, vectorised over their step counts.
        scalars = family.fused_scalars(coef_dict, hp, torch.stack(steps), learned)
        per_param = {k: v.unbind(0) for k, v in scalars.items() if torch.is_tensor(v) and v.ndim == 1}
        for i, (p, (local, grad, _)) in enumerate(entries):
            state = self.state[p]
            sc = {k: (per_param[k][i] if k in per_param else v) for k, v in scalars.items()}
            fam_state = family_state(state)
            tangents = [state[key] for key in self._tangent_keys] if learning else []
            p = local  # the update goes into the (local) parameter itself
            if compiled and all(t.is_contiguous() for t in (grad, p, *fam_state.values(), *tangents)):
                # one rank-1 graph with a dynamic length serves every parameter
                flat = {k: v.view(-1) for k, v in fam_state.items()}
                args = (family, learned, grad.view(-1), p.view(-1), flat, sc, [t.view(-1) for t in tangents])
                try:
                    self._fused_step(*args)
                    continue
                except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
                    warnings.warn(f"metaopt: torch.compile failed ({err!r:.300}); running eagerly")
                    self._fused_step = _fused_param_step
                    self._dots = _dots
            _fused_param_step(family, learned, grad, p, fam_state, sc, tangents)

    def _hyper_step(self) -> None:
        pairs, covered = [], set()
        for (gi, _), bucket in list(self._buckets.items()):
            params = [p for p in self.param_groups[gi]["params"] if p.device == bucket.params[0].device]
            states = [self.state[p] for p in params]
            if bucket.intact(params, states) and all(p.grad is not None for p in params):
                # the whole group's gradient in one flat copy, dotted with its flat tangents
                pairs.append((None, bucket.gather_grads(), bucket.tangents))
                covered.update(id(p) for p in params)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in covered:
                    continue
                state = self.state.get(p)
                if p.grad is not None and state is not None and self._tangent_keys[0] in state:
                    pairs.append((p, p.grad, [state[key] for key in self._tangent_keys]))
        if not pairs:  # first step, or no parameter was updated last step: nothing to learn from
            return
        self._apply_hypergradient(self._hypergradient(pairs))

    def _hypergradient(self, pairs) -> Tensor:
        """``h = Σ ⟨g, tangents⟩`` over (param, grad, tangents) triples. A sharded (DTensor)
        parameter contributes a partial sum: those are all-reduced over the mesh dimensions it
        is sharded on — one collective of K numbers per hyper-step (FSDP2); replicated and
        plain tensors (DDP: gradients already averaged) need none."""
        k = len(self._learned)
        plain, sharded = [], {}
        for p, g, tangents in pairs:
            key = _shard_key(p)
            (plain if key is None else sharded.setdefault(key, [])).append((_local(g), tangents))
        h = hypergradient(plain, k, self._coef, self._dots)
        for (mesh, dims), part in sharded.items():
            partial = hypergradient(part, k, self._coef, self._dots)
            for d in dims:
                torch.distributed.all_reduce(partial, group=mesh.get_group(d))
            h = h + partial
        return h

    def _apply_hypergradient(self, h: Tensor) -> None:
        """Record h, then (past the warm-up) one hyper-step and the projection into the boxes."""
        self._last_h = h
        if self._meta_step < self.hypergrad.warmup:
            return
        idx = self._idx
        new = hyper_update.apply(
            self.hypergrad,
            h,
            self._coef.index_select(0, idx),
            self._hyper_state,
            self._hyper_lr,
            self._hyper_momentum,
            self._low.index_select(0, idx),
            self._high.index_select(0, idx),
        )
        self._coef.index_copy_(0, idx, new)

    def validation_hyperstep(self, loss: Tensor) -> None:
        """One hyper-step on ⟨∇L_val(θ_t), ∂θ_t/∂c⟩, the one-step hyper-gradient of a
        validation loss evaluated at the current parameters (after ``step()`` t). Leaves
        ``.grad`` alone. Meant for ``OneStep(objective="validation")``, e.g. every N steps."""
        if not isinstance(self.hypergrad, OneStep):
            raise RuntimeError("validation_hyperstep needs hypergrad=OneStep(...)")
        params, tangents = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state is not None and self._learned and self._tangent_keys[0] in state:
                    params.append(p)
                    tangents.append([state[key] for key in self._tangent_keys])
        if not params or not self._learned:
            return
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        pairs = [(p, g, t) for p, g, t in zip(params, grads, tangents) if g is not None]
        with torch.no_grad():
            self._apply_hypergradient(self._hypergradient(pairs))

    def unrolled_step(
        self,
        model: torch.nn.Module,
        batches,
        loss_fn,
        meta_batch,
        meta_loss_fn=None,
        *,
        commit: bool = True,
    ) -> Tensor:
        """K differentiable steps on ``batches`` (K = len(batches)), a hyper-step on the
        gradient of the meta-objective with respect to the learned coefficients, then the K
        steps committed to ``model`` and this optimizer (``commit=False`` leaves both as they
        were). Returns the meta-loss (detached).

        ``loss_fn(model, batch)`` gives a training loss; the meta-objective is
        ``(meta_loss_fn or loss_fn)(model_after_K_steps, meta_batch)`` — a held-out validation
        batch, or the next training batch for the training-loss objective. The K steps use the
        coefficients in force before the hyper-step. ``model`` must hold this optimizer's
        parameters. See :mod:`metaopt.hyper.unrolled`.
        """
        if self.hypergrad is None or not self._learned:
            raise RuntimeError("unrolled_step needs learned coefficients and a hypergrad setting")
        if any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise NotImplementedError(
                "unrolled_step does not run on sharded (DTensor / FSDP2) parameters; use "
                "OneStep hyper-gradients there"
            )
        cfg = self.hypergrad
        batches = list(batches)
        if isinstance(cfg, Unrolled) and len(batches) != cfg.steps:
            raise ValueError(f"Unrolled(steps={cfg.steps}) got {len(batches)} training batches")
        first_order = cfg.first_order if isinstance(cfg, Unrolled) else False
        meta_loss, h = unroll(
            self, model, batches, loss_fn, meta_batch, meta_loss_fn,
            first_order=first_order, commit=commit,
        )
        with torch.no_grad():
            self._apply_hypergradient(h.to(self._coef))
        if commit:
            self._meta_step += len(batches)
        return meta_loss

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["metaopt"] = {
            "family": self.family.name,
            "coefficient_names": list(self._names),
            "learned": list(self._learned),
            "coefficients": self._coef.clone(),
            "last_hypergrad": self._last_h.clone(),
            "hyper_state": {k: v.clone() for k, v in self._hyper_state.items()},
            "step": self._meta_step,
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd = dict(state_dict)
        meta = sd.pop("metaopt", None)
        if meta is None:
            raise ValueError("not a metaopt state dict: the 'metaopt' entry is missing")
        if meta["family"] != self.family.name or list(meta["coefficient_names"]) != list(
            self._names
        ):
            raise ValueError(
                f"state dict is for family {meta['family']!r} with coefficients "
                f"{meta['coefficient_names']}, this optimizer runs {self.family.name!r} with "
                f"{list(self._names)}"
            )
        if list(meta["learned"]) != list(self._learned):
            raise ValueError(
                f"state dict learns {meta['learned']}, this optimizer learns {list(self._learned)}"
            )
        # torch would cast every floating state tensor to its parameter's dtype; state lives in
        # the compute precision (fp32 for bf16/fp16 parameters) on the parameter's local device.
        saved_state = sd.get("state", {})
        super().load_state_dict({**sd, "state": {}})
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, current):
            if pid in saved_state:
                local = _local(p)
                work = compute_dtype(local.dtype)
                self.state[p] = {
                    k: v.to(device=local.device, dtype=self._coef.dtype if k == STEP else (
                        work if v.is_floating_point() else v.dtype))
                    if torch.is_tensor(v) else v
                    for k, v in saved_state[pid].items()
                }
        self._buckets.clear()
        if self.path != "generic":
            for gi, group in enumerate(self.param_groups):
                by_device: dict[torch.device, list[Tensor]] = {}
                for p in group["params"]:
                    by_device.setdefault(p.device, []).append(p)
                for device, params in by_device.items():
                    states = [self.state.get(p, {}) for p in params]
                    if len(params) == len(group["params"]) and all(STEP in st for st in states):
                        steps = {float(st[STEP]) for st in states}
                        if len(steps) == 1:
                            self._make_bucket(gi, device, params, states)
        dev = self._coef.device
        self._coef.copy_(meta["coefficients"].to(dev))
        self._last_h = meta["last_hypergrad"].to(device=dev, dtype=self._coef.dtype).clone()
        for k, v in meta["hyper_state"].items():
            self._hyper_state[k].copy_(v.to(dev))
        self._meta_step = int(meta["step"])


def _native_unfit(family: Family, learned, params, dtype) -> str | None:
    """Why the native path cannot run this optimizer (None: it can)."""
    if not native.enabled():
        return "METAOPT_NATIVE is off"
    if family.native_rule(learned) is None or family.native_rule(()) is None:
        return f"{family.name} has no native kernel for this configuration"
    for p in params:
        if _is_dtensor(p):
            return "a parameter is a DTensor (sharded parameters take the fused or generic path)"
        if p.device.type != "cpu":
            return f"a parameter is on {p.device}; native kernels run on the CPU"
        if p.dtype != dtype or not native.supports(p.dtype):
            return f"a parameter is {p.dtype}; native kernels take float32 or float64, one dtype per optimizer"
    return None


def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _views(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(local parameter, its gradient and its value in the compute precision): what the rule
    reads; the update is added to the local parameter."""
    local = _local(p)
    dtype = compute_dtype(local.dtype)
    return local, _local(p.grad).to(dtype), local.to(dtype)


def _shard_key(p: Tensor | None):
    """(mesh, sharded mesh dims) of a sharded DTensor parameter, None for anything else."""
    if p is None or not _is_dtensor(p):
        return None
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"metaopt: a parameter has a Partial placement {p.placements}; expected Shard or Replicate")
    dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else None


def _whole_step(
    family, config, learned, names, h, record, active, coef, low, high, idx, hyper_state,
    hyper_lr, hyper_momentum, last_h, buckets,
):
    """A whole optimizer step over flat buckets, written to compile into one graph: the
    hyper-step on ``h`` (skipped where ``active`` is false; ``h`` recorded where ``record`` is),
    then each bucket's rule and tangents with the new coefficients. ``config`` is None when no
    hyper-step is due. ``buckets``: (grad, param, state, tangents, delta_out, step,
    hyperparameters) per group."""
    if config is not None:
        _hyper_in_step(config, h, record, active, coef, low, high, idx, hyper_state, hyper_lr, hyper_momentum, last_h)
    coef_dict = {n: coef[i] for i, n in enumerate(names)}
    for grad, param, state, tangents, delta, step, hp in buckets:
        scalars = family.fused_scalars(coef_dict, hp, step, learned)  # equal steps in a bucket
        _fused_param_step(family, learned, grad, param, state, scalars, tangents, delta)


def _hyper_in_step(config, h, record, active, coef, low, high, idx, hyper_state, hyper_lr, hyper_momentum, last_h):
    """The hyper-step inside a bucketed step: ``h`` recorded where ``record`` is true, the
    learned coefficients moved and projected where ``active`` is (0-d bool tensors: no branch
    on the host)."""
    last_h.copy_(torch.where(record, h, last_h))
    new = hyper_update.apply(
        config, h, coef.index_select(0, idx), hyper_state, hyper_lr, hyper_momentum,
        low.index_select(0, idx), high.index_select(0, idx), active=active,
    )
    coef.index_copy_(0, idx, new)


def _fused_param_step(family, learned, grad, param, state, scalars, tangent, delta_out=None):
    """One parameter (or a bucket's flat buffers) through the family's fused rule; state and
    tangents (one buffer per learned coefficient, so that one compiled kernel writes them all)
    updated in place. The update is added to ``param``, or written to ``delta_out`` for a
    bucket, whose parameters are not contiguous with each other."""
    delta, new_state, tangents = family.fused_update(grad, param, state, scalars, learned)
    if delta_out is None:
        param.add_(delta)
    else:
        delta_out.copy_(delta)
    for k, v in new_state.items():
        state[k].copy_(v)
    for j, t in enumerate(tangents):  # row by row: no stacked temporary
        tangent[j].copy_(t)


class _Bucket:
    """The parameters of one param group on one device, their state in one flat buffer per key.

    Each parameter's state entries (its step count too) become views into the flat buffers, so
    ``opt.state``, ``state_dict`` and the generic code see per-parameter tensors as before, while
    the native kernel (or the compiled graph) makes one pass for the dot products and one for
    the rule over the whole group. Built only when every
    parameter's step count is known equal (fresh state, or checked at ``load_state_dict``), and
    dropped as soon as a parameter is left out of a step (its step count then differs).
    """

    def __init__(self, params: list[Tensor], states: list[dict[str, Tensor]], keys: list[str]) -> None:
        self.params = params
        numels = [p.numel() for p in params]
        ref = params[0]
        self.flat: dict[str, Tensor] = {}
        self.views: dict[str, list[Tensor]] = {}
        # One buffer per tangent, not one (K, N) matrix: inductor writes a matrix output in a
        # loop of its own that recomputes the whole rule per row (measured 8x slower).
        for key in keys:
            buf = torch.empty(sum(numels), dtype=states[0][key].dtype, device=ref.device)
            views = []
            for p, st, part in zip(params, states, buf.split(numels)):
                part.copy_(st[key].reshape(-1))
                st[key] = part.view(p.shape)
                views.append(st[key])
            self.flat[key], self.views[key] = buf, views
        # the step counts too, so that one add counts a step for the whole group
        self.step = torch.stack([st[STEP] for st in states])
        for i, st in enumerate(states):
            st[STEP] = self.step[i]
        self.views[STEP] = [st[STEP] for st in states]
        self.tangents = [self.flat[k] for k in keys if is_tangent_key(k)]
        self.numels = numels
        self._native_layout, self._native_ptrs = None, {}
        self.grad = self.delta = None  # the torch-ops workspace, made on first use

    def _workspace(self) -> None:
        # the group's gradient, gathered, and the update the kernel writes (one buffer for both
        # computes wrong results: inductor does not order aliased I/O); the native path reads
        # gradients in place and writes parameters directly, so it needs neither
        ref, numels = self.params[0], self.numels
        self.grad = torch.empty(sum(numels), dtype=compute_dtype(ref.dtype), device=ref.device)
        self.grad_views = [d.view(p.shape) for p, d in zip(self.params, self.grad.split(numels))]
        self.delta = torch.empty_like(self.grad)
        self.delta_views = [d.view(p.shape) for p, d in zip(self.params, self.delta.split(numels))]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_native_layout": None, "_native_ptrs": {}}  # C arrays: rebuilt on use

    def intact(self, params: list[Tensor], states: list[dict[str, Tensor]]) -> bool:
        """The same parameters, each state entry still the bucket's view (nothing replaced)."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        return all(all(map(operator.is_, [st.get(k) for st in states], views)) for k, views in self.views.items())

    def workspace_bytes(self) -> int:
        return 0 if self.grad is None else 2 * self.grad.numel() * self.grad.element_size()

    def native_pointers(self, state_keys, tangent_keys):
        """C arrays of the addresses of the flat buffers named (state, tangents): fixed for the
        bucket's life, so built once."""
        key = (tuple(state_keys), tuple(tangent_keys))
        if self._native_ptrs.get(key) is None:
            self._native_ptrs[key] = tuple(native.pointers([self.flat[k] for k in keys]) for keys in key)
        return self._native_ptrs[key]

    def native_layout(self):
        """(N, number of parameters, their offsets in the flat index space as a C array)."""
        if self._native_layout is None:
            offsets = list(itertools.accumulate(self.numels, initial=0))
            self._native_layout = (offsets[-1], len(self.numels), native.int_array(offsets))
        return self._native_layout

    def gather_grads(self) -> Tensor:
        """The group's current gradients, copied (and cast) into the flat workspace."""
        if self.grad is None:
            self._workspace()
        torch._foreach_copy_(self.grad_views, [p.grad for p in self.params])
        return self.grad


_copies = itertools.count()


def _own_copy(fn):
    """A function with the same body as ``fn`` but a code object of its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _dots(g: Tensor, tangents: list[Tensor]) -> Tensor:
    """[⟨g, t⟩ for t in tangents]: one pass over g when compiled."""
    flat = g.reshape(-1)
    return torch.stack([torch.dot(flat.to(t.dtype), t.reshape(-1)) for t in tangents])


_register(MetaOptimizer)
