"""Coefficient spaces: the named scalars a family exposes, each with a box and a learned flag."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, RootModel, model_validator


class Coefficient(BaseModel):
    """One scalar coefficient: its initial value, its closed box ``[low, high]`` and whether
    hyper-gradient descent moves it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init: float
    low: float
    high: float
    learned: bool = True

    @model_validator(mode="after")
    def _check_box(self) -> Coefficient:
        for name in ("init", "low", "high"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.low > self.high:
            raise ValueError(f"box is empty: low={self.low} > high={self.high}")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"init={self.init} lies outside its box [{self.low}, {self.high}]")
        return self


class CoefficientSpace(RootModel[dict[str, Coefficient]]):
    """An ordered set of named coefficients.

    ``CoefficientSpace(beta3=Coefficient(init=0.0, low=0.0, high=0.99), ...)``
    """

    model_config = ConfigDict(frozen=True)

    def __init__(self, root: Mapping[str, Any] | None = None, /, **coefficients: Any) -> None:
        super().__init__(dict(root) if root is not None else coefficients)

    @model_validator(mode="after")
    def _check_names(self) -> CoefficientSpace:
        for name in self.root:
            if not name.isidentifier():
                raise ValueError(f"coefficient name {name!r} is not an identifier")
        return self

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.root)

    def __getitem__(self, name: str) -> Coefficient:
        return self.root[name]

    def __len__(self) -> int:
        return len(self.root)

    def __contains__(self, name: object) -> bool:
        return name in self.root

    @property
    def names(self) -> tuple[str, ...]:
        """Every coefficient's name, in declaration order."""
        return tuple(self.root)

    @property
    def learned(self) -> tuple[str, ...]:
        """The names of the learned coefficients, in declaration order."""
        return tuple(n for n, c in self.root.items() if c.learned)

    def replace(self, **overrides: float | Mapping[str, Any] | Coefficient) -> CoefficientSpace:
        """A new space with some coefficients changed.

        A number sets ``init``; a mapping sets the named fields (``{"learned": False}``); a
        [`Coefficient`][metaopt.Coefficient] replaces the whole entry. An unknown name or a value
        that breaks a box raises `pydantic.ValidationError` naming the coefficient.
        """
        unknown = [n for n in overrides if n not in self.root]
        merged: dict[str, Any] = {n: c.model_dump() for n, c in self.root.items()}
        for name, value in overrides.items():
            if name not in self.root:
                continue
            if isinstance(value, Coefficient):
                merged[name] = value.model_dump()
            elif isinstance(value, Mapping):
                merged[name] = {**merged[name], **value}
            else:
                merged[name] = {**merged[name], "init": value}
        if unknown:
            # Route through pydantic so that the error type is the same as for any other bad value.
            _unknown_names_model(self.names).model_validate(dict(overrides))
        return CoefficientSpace.model_validate(merged)

    def tensors(self, dtype: torch.dtype, device: torch.device | str | None = None):
        """(init, low, high) as 1-d tensors in declaration order."""
        cs = list(self.root.values())
        init = torch.tensor([c.init for c in cs], dtype=dtype, device=device)
        low = torch.tensor([c.low for c in cs], dtype=dtype, device=device)
        high = torch.tensor([c.high for c in cs], dtype=dtype, device=device)
        return init, low, high


def _unknown_names_model(names: tuple[str, ...]) -> type[BaseModel]:
    from pydantic import create_model

    return create_model(  # type: ignore[call-overload]
        "CoefficientOverrides",
        __config__=ConfigDict(extra="forbid"),
        **{n: (Any, None) for n in names},
    )
