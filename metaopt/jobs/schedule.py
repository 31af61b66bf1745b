"""Learning-rate schedules of a job's contenders: constant, or warm-up then cosine or linear decay.

nanoGPT's schedule (``get_lr`` in its ``train.py``), with its decay over the run's ``steps``:
step ``t`` (0-based, the ``t``-th optimizer step) runs at ``lr × factor(t)`` where

* ``t < warmup``: ``factor = (t + 1) / (warmup + 1)`` (linear warm-up, never 0);
* else, with ``r = (t - warmup) / (steps - warmup)`` in [0, 1):
  cosine ``final + ½ (1 + cos π r) (1 - final)``, linear ``final + (1 - r)(1 - final)``,
  constant ``1``.

The factor multiplies each param group's lr through ``torch.optim.lr_scheduler.LambdaLR``,
stepped once per optimizer step, so that a family's learned coefficients, Schedule-Free's own
warm-up or Prodigy's step-size estimate see the scheduled lr as they would in a user's loop.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the final fraction of the peak lr a decay reaches when ``final`` is unset (nanoGPT's min_lr = lr/10)
DEFAULT_FINAL = 0.1
KINDS = ("constant", "cosine", "linear")


class ScheduleConfig(BaseModel):
    """A contender's learning-rate schedule (``schedule:``); the string ``cosine`` means ``{kind: cosine}``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    kind: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="constant: the lr throughout (after any warm-up); cosine or linear: decay to final × lr"
    )
    warmup: int = Field(0, ge=0, description="steps of linear warm-up from lr/(warmup+1) to lr; fewer than the job's steps")
    final: float | None = Field(
        None, ge=0.0, le=1.0, description=f"cosine, linear: the fraction of lr the decay ends at (default {DEFAULT_FINAL})"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.kind == "constant":
            if self.final is not None:
                raise ValueError(f"final applies to the decaying kinds (cosine, linear), not to {self.kind!r}")
        elif self.final is None:
            self.final = DEFAULT_FINAL  # filled in: a saved config keeps the value it ran with
        return self

    @property
    def is_constant(self) -> bool:
        """Whether every step runs at the peak lr (no warm-up, no decay): no scheduler at all."""
        return self.kind == "constant" and self.warmup == 0

    @property
    def decays(self) -> bool:
        """Whether the lr decays (cosine or linear)."""
        return self.kind != "constant"

    def factor(self, t: int, steps: int) -> float:
        """The multiple of the peak lr at step ``t`` (0-based) of a run of ``steps`` steps."""
        if t < self.warmup:
            return (t + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        final = DEFAULT_FINAL if self.final is None else self.final
        r = min((t - self.warmup) / (steps - self.warmup), 1.0)
        if self.kind == "cosine":
            return final + 0.5 * (1.0 + math.cos(math.pi * r)) * (1.0 - final)
        return final + (1.0 - r) * (1.0 - final)

    def describe(self) -> str:
        """A short label: ``constant``, ``cosine→0.1``, ``warmup 100 + linear→0``."""
        text = self.kind if not self.decays else f"{self.kind}→{self.final:g}"
        return f"warmup {self.warmup} + {text}" if self.warmup else text


def build_scheduler(opt: torch.optim.Optimizer, schedule: ScheduleConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The ``LambdaLR`` that applies ``schedule`` to every param group of ``opt``; None where it is constant.

    A constant schedule without warm-up builds none, so that such a run is what it was before
    schedules existed, optimizer state included.
    """
    if schedule.is_constant:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule.factor(t, steps))
