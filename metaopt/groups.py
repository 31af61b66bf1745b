"""Param groups as a [`MetaOptimizer`][metaopt.MetaOptimizer] takes them: hyperparameters validated by the family's model.

Also a group by index or name, and the dense-gradient check of a step. A tensor ``lr`` is kept as that tensor, as torch keeps it, so that a change made to it in place
(a scheduler's ``fill_``) holds from the next step on; its value is validated here, a host read
outside any step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .family import Family
from .types import Tensor


def hyperparameters(family: Family, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` validated by the family's model, a tensor ``lr`` kept as that tensor.

    Raises:
        ValueError: a tensor lr that is not one real floating-point value, or a value the
            family's model refuses (``pydantic.ValidationError``).
    """
    lr = values.get("lr")
    if not torch.is_tensor(lr):
        return family.hyperparameters.model_validate(values).model_dump()
    lr = tensor_lr(lr, (), "lr")
    validated = family.hyperparameters.model_validate({**values, "lr": lr.item()}).model_dump()
    return {**validated, "lr": lr}


def tensor_lr(lr: Tensor, params: Iterable[Any], where: str) -> Tensor:
    """A tensor lr as the paths read it: checked, and 0-d (a view of a one-element tensor).

    It must hold one real floating-point value (the rule multiplies by it: more would broadcast
    the update to another shape) and sit on the CPU or on the group's parameters' device.

    Raises:
        ValueError: it does not.
    """
    if lr.numel() != 1 or not lr.is_floating_point():
        raise ValueError(
            f"metaopt: {where} is a tensor of shape {tuple(lr.shape)}, {lr.dtype}; a tensor lr "
            "must hold one real floating-point value (torch.tensor(1e-3))"
        )
    if lr.device.type != "cpu":
        for p in params:
            p = p[1] if isinstance(p, tuple) else p  # (name, parameter) pairs too, as torch takes them
            if isinstance(p, Tensor) and p.device != lr.device:
                raise ValueError(
                    f"metaopt: {where} is a tensor on {lr.device} and a parameter is on "
                    f"{p.device}; keep a tensor lr on the CPU or on its parameters' device"
                )
    return lr if lr.dim() == 0 else lr.view(())


def validated_group(family: Family, defaults: Mapping[str, Any], param_group: Mapping[str, Any],
                    index: int) -> dict[str, Any]:
    """``param_group`` as ``add_param_group`` adds it as group ``index``: its family hyperparameters validated.

    Missing ones take the family's fields of ``defaults``; other keys (a group's ``"name"``, a
    scheduler's ``"initial_lr"``) pass through as torch allows them (and only the family's
    defaults fill in: torch's ``__setstate__`` adds a ``"differentiable"`` of its own).
    ``"params"`` becomes a list.

    Raises:
        ValueError: a parameter is complex, the family's model refuses a hyperparameter, or a
            tensor ``lr`` is not one floating-point value on the CPU or the parameters' device.
    """
    fields = family.hyperparameters.model_fields
    given = {k: v for k, v in param_group.items() if k in fields}
    known = {k: v for k, v in defaults.items() if k in fields}
    group = {**param_group, **hyperparameters(family, {**known, **given})}
    params = group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    if torch.is_tensor(group["lr"]):
        group["lr"] = tensor_lr(group["lr"], params, f"param group {index}'s lr")
    for pi, p in enumerate(params):
        if isinstance(p, Tensor) and p.is_complex():
            raise ValueError(
                f"metaopt: parameter {pi} of param group {index} (shape {tuple(p.shape)}, {p.dtype}) "
                "is complex; families are real rules — keep a real parameter (torch.view_as_real of "
                "your complex tensor) instead"
            )
    return {**group, "params": params}


def group_index(groups: Sequence[Mapping[str, Any]], group: int | str) -> int:
    """The index of a param group of ``groups`` given by index or by its ``"name"`` entry.

    Raises:
        IndexError: an index out of range.
        KeyError: a name no param group has.
    """
    if isinstance(group, int) and not isinstance(group, bool):
        if not -len(groups) <= group < len(groups):
            raise IndexError(f"param group {group} does not exist: the optimizer has {len(groups)}")
        return group % len(groups)
    names = [g.get("name") for g in groups]
    if group not in names:
        raise KeyError(f"no param group named {group!r}; the groups' names: {names}")
    return names.index(group)


def check_dense_gradients(groups: Sequence[Mapping[str, Any]], family: str) -> None:
    """Refuse a sparse gradient (``RuntimeError``, naming the parameter): families are dense rules."""
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    f"metaopt: parameter {pi} of param group {gi} (shape {tuple(p.shape)}) "
                    f"has a sparse gradient; {family} supports dense gradients only"
                )
