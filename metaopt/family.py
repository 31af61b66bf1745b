"""Optimizer families: a coefficient space, per-group hyperparameters and one pure update rule."""

from __future__ import annotations

import copy
import functools
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .hyper.one_step import OneStep
from .space import Coefficient, CoefficientSpace
from .types import Betas, State, Tensor, compute_dtype

__all__ = ["Betas", "Family", "Hyperparameters", "State", "compute_dtype"]


class Hyperparameters(BaseModel):
    """Per-param-group options of a family (the values torch keeps in ``param_groups``).

    Families subclass this and add fields; ``lr`` is always present so that
    ``torch.optim.lr_scheduler`` works unchanged. A [`MetaOptimizer`][metaopt.MetaOptimizer]
    validates its ``**defaults`` and every param group it is given with the family's model.

    Keyword Args:
        lr (float): the learning rate, >= 0 (default 1e-3; a family's subclass may change it).

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown field or a value out of range.
    """

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, ge=0.0)


class Family:
    """A parameterised optimizer: ``space`` × ``hyperparameters`` × (``init``, ``update``).

    Subclasses set `name`, `hyperparameters` and build `space` (usually in
    ``__init__`` from their options), then write two pure functions of tensors:

    * ``init(param, grad, group) -> state`` — the per-parameter state at first sight;
    * ``update(grad, param, state, coefficients, group, step) -> (delta, new_state)`` — the
      parameter change (``θ_t = θ_{t-1} + delta``, learning rate included) and the new state.

    ``coefficients`` maps every coefficient name to a 0-d tensor, ``group`` is the param group
    (a dict holding the validated hyperparameters), ``step`` is a 0-d tensor holding t (1 on the
    first update). ``update`` must be written in out-of-place torch ops so that the engine can
    differentiate it with respect to the coefficients, and must not read tensor values on the
    host (no ``.item()``, no ``if tensor:``). A coefficient may arrive as a 0-d tensor or, on the
    elementwise path, as a tensor of the parameter's shape: write the rule with broadcasting ops.

    ``Family`` itself takes no arguments; a subclass's constructor takes its options (the
    shipped families validate them with a pydantic model and raise
    ``pydantic.ValidationError`` for a bad one).
    """

    name: ClassVar[str] = "family"
    """The family's name: its entry-point name when registered, shown by ``metaopt families``."""
    hyperparameters: ClassVar[type[Hyperparameters]] = Hyperparameters
    """The pydantic model of a param group's options (a subclass of `Hyperparameters`)."""
    space: CoefficientSpace
    """The coefficients: initial values, boxes, which are learned."""
    points: Mapping[str, Mapping[str, float]] = {}
    """Named points of the family: point name -> {coefficient name: value} (see `at`)."""
    references: Mapping[str, Callable[..., Any]] = {}
    """Reference optimizers of named points, written by others: point name -> a factory
    ``factory(params, **hyperparameters)`` that returns a ``torch.optim.Optimizer`` (a class such
    as ``torch.optim.Adam`` works when its keyword names are the family's hyperparameters).
    It receives those of the param group's hyperparameters its signature names (all of them if it
    takes ``**kwargs``). [`check_family`][metaopt.check_family] holds the family at each point,
    coefficients fixed, equal to its reference; a factory that raises ``NotImplementedError``
    (a setting the reference does not cover) is skipped there."""
    elementwise: ClassVar[bool] = False
    """True when coordinate i of the update depends only on coordinate i of the gradient, the
    parameter and the state (Adam-like rules). The engine then gets every tangent from one
    reverse pass; otherwise it uses forward mode (exact for any rule, much slower)."""
    fused_scalars = None
    """Optional fast path, with `fused_update`: ``fused_scalars(coefficients, group, step,
    learned)`` returns the 0-d quantities of a step (bias corrections, ...; computed outside the
    elementwise kernel). None: the family has no hand-derived rule."""
    fused_update = None
    """Optional fast path, with `fused_scalars`: ``fused_update(grad, param, state, scalars,
    learned) -> (delta, new_state, tangents)`` is the rule and its tangents
    ``[∂delta/∂c_k for k in learned]`` (each of the parameter's shape) in plain elementwise ops.
    The engine uses them when present (one fused kernel under ``compile=True``); a family's
    tests must hold them equal to ``update`` differentiated by the engine."""

    def native_rule(self, learned: tuple[str, ...]):
        """The family's C kernel for the native CPU path (`metaopt.kernels`), if it has one.

        The kernel comes as a [`NativeRule`][metaopt.kernels.NativeRule], for a run that learns
        ``learned``; None where the family has none or this configuration is not covered (the
        engine then takes the fused or generic path). A family with a native rule also has
        ``fused_update``, the same arithmetic in torch ops, and its tests hold the kernel equal
        to the generic path.

        Args:
            learned: the names of the coefficients the run learns, in the space's order.

        Returns:
            (metaopt.kernels.NativeRule | None): the kernel's declaration, or None (the default
                here: no native kernel).
        """
        return None

    # -- the two functions a family author writes -------------------------------------------
    def init(self, param: Tensor, grad: Tensor, group: Mapping[str, Any]) -> State:
        """The per-parameter state at first sight (a dict of tensors).

        Built from the parameter, its first gradient and its param group. Written by the family
        author.

        Args:
            param: the parameter (in the compute precision: fp32 for a bf16/fp16 parameter).
            grad: its first gradient, in the same precision.
            group: its param group, a dict holding the validated hyperparameters.

        Returns:
            Buffer name -> tensor, the state ``update`` first receives.

        Raises:
            NotImplementedError: here; a family overrides it.
        """
        raise NotImplementedError

    def update(
        self,
        grad: Tensor,
        param: Tensor,
        state: State,
        coefficients: Mapping[str, Tensor],
        group: Mapping[str, Any],
        step: Tensor,
    ) -> tuple[Tensor, State]:
        """The update rule, written by the family author.

        It returns ``(delta, new_state)``, the parameter change (``θ_t = θ_{t-1} + delta``,
        learning rate included) and the new state, in out-of-place torch ops and without host
        reads (see the class docstring).

        Args:
            grad: the gradient g_t.
            param: the parameter θ_{t-1}.
            state: the state from the last step (or from ``init``), buffer name -> tensor,
                without the engine's step count and tangents.
            coefficients: every coefficient's name -> a 0-d tensor (or, on the elementwise path,
                a tensor of the parameter's shape).
            group: the param group, a dict holding the validated hyperparameters.
            step: a 0-d tensor holding t (1 on the first update).

        Returns:
            ``(delta, new_state)``: the parameter change and the new state.

        Raises:
            NotImplementedError: here; a family overrides it.
        """
        raise NotImplementedError

    def default_hypergrad(self):
        """The hyper-optimizer a [`MetaOptimizer`][metaopt.MetaOptimizer] uses when none is given.

        Here ``OneStep.scale_free()`` ([`HyperOptimizer.scale_free`][metaopt.HyperOptimizer.scale_free]):
        each hyper-step moves a learned coefficient by a fixed fraction of its box against the
        sign of its hyper-gradient, whatever that hyper-gradient's scale, so that a coefficient whose
        hyper-gradient is tiny (a second-moment coefficient's carries a factor of 1 - β2) still
        learns. A family overrides this when a step linear in the box does not suit a
        coefficient: a learning rate whose box spans decades (SGD-HD's paper step), or a
        family tuned with its own setting (MADA's).

        Returns:
            (metaopt.HyperOptimizer): the hyper-gradient mode and its settings.
        """
        return OneStep.scale_free()

    # -- conveniences the engine provides to every family ----------------------------------
    def defaults(self) -> dict[str, Any]:
        """Default hyperparameters of a param group.

        Returns:
            The family's ``hyperparameters`` model with every field at its default, as a dict.
        """
        return self.hyperparameters().model_dump()

    def with_coefficients(self, **overrides: float | Mapping[str, Any] | Coefficient) -> Family:
        """A copy of this family whose coefficient space is changed.

        See [`CoefficientSpace.replace`][metaopt.CoefficientSpace.replace].

        Args:
            **overrides: coefficient name -> a number (its new ``init``), a mapping of the
                fields to change (``{"learned": False}``), or a whole
                [`Coefficient`][metaopt.Coefficient].

        Returns:
            The copy; this family is left as it was.

        Raises:
            pydantic.ValidationError: (a ``ValueError``) for a name the space does not have, or
                a value that breaks its coefficient's box.
        """
        new = copy.copy(self)
        new.space = self.space.replace(**overrides)
        return new

    def at(self, point: str | Mapping[str, float], *, learned: bool | None = None) -> Family:
        """A copy of this family whose coefficients start at a named point (or a mapping).

        ``learned=False`` freezes every coefficient, ``True`` learns every coefficient, ``None``
        keeps the family's choice.

        Args:
            point: the name of one of the family's ``points`` (``"adam"``), or coefficient name ->
                initial value.
            learned: False freezes every coefficient, True learns every one, None (default)
                keeps the family's choice.

        Returns:
            The copy; this family is left as it was.

        Raises:
            KeyError: where ``point`` names no point of the family (the message lists them).
            pydantic.ValidationError: (a ``ValueError``) where the point names a coefficient the
                space does not have, or a value outside its box.
        """
        if isinstance(point, str):
            if point not in self.points:
                raise KeyError(
                    f"{self.name} has no point {point!r}; known points: {sorted(self.points)}"
                )
            values = dict(self.points[point])
        else:
            values = dict(point)
        overrides: dict[str, Any] = {n: {"init": v} for n, v in values.items()}
        if learned is not None:
            for n in self.space.names:
                overrides.setdefault(n, {})["learned"] = learned
        return self.with_coefficients(**overrides)

    def description(self) -> dict[str, Any]:
        """The family as plain data: everything ``metaopt describe`` shows, and `describe` summarises.

        Returns:
            The first line of its class docstring (``summary``), its coefficients (name, init,
                box, learned), the learned ones, its options (each field's name, type, default,
                value, constraints and description; None for a family without an options model),
                its hyperparameters (the same, without values), its named points, whether its
                rule is elementwise, whether it has a hand-derived fast path and a native CPU
                kernel, and its default hyper-optimizer (mode and settings; None: none).
        """
        space = self.space
        hyper = self.default_hypergrad()
        info: dict[str, Any] = {
            "summary": type(self).__doc__.strip().splitlines()[0] if type(self).__doc__ else "",
            "coefficients": [
                {"name": n, "init": c.init, "low": c.low, "high": c.high, "learned": c.learned} for n, c in space.root.items()
            ],
            "learned": list(space.learned),
            "options": None,
            "hyperparameters": _fields_info(self.hyperparameters),
            "hyperparameters_model": self.hyperparameters.__name__,
            "points": {p: dict(v) for p, v in self.points.items()},
            "elementwise": bool(self.elementwise),
            "fast_path": self.fused_update is not None and self.fused_scalars is not None,
            "native_kernel": self.native_rule(space.learned) is not None,
            "default_hypergrad": None if hyper is None else {"mode": type(hyper).__name__, **hyper.model_dump(mode="json")},
        }
        opts = getattr(self, "options", None)
        if isinstance(opts, BaseModel):
            info["options"] = _fields_info(type(opts), opts)
            info["options_model"] = type(opts).__name__
        return info

    def describe(self) -> str:
        """A short human-readable table of the coefficient space (from `description`).

        Returns:
            The family's name and the first line of its class docstring, then one line per
                coefficient (init, box, learned or fixed) and the named points.
        """
        info = self.description()
        lines = [f"{self.name}: {info['summary']}"]
        for c in info["coefficients"]:
            flag = "learned" if c["learned"] else "fixed"
            lines.append(f"  {c['name']:<8} init={c['init']:<8g} box=[{c['low']:g}, {c['high']:g}]  {flag}")
        if info["points"]:
            lines.append("  points: " + ", ".join(sorted(info["points"])))
        return "\n".join(lines)

    def __repr__(self) -> str:
        inits = ", ".join(f"{n}={c.init:g}" for n, c in self.space.root.items())
        return f"{type(self).__name__}({inits})"


def _type_name(annotation: Any) -> str:
    """A field's type as written, without ``Annotated`` metadata (a validator would show as its address)."""
    annotation = _without_metadata(annotation)
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return re.sub(r"\btyping\.", "", str(annotation)).replace("NoneType", "None")


def _without_metadata(annotation: Any) -> Any:
    """``annotation`` with every ``Annotated[T, ...]`` in it replaced by ``T``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _without_metadata(args[0])
    inner = tuple(_without_metadata(a) for a in args)
    if inner == args:
        return annotation
    if origin is typing.Union:
        return typing.Union[inner]
    if origin is types.UnionType:
        return functools.reduce(operator.or_, inner)
    if isinstance(annotation, types.GenericAlias):
        return types.GenericAlias(origin, inner)
    return annotation.copy_with(inner)


def _constraints(field: Any) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for m in field.metadata:
        for attr, sym in words.items():
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v:g}" if isinstance(v, (int, float)) else f"{sym} {v}")
    return ", ".join(parts)


def _fields_info(model: type[BaseModel], values: BaseModel | None = None) -> list[dict[str, Any]]:
    """Each field of a pydantic model as data: name, type, default, constraints, description (and value)."""
    rows = []
    for n, f in model.model_fields.items():
        row = {
            "name": n,
            "type": _type_name(f.annotation),
            "default": None if f.is_required() else f.get_default(call_default_factory=True),
            "constraints": _constraints(f),
            "description": f.description or "",
        }
        if values is not None:
            row["value"] = getattr(values, n)
        rows.append(row)
    return rows
