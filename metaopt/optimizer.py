"""MetaOptimizer: runs any family as a ``torch.optim.Optimizer`` and learns its coefficients.

The optimizer holds the param groups, the per-parameter state, the hyper-optimizer's record
(``metaopt.hyper.update.HyperState``) and one execution path (``metaopt.paths``); a step
is the data flow between them, and everything else is checkpoints and the torch API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from . import checkpoint, contract
from .family import Family
from .groups import check_dense_gradients, group_index, hyperparameters, validated_group
from .hyper import update as hyper_update
from .hyper.one_step import validation_pairs
from .hyper.unrolled import _register, unroll
from .hyper.update import HyperOptimizer, HyperStep
from .paths import PATHS, runnable_instead, select_path
from .sharding import local
from .types import Tensor
from .watch import SkipWatch


class MetaOptimizer(torch.optim.Optimizer):
    """A family run as a torch optimizer, its learned coefficients moved by hyper-gradients.

    Hyper-gradient descent on an optimizer's coefficients, as in hypergradient descent (Baydin
    et al., "Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018) and MADA
    (Ozkara et al., "MADA: Meta-Adaptive Optimizers through hyper-gradient Descent", ICML 2024,
    arXiv:2401.08893), for any [`Family`][metaopt.Family] and with the hyper-gradient of the
    mode given as ``hypergrad``.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        family: a [`Family`][metaopt.Family] instance or the name of a registered family.
        hypergrad: [`OneStep`][metaopt.OneStep], [`Forward`][metaopt.Forward] (tangents carried
            through the optimizer state; the compiled path under ``compile=True``, else the
            generic path), [`Unrolled`][metaopt.Unrolled] (then
            [`unrolled_step`][metaopt.MetaOptimizer.unrolled_step] learns and
            [`step`][metaopt.MetaOptimizer.step] takes plain steps), ``None`` for
            fixed coefficients, or ``"default"``: the family's ``default_hypergrad()``
            (``OneStep()`` unless the family says otherwise).
        path: ``"generic"`` runs the family's ``update`` differentiated by the engine;
            ``"fused"`` runs its hand-derived ``fused_scalars``/``fused_update`` in torch ops
            (one-step or fixed modes only); ``"compiled"`` runs any family's ``update`` with its
            tangents derived automatically, compiled (every mode but unrolled); ``"native"`` runs
            the family's C kernel on CPU threads (``metaopt.kernels``; float32/float64 CPU
            parameters, one-step or fixed modes, configurations the family's ``native_rule``
            accepts); ``"auto"`` (default) takes the native path where it applies and a C
            compiler works, else the fused path when ``compile`` is on, else the generic path
            (faster than eager fused); with ``compile`` on, a family without a fused rule takes
            the compiled path.
        compile: run the fused path through ``torch.compile`` (a group's rule one graph);
            falls back to eager, with a warning, where compilation fails. The first step then
            takes tens of seconds on a CPU. Where the native path runs, compile is not used.
            ``opt.path`` says which path runs, ``opt.path_reason`` why
            (``metaopt.paths.select_path``).
        coefficients: ``"shared"`` (default): one set of coefficients for every param group;
            ``"per_group"``: each param group has its own, learned from the hyper-gradient of
            its own parameters alone (Σ over the group of ⟨g, ∂θ/∂c⟩), in every mode and on
            every path. ``opt.coefficients`` then maps each name to one value per group,
            [`coefficients_of`][metaopt.MetaOptimizer.coefficients_of] reads a group's by index or by its ``"name"``, and
            [`set_coefficients`][metaopt.MetaOptimizer.set_coefficients] takes ``group=``.
        **defaults: the family's hyperparameters (``lr``, ``eps``, ``weight_decay`` …), the
            defaults of every param group; validated by the family's pydantic model. ``lr`` may
            be a tensor, kept as torch keeps it: a change made to it in place holds from the
            next step on (docs/reliability.md, "A tensor lr").

    Raises:
        KeyError: ``family`` is a name no family is registered under.
        TypeError: ``family`` is neither a [`Family`][metaopt.Family] nor a name, ``hypergrad``
            is neither a [`HyperOptimizer`][metaopt.HyperOptimizer], None nor ``"default"``, or
            ``params`` is a single tensor (torch's check).
        ValueError: ``coefficients`` is neither ``"shared"`` nor ``"per_group"``; ``path`` is
            unknown or cannot serve this optimizer (the message says why); a parameter is
            complex; the family's model refuses a hyperparameter (``pydantic.ValidationError``,
            a ``ValueError``); a tensor ``lr`` is not one floating-point value on the CPU or the
            parameters' device; the hyper-optimizer's ``lr`` or ``momentum`` mapping names a
            coefficient that is not learned; ``params`` is empty or holds a parameter twice
            (torch's checks).
        MemoryError: with ``hypergrad=Forward(...)``, the tangents would take more than its
            ``memory_fraction`` of a device's available memory.

    One step, in order: (1) the hyper-gradient ``h = Σ⟨g_t, ∂θ_{t-1}/∂c⟩`` from the tangents
    kept by the previous step and the gradients now in ``.grad``; (2) the hyper-optimizer moves
    the learned coefficients and projects them into their boxes; (3) the rule updates every
    parameter that has a gradient with the new coefficients, and keeps its tangents for the
    next step. (1) and (3) run on the execution path (``metaopt.paths``), (2) is
    ``metaopt.hyper.update.step`` on the hyper-optimizer's record. Nothing in a step reads a
    tensor value back to the host.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        family: Family | str,
        hypergrad: HyperOptimizer | Literal["default"] | None = "default",
        *,
        path: Literal["auto", "fused", "compiled", "native", "generic"] = "auto",
        compile: bool = False,
        coefficients: Literal["shared", "per_group"] = "shared",
        **defaults: Any,
    ) -> None:
        if isinstance(family, str):
            from .registry import get_family

            family = get_family(family)
        if not isinstance(family, Family):
            raise TypeError(f"family must be a metaopt.Family or a registered name, got {family!r}")
        contract.check_declaration(family)
        if isinstance(hypergrad, str) and hypergrad == "default":
            hypergrad = family.default_hypergrad()
        if hypergrad is not None and not isinstance(hypergrad, HyperOptimizer):
            raise TypeError(
                f"hypergrad must be metaopt.OneStep(...), metaopt.Forward(...), metaopt.Unrolled(...) or None, "
                f"got {hypergrad!r}"
            )
        if coefficients not in ("shared", "per_group"):
            raise ValueError(f"coefficients must be 'shared' or 'per_group', got {coefficients!r}")
        self.family, self.hypergrad, self.compile = family, hypergrad, compile
        self.per_group = coefficients == "per_group"
        super().__init__(params, hyperparameters(family, {**family.defaults(), **defaults}))

        all_params = [p for g in self.param_groups for p in g["params"]]
        dtype = torch.float32  # the coefficients' (and step counts'): never below float32
        for p in all_params:
            if p.is_floating_point():
                dtype = torch.promote_types(dtype, p.dtype)
        device = all_params[0].device
        space = family.space
        self._learned: tuple[str, ...] = space.learned if hypergrad is not None else ()
        self._hyper = hyper_update.init_state(hypergrad, space, self._learned, dtype, device)
        if self.per_group:
            self._hyper = self._hyper.with_rows(len(self.param_groups))
        self._meta_step = 0
        self._placeholder_state = False  # state made for DCP to load into, not by a step
        self._nan_at_zero_gradient = False
        # the skip count, watched for the warning when most hyper-steps are skipped
        self._skip_watch = SkipWatch(family.name, self._learned,
                                     {n: (space[n].low, space[n].high) for n in self._learned})
        for group in self.param_groups:  # before anything runs the rule: a broken one is refused here
            self._probe_contract(group)
        tangents, forward = (), None  # the fixed mode keeps none
        if hypergrad is not None:
            tangents = self._learned if hypergrad.keeps_tangents else ()
            forward = hypergrad.forward_tangents(family, self._learned, self.param_groups[0], dtype,
                                                 [local(p) for p in all_params])
        choice = select_path(
            family, tangents, all_params, dtype, requested=path, compile=compile,
            unrolled=hypergrad is not None and hypergrad.unrolls, forward=forward is not None, groups=self.param_groups,
        )
        self.path_reason = choice.reason
        self._path = PATHS[choice.name](family, space.names, tangents, dtype, device, compile=compile, forward=forward,
                                        per_group=self.per_group)

    # torch.optim.Optimizer pickles only defaults, state and param_groups; deepcopy and pickle
    # must carry the family, the coefficients, the hyper-optimizer and the path too.
    _OWN = ("family", "hypergrad", "compile", "path_reason", "_learned", "_hyper", "_meta_step", "_path",
            "_placeholder_state", "per_group", "_nan_at_zero_gradient", "_skip_watch")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._OWN})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_flag = "differentiable" in state["defaults"]
        super().__setstate__(state)
        if not had_flag:  # torch's __setstate__ adds it for its own optimizers; no family knows it
            self.defaults.pop("differentiable", None)
        if not self._path.ready():  # a native kernel that does not build here (load warned)
            self._path, self.path_reason = runnable_instead(self._path, self.compile)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)  # higher maps exact optimizer types

    # -- param groups ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as for any torch optimizer, its hyperparameters validated.

        Missing hyperparameters take the optimizer's defaults. With
        ``coefficients="per_group"`` the new group gets its own coefficients, at their ``init``.

        Args:
            param_group: ``{"params": ..., **hyperparameters}``; keys that are not the family's
                hyperparameters (a group's ``"name"``, a scheduler's ``"initial_lr"``) are kept
                as they are.

        Raises:
            ValueError: a parameter of the group is complex, the family's model refuses a
                hyperparameter (``pydantic.ValidationError``, a ``ValueError``), a tensor ``lr``
                is not one floating-point value on the CPU or the group's parameters' device, or
                a parameter is already in another group (torch's check).
        """
        super().add_param_group(validated_group(self.family, self.defaults, param_group, len(self.param_groups)))
        record = self.__dict__.get("_hyper")
        if record is not None:  # after construction (__init__ probes every group itself)
            self._probe_contract(self.param_groups[-1])
        if record is not None and self.per_group:  # a group added after construction: a row at the start
            fresh = hyper_update.init_state(self.hypergrad, self.family.space, self._learned,
                                            record.coefficients.dtype, record.coefficients.device)
            self._hyper = record.add_row(fresh)

    def _probe_contract(self, group: dict[str, Any]) -> None:
        """The family's rule tried on a few elements of ``group`` (``metaopt.contract.probe_group``).

        A rule that breaks the contract raises ``FamilyContractError`` here, the same on every
        path and in every mode.
        """
        values = self._hyper.coefficients
        nan = contract.probe_group(self.family, group, values if values.dim() == 1 else values[0], self._learned,
                                   self.hypergrad is not None and self.hypergrad.through_state)
        # the unrolled mode then hands the rule its coefficients per coordinate (hyper/unrolled.py)
        self._nan_at_zero_gradient = self._nan_at_zero_gradient or nan

    # -- coefficients ----------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The execution path that runs the rule: "native", "fused", "compiled" or "generic"."""
        return self._path.name

    @property
    def coefficients(self) -> dict[str, Tensor]:
        """Current coefficient values, name -> 0-d tensor (copies).

        With coefficients per group, name -> a tensor of one value per param group, in the
        groups' order.
        """
        values = self._hyper.coefficients
        return {n: values[..., i].clone() for i, n in enumerate(self.family.space.names)}

    def group_index(self, group: int | str) -> int:
        """The index of a param group given by index or by its ``"name"`` entry.

        Args:
            group: an index (negative ones count from the end) or the value of a group's
                ``"name"`` entry.

        Returns:
            The group's index in ``param_groups``, from 0.

        Raises:
            IndexError: an index out of range.
            KeyError: a name no param group has.
        """
        return group_index(self.param_groups, group)

    def coefficients_of(self, group: int | str) -> dict[str, Tensor]:
        """The coefficients a param group (index or ``"name"``) runs with.

        Args:
            group: the group's index or ``"name"``, as for
                [`group_index`][metaopt.MetaOptimizer.group_index].

        Returns:
            Name -> 0-d tensor (copies): the group's own with ``coefficients="per_group"``,
                else the shared ones.

        Raises:
            IndexError: an index out of range.
            KeyError: a name no param group has.
        """
        gi = self.group_index(group)
        values = self._hyper.coefficients
        row = values if values.dim() == 1 else values[gi]
        return {n: row[i].clone() for i, n in enumerate(self.family.space.names)}

    @property
    def learned(self) -> tuple[str, ...]:
        """Names of the coefficients that hyper-gradient descent moves."""
        return self._learned

    @property
    def last_hypergrad(self) -> dict[str, Tensor]:
        """The last hyper-gradient, learned coefficient name -> 0-d tensor (zeros before any).

        With coefficients per group, one value per param group.
        """
        return {n: self._hyper.last_h[..., j].clone() for j, n in enumerate(self._learned)}

    @property
    def skipped_hypersteps(self) -> Tensor:
        """How many hyper-steps were skipped because the hyper-gradient was not finite."""
        return self._hyper.skipped.clone()

    @torch.no_grad()
    def set_coefficients(self, group: int | str | None = None, **values: float | Tensor) -> None:
        """Set coefficients by name; each value is projected into its box.

        Args:
            group: the param group whose coefficients to set (index or ``"name"``; with
                ``coefficients="per_group"`` only); None (default) sets every group's.
            **values: coefficient name -> its new value (a number or a 0-d tensor), learned or
                fixed.

        Raises:
            ValueError: ``group`` is given and the coefficients are shared.
            KeyError: a name the family has no coefficient of, or a ``group`` name no param
                group has.
            IndexError: a ``group`` index out of range.
        """
        names = self.family.space.names
        if group is not None and not self.per_group:
            raise ValueError("set_coefficients(group=...) needs coefficients='per_group'; these are shared by every group")
        row = None if group is None else self.group_index(group)
        for name in values:
            if name not in names:
                raise KeyError(f"{self.family.name} has no coefficient {name!r}; known: {list(names)}")
        self._hyper = self._hyper.with_values({names.index(n): v for n, v in values.items()}, row)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear the gradients of every parameter, as torch's ``zero_grad`` does, but keep flat gradient storage.

        On the fused and compiled paths a param group's gradients are views into one flat
        buffer the optimizer owns (docs: performance, "Flat storage"). By default
        (``set_to_none=None``) those are zeroed in place with one fill per group, and stay
        tensors: a parameter that then gets no gradient takes its next step with a zero gradient
        (as after torch's ``set_to_none=False``) instead of sitting the step out. Every other
        gradient is set to None, as torch's default does.

        Args:
            set_to_none: None (default): flat gradients zeroed in place, the others set to None;
                True: every gradient set to None (a flat bucket then copies the next backward's
                gradients in, and points them back at its buffer); False: every gradient zeroed
                in place.
        """
        kept = set() if set_to_none else self._path.zero_flat_grads()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in kept:
                    continue
                if set_to_none is False:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
                else:
                    p.grad = None

    # -- the step --------------------------------------------------------------------------
    @staticmethod
    def profile_hook_step(func):
        """The wrapper torch puts around ``step`` (step hooks, profiler record), as a region ``torch.compile`` skips.

        torch wraps each optimizer class's ``step`` in it once (a subclass's own ``step`` too,
        and again after unpickling). Disabled whole, hooks included (they run eagerly, as without
        compile), it is the one place a compiled training step breaks its graph: traced, the
        rule's C call and custom autograd function broke it a dozen times and more. Here rather
        than on ``step`` so that the break comes before torch's wrapper, whose own frame would
        break again; made at the first optimizer, so that importing metaopt does not import dynamo.

        Args:
            func (Callable): the class's ``step``.

        Returns:
            (Callable): ``func`` with torch's hooks and profiling around it, never traced.
        """
        return torch.compiler.disable(torch.optim.Optimizer.profile_hook_step(func))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimizer step (the class docstring gives its three parts).

        Args:
            closure (Callable[[], torch.Tensor] | None): re-evaluates the model and returns the
                loss; run with gradients enabled, before anything else.

        Returns:
            (torch.Tensor | None): the closure's loss, or None without a closure.

        Raises:
            RuntimeError: a parameter has a sparse gradient (checked before anything changes).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_dense_gradients(self.param_groups, self.family.name)  # before anything changes
        if checkpoint.placeholder_step(self):  # DCP's step that only makes state to load into
            return loss
        work = self._path.plan(self.param_groups, self.state)  # what runs how; changes nothing
        hyper = None
        if self._learns_in_step():
            h = self._path.hypergradient(work)  # None: no parameter kept tangents last step
            hyper = self._hyper_step_on(h)
        # the hyper-step (where one is due), then the rule with the coefficients it leaves
        self._hyper = self._path.update(work, self._hyper, hyper)
        self._meta_step += 1
        if hyper is not None:
            self._watch(hyper)
        return loss

    def _watch(self, hyper: HyperStep) -> None:
        """Count a hyper-step that was taken, for the warning when most are skipped (``metaopt.watch``)."""
        if hyper.h is not None and hyper.active is True:
            self._skip_watch.after(self._hyper)

    def _learns_in_step(self) -> bool:
        return self.hypergrad is not None and self.hypergrad.learns_in_step and bool(self._learned)

    def _hyper_step_on(self, h: Tensor | None) -> HyperStep:
        """The hyper-step on h (``metaopt.hyper.update.step``).

        h recorded and, past the warm-up, the coefficients moved and projected into their boxes;
        nothing where h is None.
        """
        return HyperStep(self.hypergrad, h, self._meta_step >= self.hypergrad.warmup)


    # -- the other hyper-gradient entry points ---------------------------------------------
    def validation_hyperstep(self, loss: Tensor) -> None:
        """One hyper-step on ⟨∇L_val(θ_t), ∂θ_t/∂c⟩, the one-step hyper-gradient of a validation loss.

        The loss is evaluated at the current parameters (after ``step()`` t). Leaves ``.grad``
        alone. Meant for ``OneStep(objective="validation")``, e.g. every N steps. Nothing
        happens before a step has kept tangents.

        Args:
            loss: the validation loss at the current parameters, with its graph (it is
                differentiated with respect to the parameters).

        Raises:
            RuntimeError: the optimizer's ``hypergrad`` is not a [`OneStep`][metaopt.OneStep].
        """
        if self.hypergrad is None or not self.hypergrad.one_step_tangents:
            raise RuntimeError("validation_hyperstep needs hypergrad=OneStep(...)")
        pairs = validation_pairs(loss, self.param_groups, self.state, self._path.tangent_keys)
        if pairs is None:
            return
        with torch.no_grad():
            h = self._path.hypergradient_of(pairs, self._path.rows(self.param_groups))
            hyper = self._hyper_step_on(h)
            self._hyper = hyper.apply(self._hyper)
            self._watch(hyper)

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
        """K differentiable steps, a hyper-step on the meta-objective's gradient, then the K steps committed.

        K = len(batches). The meta-objective is ``(meta_loss_fn or loss_fn)(model_after_K_steps,
        meta_batch)`` — a held-out validation batch, or the next training batch for the
        training-loss objective — differentiated with respect to the learned coefficients. The K
        steps use the coefficients in force before the hyper-step and run through ``higher``
        (Grefenstette et al., "Generalized Inner Loop Meta-Learning", 2019, arXiv:1910.01727)
        with [`DifferentiableMetaOptimizer`][metaopt.DifferentiableMetaOptimizer]
        (``metaopt.hyper.unrolled``).

        Args:
            model: the module that holds this optimizer's parameters.
            batches (Iterable[Any]): the K training batches, one per step (with
                ``Unrolled(steps=K)``, exactly K).
            loss_fn (Callable[[torch.nn.Module, Any], torch.Tensor]): ``loss_fn(model, batch)``,
                the training loss.
            meta_batch (Any): the batch of the meta-objective.
            meta_loss_fn (Callable[[torch.nn.Module, Any], torch.Tensor] | None): the
                meta-objective's loss, ``meta_loss_fn(model, meta_batch)``; None (default) uses
                ``loss_fn``.
            commit: write the K steps to ``model`` and this optimizer (default True); False
                leaves both as they were (the hyper-step is taken either way).

        Returns:
            The meta-loss, detached.

        Raises:
            RuntimeError: there are no learned coefficients or no ``hypergrad``.
            NotImplementedError: a parameter is sharded (DTensor / FSDP2).
            ValueError: ``batches`` is empty, or its length differs from ``Unrolled(steps=...)``.
        """
        if self.hypergrad is None or not self._learned:
            raise RuntimeError("unrolled_step needs learned coefficients and a hypergrad setting")
        batches = list(batches)
        meta_loss, h = unroll(self, model, batches, loss_fn, meta_batch, meta_loss_fn, commit=commit)
        with torch.no_grad():
            hyper = self._hyper_step_on(h.to(self._hyper.coefficients))
            self._hyper = hyper.apply(self._hyper)
            self._watch(hyper)
        if commit:
            self._meta_step += len(batches)
        return meta_loss

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as a dict: torch's, with the metaopt record.

        The metaopt record (family, coefficient names, learned names, coefficients, last
        hyper-gradient, hyper-optimizer buffers, step) sits in the first param group under
        ``"metaopt"`` (``metaopt.checkpoint`` says why there); a sharded parameter's state is
        DTensors laid out like it (FSDP2), so that ``torch.distributed.checkpoint`` saves every
        rank's shard. A parameter that never took a step has no entry, as in ``torch.optim``.
        torch's state-dict hooks run around all of it: a post-hook sees (and may change or
        replace) the whole dict, record included.

        Returns:
            ``{"state": ..., "param_groups": [...]}``, as ``torch.optim.Optimizer.state_dict``,
                the record in ``param_groups[0]["metaopt"]``.
        """
        return checkpoint.state_dict_of(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load [`state_dict`][metaopt.MetaOptimizer.state_dict]'s output, all of it or nothing.

        Step counts that are Python numbers (as other tools and converters write them) become
        tensors again, in the coefficients' dtype, as torch's optimizers turn them; entries of
        ``state`` that belong to no parameter are kept as they are, as torch keeps them.
        Everything is checked and converted before anything changes: whatever is refused (the
        cases below), or fails on the way, leaves the optimizer as it was. torch's
        load-state-dict pre-hooks see the whole dict first (and may replace it), its post-hooks
        the loaded optimizer.

        Args:
            state_dict: what [`state_dict`][metaopt.MetaOptimizer.state_dict] returned (from
                ``torch.load`` or ``torch.distributed.checkpoint``); it is not changed, and the
                optimizer's state does not share its tensors.

        Raises:
            ValueError: the state dict is of another family or coefficient names, other learned
                coefficients, the other ``coefficients=`` mode or another hyper-optimizer; its
                metaopt record is missing or malformed; a step count is not a number; a tensor
                lr is not one floating-point value on the CPU or its parameters' device; or its
                param groups do not match this optimizer's (torch's check).
        """
        checkpoint.load_into(self, state_dict)


_register(MetaOptimizer)
