"""The hyper-optimizer: how learned coefficients descend their hyper-gradient.

Everything here is a pure function of tensors on the coefficients' device; nothing reads a value
back to the host, so a hyper-step never synchronises.

SGD with heavy-ball momentum (the default, as in the MADA authors' code)::

    h   <- clamp(h, -clip, clip)                 (optional; or h·min(1, clip/(|h|+1e-6)))
    buf <- mu * buf + h
    c   <- clamp(c - lr * buf, low, high)

Adam (Kingma & Ba, 2015) on the coefficients::

    m <- b1 m + (1-b1) h ;  v <- b2 v + (1-b2) h^2
    c <- clamp(c - lr * m/(1-b1^s) / (sqrt(v/(1-b2^s)) + eps), low, high)

Two optional settings make the step a fraction of each coefficient's box, w = high - low:
``lr_scale="box"`` multiplies ``lr`` by w, and ``max_move`` clamps the move to
``[-max_move * w, max_move * w]`` before the projection. With Adam and an ``eps`` far below the
hyper-gradient, the move no longer depends on the hyper-gradient's scale (``scale_free``, the
default of a family that does not choose its own).

A hyper-gradient with a non-finite entry is skipped whole (state and coefficients unchanged) and
counted in ``skipped``; so is one whose step overflows.

The hyper-optimizer's state is one record, ``HyperState``, and a hyper-step is one pure
function of it, ``step`` (optax's shape: ``init`` and ``update`` over a small state record).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, field_validator

from ..space import CoefficientSpace
from ..types import Betas

Tensor = torch.Tensor

PerCoefficient = float | dict[str, float]


class HyperOptimizer(BaseModel):
    """Settings of the hyper-optimizer shared by every hyper-gradient mode.

    ``lr`` and ``momentum`` take one number for every learned coefficient or a mapping
    ``{name: value}`` (names not in the mapping get the default of the field). ``clip`` bounds
    each coefficient's hyper-gradient: ``clip_style="value"`` clamps it to ``[-clip, clip]``;
    ``"norm"`` scales it by ``min(1, clip / (|h| + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_``
    does on a scalar (the MADA authors' script). ``warmup`` keeps the coefficients frozen for
    the first N steps.
    Defaults: SGD, lr 2.5e-3, momentum 0.5 — the setting the MADA authors used on Shakespeare
    (docs: Hyper-gradients, "Why these defaults", and what it does on the default job).

    The hyper-gradient modes ([`OneStep`][metaopt.OneStep], [`Forward`][metaopt.Forward],
    [`Unrolled`][metaopt.Unrolled]) are frozen pydantic models that subclass this one; these
    fields are keyword arguments of each.

    Keyword Args:
        optimizer (str): ``"sgd"`` (default: SGD with heavy-ball momentum) or ``"adam"`` (Adam,
            Kingma & Ba, 2015, on the coefficients).
        lr (float | dict[str, float]): the hyper learning rate, >= 0 (default 2.5e-3); one
            number for every learned coefficient or ``{name: value}``.
        momentum (float | dict[str, float]): SGD's heavy-ball momentum in [0, 1) (default 0.5);
            one number or ``{name: value}``.
        betas (tuple[float, float]): Adam's decay rates, each in [0, 1) (default (0.9, 0.999)).
        eps (float): Adam's ε, > 0 (default 1e-8).
        clip (float | None): the bound on each coefficient's hyper-gradient, >= 0; None
            (default) clips nothing.
        clip_style (str): ``"value"`` (default) clamps h to ``[-clip, clip]``; ``"norm"`` scales
            it by ``min(1, clip / (|h| + 1e-6))``.
        warmup (int): the number of first steps with the coefficients frozen, >= 0 (default 0).
        lr_scale (str): ``"absolute"`` (default): ``lr`` is the hyper learning rate itself;
            ``"box"``: ``lr`` is a fraction of each coefficient's box width (high - low), so
            that coefficients on boxes of different widths move alike.
        max_move (float | None): the largest move of one coefficient in one hyper-step, as a
            fraction of its box width, in (0, 1]; None (default) bounds nothing but the box.
            A move is clamped to it before the projection onto the box.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown field or a value out of its
            range (a negative ``lr``, a ``momentum`` outside [0, 1), ...).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PerCoefficient = 2.5e-3
    momentum: PerCoefficient = 0.5
    betas: Betas = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    clip: NonNegativeFloat | None = None
    clip_style: Literal["value", "norm"] = "value"
    warmup: int = Field(0, ge=0)
    lr_scale: Literal["absolute", "box"] = "absolute"
    max_move: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("lr")
    @classmethod
    def _lr_nonneg(cls, v: PerCoefficient) -> PerCoefficient:
        for name, x in _items(v):
            if not x >= 0.0:
                raise ValueError(f"hyper learning rate{name} must be >= 0, got {x}")
        return v

    @field_validator("momentum")
    @classmethod
    def _mom_range(cls, v: PerCoefficient) -> PerCoefficient:
        for name, x in _items(v):
            if not 0.0 <= x < 1.0:
                raise ValueError(f"momentum{name} must lie in [0, 1), got {x}")
        return v

    @classmethod
    def scale_free(cls, **overrides):
        """Sign descent on the coefficients, each step a fixed fraction of the coefficient's box.

        The default hyper-optimizer of a family that does not define ``default_hypergrad()``.
        Each hyper-step moves every learned coefficient by 3e-3 of its box width (high - low)
        against the sign of its hyper-gradient, so a coefficient whose hyper-gradient is 1e-9
        learns as fast as one whose hyper-gradient is 1, and none moves by more than 1e-2 of its
        box in one step (``max_move``, which also holds if ``lr`` or ``betas`` are overridden).
        It is Adam (Kingma & Ba, 2015) with β1 = β2 = 0, where m/sqrt(v) = h/|h|: the sign
        step of signSGD (Bernstein et al., ICML 2018) and of Rprop without its step-size
        adaptation (Riedmiller & Braun, 1993). ``eps`` = 1e-19, the square root of float32's
        smallest normal number: far below any hyper-gradient whose square float32 still holds
        (Adam's usual 1e-8 would scale a hyper-gradient of 1e-9 down by ten), and large enough
        that one whose square underflows moves less, not more. ``benchmarks/hyper_defaults.py``
        chose it over Adam, RMS-normalised SGD and other learning rates (docs: hyper-gradients,
        "the default for new families").

        Args:
            **overrides (Any): fields to change (``lr=...``, ``warmup=...``, a mode's own
                fields such as ``Forward``'s ``decay``).

        Returns:
            (HyperOptimizer): this class (``OneStep``, ``Forward``, ...) with the scale-free
                settings: ``optimizer="adam"``, ``betas=(0.0, 0.0)``, ``lr=3e-3``,
                ``lr_scale="box"``, ``max_move=1e-2``, ``eps=1e-19``.
        """
        return cls(**{**_SCALE_FREE, **overrides})

    def per_coefficient(self, field: str, learned: Sequence[str]) -> list[float]:
        """Resolve ``lr`` or ``momentum`` to one value per learned coefficient.

        Names a mapping leaves out get the field's default.

        Args:
            field: ``"lr"`` or ``"momentum"``.
            learned: the names of the learned coefficients, in the optimizer's order.

        Returns:
            One value per learned coefficient, in the order of ``learned``.

        Raises:
            ValueError: where the field's mapping names a coefficient that is not learned.
        """
        value = getattr(self, field)
        default = type(self).model_fields[field].default
        if not isinstance(value, Mapping):
            return [float(value)] * len(learned)
        unknown = sorted(set(value) - set(learned))
        if unknown:
            raise ValueError(
                f"hyper-optimizer {field} names {unknown}, which are not learned coefficients "
                f"(learned: {list(learned)})"
            )
        return [float(value.get(n, default)) for n in learned]

    # What the mode asks of the optimizer. Each mode overrides what it does; the fixed mode
    # (``hypergrad=None``) asks for nothing.
    #: whether ``step()`` keeps each parameter's tangents ∂θ/∂c of the learned coefficients
    keeps_tangents: ClassVar[bool] = False
    #: whether the tangents a step keeps are the one-step ∂θ_t/∂c that ``validation_hyperstep`` reads
    one_step_tangents: ClassVar[bool] = False
    #: whether the coefficients learn in ``unrolled_step`` alone, ``step()`` taking plain steps
    unrolls: ClassVar[bool] = False

    @property
    def learns_in_step(self) -> bool:
        """Whether ``step()`` takes a hyper-step on the training gradient it receives."""
        return False

    #: whether the hyper-gradient follows the coefficients through the optimizer state (a learned
    #: coefficient may then reach the update through the state alone: the contract probe accepts that)
    through_state: ClassVar[bool] = False

    @property
    def unroll_steps(self) -> int | None:
        """The number of training batches ``unrolled_step`` must get; None: any number."""
        return None

    @property
    def unroll_first_order(self) -> bool:
        """Whether ``unrolled_step`` detaches the inner gradients (drops the second-order terms)."""
        return False

    def forward_tangents(self, family, learned: Sequence[str], group: Mapping, dtype: torch.dtype,
                         params: Sequence[Tensor]) -> tuple[float, dict[str, tuple[str, ...]]] | None:
        """What ``step()`` carries through the state: (decay, state buffer -> its tangent keys).

        None where it carries nothing (every mode but [`Forward`][metaopt.Forward]).

        Args:
            family (metaopt.Family): the optimizer's family.
            learned: the learned coefficients' names.
            group: the first param group (its hyperparameters).
            dtype: the coefficients' dtype.
            params: every parameter (its local shard).
        """
        return None


#: ``HyperOptimizer.scale_free()``'s settings (its docstring says why)
_SCALE_FREE = {"optimizer": "adam", "betas": (0.0, 0.0), "lr": 3e-3, "lr_scale": "box", "max_move": 1e-2,
               "eps": 1e-19}


def _items(v: PerCoefficient):
    if isinstance(v, Mapping):
        return [(f" of {k!r}", x) for k, x in v.items()]
    return [("", v)]


class HyperState(NamedTuple):
    """Everything the hyper-optimizer keeps, as tensors on the coefficients' device.

    ``coefficients``, ``low`` and ``high`` hold every coefficient of the family's space in its
    order (fixed ones too, since the rule reads them); ``index`` picks the learned ones, in the
    optimizer's learned order, and ``lr``, ``momentum``, the ``buffers`` (``momentum_buffer``
    for SGD; ``exp_avg``, ``exp_avg_sq``, ``step`` for Adam) and ``last_h`` are per learned
    coefficient (with ``lr_scale="box"``, already multiplied by the box width). ``skipped`` counts
    the hyper-steps left out as non-finite.

    With coefficients per param group (``MetaOptimizer(..., coefficients="per_group")``)
    ``coefficients``, the buffers and ``last_h`` have a leading dimension, one row per group
    (Adam's ``step`` one per group too); ``low``, ``high``, ``lr`` and ``momentum`` are shared
    and broadcast over the rows. Every operation of a hyper-step works along the last dimension,
    so one step moves every group's row at once.
    """

    coefficients: Tensor
    low: Tensor
    high: Tensor
    index: Tensor
    lr: Tensor
    momentum: Tensor
    buffers: dict[str, Tensor]
    last_h: Tensor
    skipped: Tensor

    def learned(self) -> Tensor:
        """The learned coefficients' values, in the optimizer's learned order (last dimension)."""
        return self.coefficients.index_select(-1, self.index)

    def with_rows(self, rows: int) -> HyperState:
        """This shared record as ``rows`` rows (coefficients per group), each a copy of it."""
        def grow(t: Tensor) -> Tensor:
            return t.unsqueeze(0).expand(rows, *t.shape).clone()

        assert self.coefficients.dim() == 1, "already one row per group"
        return self._replace(coefficients=grow(self.coefficients), last_h=grow(self.last_h),
                             buffers={k: grow(v) for k, v in self.buffers.items()})

    def add_row(self, init: HyperState) -> HyperState:
        """One more row (a param group added), at ``init``'s (an unshared record at the start)."""
        def cat(t: Tensor, row: Tensor) -> Tensor:
            return torch.cat([t, row.unsqueeze(0).to(t)])

        return self._replace(
            coefficients=cat(self.coefficients, init.coefficients), last_h=cat(self.last_h, init.last_h),
            buffers={k: cat(v, init.buffers[k]) for k, v in self.buffers.items()},
        )

    def with_values(self, values: Mapping[int, float | Tensor], row: int | None = None) -> HyperState:
        """This record with coefficients set, ``values`` mapping a space index to a value, each projected into its box.

        ``row``: that param group's alone (coefficients per group); None sets every row.
        """
        coef = self.coefficients.clone()
        rows = coef if row is None else coef[row]
        for i, value in values.items():
            v = torch.as_tensor(value, dtype=coef.dtype, device=coef.device)
            rows[..., i] = torch.clamp(v, self.low[i], self.high[i])
        return self._replace(coefficients=coef)

    def saved(self) -> dict:
        """What a checkpoint keeps of the record, as copies.

        The rest follows from the family and the hyper-optimizer's settings: kept are the
        coefficients, the last hyper-gradient and the hyper-optimizer's buffers with the skip
        count.
        """
        kept = {**{k: v.clone() for k, v in self.buffers.items()}, "skipped": self.skipped.clone()}
        return {
            "coefficients": self.coefficients.clone(),
            "last_hypergrad": self.last_h.clone(),
            "hyper_state": kept if self.buffers else {},  # fixed coefficients: nothing to keep
        }

    def restored(self, saved: Mapping) -> HyperState:
        """This record with a checkpoint's ``saved`` values, in this record's dtypes and on its device.

        A checkpoint of another hyper-optimizer (other buffers) is refused with ``ValueError``.
        """
        kept = dict(saved["hyper_state"])
        expected = {*self.buffers, "skipped"} if self.buffers else set()
        if set(kept) != expected:
            raise ValueError(
                f"state dict holds hyper-optimizer buffers {sorted(kept)}, this optimizer's hyper-optimizer "
                f"keeps {sorted(expected)}"
            )

        def like(value: Tensor, ref: Tensor) -> Tensor:
            return value.to(device=ref.device, dtype=ref.dtype).clone()

        return self._replace(
            coefficients=like(saved["coefficients"], self.coefficients),
            last_h=like(saved["last_hypergrad"], self.last_h),
            buffers={k: like(kept[k], v) for k, v in self.buffers.items()},
            skipped=like(kept["skipped"], self.skipped) if kept else self.skipped,
        )


def init_state(
    config: HyperOptimizer | None, space: CoefficientSpace, learned: Sequence[str], dtype: torch.dtype, device
) -> HyperState:
    """The record at the start of a run: coefficients at their ``init``, zero buffers.

    ``config`` None (fixed coefficients) keeps no buffers.
    """
    init, low, high = space.tensors(dtype, device)
    k = len(learned)

    def vector(values=None):
        return torch.zeros(k, dtype=dtype, device=device) if values is None else torch.tensor(values, dtype=dtype, device=device)

    if config is None:
        buffers, lr, momentum = {}, vector(), vector()
    else:
        rates = config.per_coefficient("lr", learned)
        if config.lr_scale == "box":
            rates = [r * (space[n].high - space[n].low) for r, n in zip(rates, learned)]
        lr = vector(rates)
        momentum = vector(config.per_coefficient("momentum", learned))
        if config.optimizer == "sgd":
            buffers = {"momentum_buffer": vector()}
        else:
            buffers = {"exp_avg": vector(), "exp_avg_sq": vector(), "step": torch.zeros((), dtype=dtype, device=device)}
    index = torch.tensor([space.names.index(n) for n in learned], dtype=torch.long, device=device)
    return HyperState(
        coefficients=init, low=low, high=high, index=index, lr=lr, momentum=momentum, buffers=buffers,
        last_h=vector(), skipped=torch.zeros((), dtype=torch.int64, device=device),
    )


class HyperStep(NamedTuple):
    """The hyper-step a training step takes.

    It holds the settings, the hyper-gradient (None where no parameter kept tangents: nothing to
    learn from) and whether the warm-up is over. ``apply(record)`` is ``step``; ``as_data`` is
    the same step with the branches as 0-d bool tensors, so that a compiled step is one graph
    whatever the flags.
    """

    config: HyperOptimizer
    h: Tensor | None
    active: bool | Tensor
    record: bool | Tensor = True

    def apply(self, state: HyperState) -> HyperState:
        """This hyper-step on ``state`` (``step``); ``state`` itself where h is None."""
        if self.h is None:
            return state
        return step(self.config, state, self.h, active=self.active, record=self.record)

    def as_data(self, flags: Tensor, state: HyperState) -> HyperStep:
        """The same hyper-step with its branches as 0-d bool tensors (data, not control flow).

        ``flags``: ``tensor([False, True])`` on the coefficients' device (indexing it by a
        host bool makes no copy); ``state``: the record the step will apply to.
        """
        known = self.h is not None
        h = self.h if known else torch.zeros_like(state.last_h)
        return HyperStep(self.config, h, flags[int(known and self.active)], flags[int(known)])


def step(config: HyperOptimizer, state: HyperState, h: Tensor, *, active: bool | Tensor = True,
         record: bool | Tensor = True) -> HyperState:
    """One hyper-step on the hyper-gradient ``h`` (one entry per learned coefficient).

    It records ``h`` as ``last_h`` and, where ``active`` (past the warm-up), moves the learned
    coefficients and projects them into their boxes. Returns the new record; ``state`` is left
    as it was.

    ``record`` and ``active`` may be 0-d bool tensors instead of bools: the step is then data,
    not a branch (h kept where ``record``, the coefficients moved where ``active``).
    """
    coefficients, buffers, last_h, skipped = step_values(config, state, h, active=active, record=record)
    return HyperState(coefficients, state.low, state.high, state.index, state.lr, state.momentum, buffers, last_h, skipped)


def step_values(config: HyperOptimizer, state: HyperState, h: Tensor, *, active: bool | Tensor = True,
                record: bool | Tensor = True) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """``step``'s new (coefficients, buffers, last_h, skipped), without building a record.

    A record is what a compiled graph would have to guard on.
    """
    if isinstance(record, bool):
        last_h = h if record else state.last_h
    else:
        last_h = torch.where(record, h, state.last_h)
    if isinstance(active, bool) and not active:
        return state.coefficients, state.buffers, last_h, state.skipped
    learned = state.coefficients.index_select(-1, state.index)
    known = torch.isfinite(h)
    finite = known.all()  # one verdict for every row: a step moves all groups or none
    if not isinstance(active, bool):
        finite = finite & active  # still frozen: nothing moves, nothing is skipped
    h = torch.where(known, h, 0.0)
    if config.clip is not None:
        if config.clip_style == "value":
            h = h.clamp(-config.clip, config.clip)
        else:
            h = h * (config.clip / (h.abs() + 1e-6)).clamp(max=1.0)
    old = state.buffers
    # a finite but huge h can still overflow the buffers or the move: that step is skipped too
    if config.optimizer == "sgd":
        buf = state.momentum * old["momentum_buffer"] + h
        move = state.lr * buf  # not finite wherever buf is not (lr >= 0; 0·inf is NaN)
        finite = finite & torch.isfinite(move).all()
        buffers = {"momentum_buffer": torch.where(finite, buf, old["momentum_buffer"])}
    else:
        b1, b2 = config.betas
        s = old["step"] + 1
        t = s.unsqueeze(-1) if s.dim() else s  # one count per row, against the row's K entries
        m = b1 * old["exp_avg"] + (1 - b1) * h
        v = b2 * old["exp_avg_sq"] + (1 - b2) * h * h
        move = state.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + config.eps)
        finite = finite & torch.isfinite(move).all() & torch.isfinite(v).all()  # v = inf moves by 0
        buffers = {
            "exp_avg": torch.where(finite, m, old["exp_avg"]),
            "exp_avg_sq": torch.where(finite, v, old["exp_avg_sq"]),
            "step": torch.where(finite, s, old["step"]),
        }
    skipped = ~finite if isinstance(active, bool) else active & ~finite
    low, high = state.low.index_select(0, state.index), state.high.index_select(0, state.index)
    if config.max_move is not None:
        bound = config.max_move * (high - low)
        move = torch.clamp(move, -bound, bound)
    new = torch.where(finite, torch.clamp(learned - move, low, high), learned)
    return state.coefficients.index_copy(-1, state.index, new), buffers, last_h, state.skipped + skipped
