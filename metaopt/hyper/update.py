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

A hyper-gradient with a non-finite entry is skipped whole (state and coefficients unchanged) and
counted in ``state["skipped"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, field_validator

from ..family import Betas

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
    (lr 0.05 drove β3 to its bound). On the ``metaopt run`` default job it does not make MADA
    beat Adam (README, "The default job's result").
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


    def per_coefficient(self, field: str, learned: Sequence[str]) -> list[float]:
        """Resolve ``lr`` or ``momentum`` to one value per learned coefficient; names a mapping
        leaves out get the field's default."""
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


def _items(v: PerCoefficient):
    if isinstance(v, Mapping):
        return [(f" of {k!r}", x) for k, x in v.items()]
    return [("", v)]


def init_state(config: HyperOptimizer, k: int, dtype: torch.dtype, device) -> dict[str, Tensor]:
    z = lambda: torch.zeros(k, dtype=dtype, device=device)  # noqa: E731
    state = {"skipped": torch.zeros((), dtype=torch.int64, device=device)}
    if config.optimizer == "sgd":
        state["momentum_buffer"] = z()
    else:
        state.update(exp_avg=z(), exp_avg_sq=z(), step=torch.zeros((), dtype=dtype, device=device))
    return state


def apply(
    config: HyperOptimizer,
    h: Tensor,
    learned: Tensor,
    state: dict[str, Tensor],
    lr: Tensor,
    momentum: Tensor,
    low: Tensor,
    high: Tensor,
    active: Tensor | None = None,
) -> Tensor:
    """One hyper-step. Returns the new learned coefficients; updates ``state`` in place.

    ``active`` (a 0-d bool tensor) turns the whole step into a no-op where false, so that a
    compiled step can hold it as data rather than as a branch."""
    finite = torch.isfinite(h).all()
    if active is not None:
        skipped = active & ~finite
        finite = finite & active
    else:
        skipped = ~finite
    h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
    if config.clip is not None:
        if config.clip_style == "value":
            h = h.clamp(-config.clip, config.clip)
        else:
            h = h * (config.clip / (h.abs() + 1e-6)).clamp(max=1.0)
    if config.optimizer == "sgd":
        buf = momentum * state["momentum_buffer"] + h
        step = lr * buf
        # a finite but huge h can still overflow the buffer: skip that step too
        overflow = ~torch.isfinite(step).all() | ~torch.isfinite(buf).all()
        skipped, finite = skipped | (finite & overflow), finite & ~overflow
        state["momentum_buffer"].copy_(torch.where(finite, buf, state["momentum_buffer"]))
    else:
        b1, b2 = config.betas
        s = state["step"] + 1
        m = b1 * state["exp_avg"] + (1 - b1) * h
        v = b2 * state["exp_avg_sq"] + (1 - b2) * h * h
        step = lr * (m / (1 - b1**s)) / ((v / (1 - b2**s)).sqrt() + config.eps)
        overflow = ~torch.isfinite(step).all() | ~torch.isfinite(v).all()
        skipped, finite = skipped | (finite & overflow), finite & ~overflow
        state["exp_avg"].copy_(torch.where(finite, m, state["exp_avg"]))
        state["exp_avg_sq"].copy_(torch.where(finite, v, state["exp_avg_sq"]))
        state["step"].copy_(torch.where(finite, s, state["step"]))
    state["skipped"].add_(skipped.to(state["skipped"].dtype))
    new = torch.clamp(learned - step, low, high)
    return torch.where(finite, new, learned)
