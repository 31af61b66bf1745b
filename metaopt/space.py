"""Coefficient spaces: the named scalars a family exposes, each with a box and a learned flag."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, RootModel, model_validator


class Coefficient(BaseModel):
    """One scalar coefficient: its initial value, its closed box and whether it is learned.

    A frozen pydantic model: its fields are its constructor's keyword arguments.

    Keyword Args:
        init (float): the initial value, inside the box.
        low (float): the lower end of the closed box ``[low, high]``.
        high (float): the upper end of the box.
        learned (bool): whether hyper-gradient descent moves it (default True); False keeps it
            fixed at ``init``.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) where a bound or ``init`` is not finite,
            the box is empty (``low > high``) or ``init`` lies outside it, or a field is
            unknown.
    """

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

    Args:
        root: the coefficients as one mapping, name -> [`Coefficient`][metaopt.Coefficient]
            (or the mapping of its fields), in order; positional only. Without it the keyword
            arguments are the coefficients.
        **coefficients: the coefficients by name, in order, when ``root`` is not given.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) where a name is not a Python identifier
            or an entry is not a valid [`Coefficient`][metaopt.Coefficient].
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
        that breaks a box raises ``pydantic.ValidationError`` naming the coefficient.

        Args:
            **overrides: coefficient name -> a number (its new ``init``), a mapping of the
                fields to change, or a whole [`Coefficient`][metaopt.Coefficient].

        Returns:
            The new space; this one is left as it was (it is frozen).

        Raises:
            pydantic.ValidationError: (a ``ValueError``) for a name the space does not have,
                or a value that breaks its coefficient's box.
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
        """(init, low, high) as 1-d tensors in declaration order.

        Args:
            dtype: the tensors' dtype.
            device: the tensors' device (default: torch's default device).

        Returns:
            (tuple[torch.Tensor, torch.Tensor, torch.Tensor]): ``(init, low, high)``, one entry per
                coefficient, in declaration order.
        """
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
