"""Contenders that are not metaopt families: any ``torch.optim.Optimizer`` subclass by name.

A config's ``kind: module:Class`` (or ``path/file.py:Class``) names a metaopt family or a
torch optimizer; which one is decided by what the object is (`optimizer_class`). The short
names ``adam`` and ``adamw`` stay torch's Adam and AdamW. This module finds the class, checks an
entry's ``hyperparameters`` against its constructor (`check_hyperparameters`) and builds it
(`build_torch_optimizer`), and tells optimizers with a train and an eval mode (Schedule-Free)
by their methods (`has_modes`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from metaopt.family import Family
from metaopt.registry import FamilySpecError, import_spec_module, parse_family_spec

#: the short names of torch's optimizers a job has always known
TORCH_KINDS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

#: the optional extra of metaopt that installs the optimizer packages the docs use
EXTRA = "contenders"
#: module -> the package ``pip install`` takes, for the packages the ``contenders`` extra brings
PIP_NAMES = {"schedulefree": "schedulefree", "prodigyopt": "prodigyopt"}

#: constructor parameters a config does not set through ``hyperparameters``
RESERVED = {"params": "the job passes the model's parameters", "lr": "set it with the entry's own `lr:` field"}


class ContenderError(ValueError):
    """A ``kind`` or ``hyperparameters`` that builds no optimizer; the message names the cause and the fix."""


def optimizer_class(kind: str) -> type[torch.optim.Optimizer] | None:
    """The ``torch.optim.Optimizer`` subclass that ``kind`` names, or None where it names none.

    ``adam``/``adamw`` are torch's Adam and AdamW. A ``package.module:Class`` or
    ``path/to/file.py:Class`` is imported and is an optimizer where the object is a
    ``torch.optim.Optimizer`` subclass. None is returned for everything the family loader
    (`metaopt.registry.load_family_spec`) handles and reports: a registered name, a
    `metaopt.Family` subclass, a function, a module or file that fails to import.

    Args:
        kind: the entry's ``kind``.

    Returns:
        The class, or None.

    Raises:
        ContenderError: a module that cannot be found (naming the package to install), a class
            the module does not have where it defines optimizers (with the closest one), or a
            class that is neither a `metaopt.Family` nor a ``torch.optim.Optimizer`` subclass.
    """
    if kind in TORCH_KINDS:
        return TORCH_KINDS[kind]
    try:
        origin, where, attr = parse_family_spec(kind)
    except FamilySpecError:
        return None
    if origin == "entry point":
        return None
    if origin == "module":
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):  # a parent package that is missing or fails to import
            found = None
        if found is None:
            raise ContenderError(missing_module(where))
    try:
        module = import_spec_module(kind)
    except FamilySpecError:
        return None  # raises on import: the family loader reports it, with the line
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            optimizers = optimizer_classes(module)
            if not optimizers:
                return None  # the family loader lists the families the module defines
            close = difflib.get_close_matches(attr, optimizers, n=1)
            raise ContenderError(
                f"{where} has no {attr!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                + f" Its torch.optim.Optimizer subclasses: {', '.join(optimizers)}"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        return None
    if issubclass(obj, torch.optim.Optimizer):
        return obj
    if not issubclass(obj, Family):
        raise ContenderError(
            f"{attr} is a class but not a metaopt.Family subclass, nor a torch.optim.Optimizer subclass; "
            "`kind:` names an optimizer (a torch.optim.Optimizer subclass) or a family (a metaopt.Family subclass)"
        )
    return None


def needs_closure(cls: type) -> bool:
    """Whether ``cls.step`` requires a closure (LBFGS, Schedule-Free's ``...Closure`` variants).

    The job calls ``opt.step()`` after its own backward pass, without one.
    """
    try:
        p = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError, AttributeError):
        return False
    return p is not None and p.default is p.empty and p.kind is not p.VAR_KEYWORD


def missing_module(module: str) -> str:
    """The message for a ``kind`` whose module cannot be imported: the package to install."""
    top = module.split(".")[0]
    if top in PIP_NAMES:
        how = f"pip install {PIP_NAMES[top]} (or pip install 'metaopt[{EXTRA}]', which brings {', '.join(PIP_NAMES)})"
    else:
        how = f"install the package that provides it, e.g. pip install {top} (its name on PyPI may differ)"
    return f"no module named {module!r} can be imported; {how}, or check the spelling"


def optimizer_classes(module: Any) -> list[str]:
    """Names of the public ``torch.optim.Optimizer`` subclasses a module holds, sorted."""
    return sorted(
        n for n, v in vars(module).items()
        if not n.startswith("_") and isinstance(v, type) and issubclass(v, torch.optim.Optimizer)
        and v is not torch.optim.Optimizer
    )


def constructor_parameters(cls: type) -> tuple[list[str], bool]:
    """The keyword parameters of ``cls``'s constructor besides ``self``, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a C constructor without a signature: nothing to check against
        return [], True
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def takes(cls: type, name: str) -> bool:
    """Whether ``cls``'s constructor has a parameter ``name``."""
    names, _ = constructor_parameters(cls)
    return name in names


def hyperparameters_for(cls: type, hyperparameters: dict[str, Any], lr: float, betas: Iterable[float]) -> dict[str, Any]:
    """The keyword arguments ``cls`` is built with: ``lr``, the job's ``betas`` where it takes them, ``hyperparameters``.

    The entry's own ``betas`` (in ``hyperparameters``) win over the job's. YAML has no tuples:
    a list given for ``betas`` becomes a tuple.
    """
    kw: dict[str, Any] = {"lr": lr}
    if takes(cls, "betas"):
        kw["betas"] = tuple(betas)
    kw.update(hyperparameters)
    if isinstance(kw.get("betas"), list):
        kw["betas"] = tuple(kw["betas"])
    return kw


def check_names(cls: type, hyperparameters: dict[str, Any]) -> None:
    """Refuse settings ``cls``'s constructor does not take, and ``params``/``lr``.

    Raises:
        ContenderError: with ``.field``, the offending key; the message lists the accepted names.
    """
    names, any_name = constructor_parameters(cls)
    for key in hyperparameters:
        if key in RESERVED:
            raise _field_error(key, f"{key} is not set here: {RESERVED[key]}")
        if key not in names and not any_name:
            accepted = [n for n in names if n not in RESERVED]
            close = difflib.get_close_matches(key, accepted, n=1)
            raise _field_error(
                key, f"not a parameter of {_qualname(cls)}" + (f"; did you mean {close[0]!r}?" if close else "")
                + f" It takes: {', '.join(accepted)}"
            )


def check_hyperparameters(cls: type, hyperparameters: dict[str, Any], lr: float, betas: Iterable[float]) -> None:
    """Refuse settings ``cls`` does not take (`check_names`), then build it once on a dummy parameter.

    Args:
        cls: the optimizer class.
        hyperparameters: the entry's ``hyperparameters``.
        lr: the learning rate it runs at.
        betas: the job's betas.

    Raises:
        ContenderError: with ``.field``, the offending key (None: the constructor's message is
            about the settings together): a name the constructor does not take (the message
            lists those it does), ``params``/``lr``, or a value the constructor refuses (its
            message).
    """
    check_names(cls, hyperparameters)
    try:
        cls([torch.zeros(1, requires_grad=True)], **hyperparameters_for(cls, hyperparameters, lr, betas))
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises for a value it refuses
        raise _field_error(None, f"{_qualname(cls)} refuses these settings: {type(e).__name__}: {e}") from None


def build_torch_optimizer(cls: type, params: Any, hyperparameters: dict[str, Any], lr: float,
                          betas: Iterable[float]) -> torch.optim.Optimizer:
    """``cls(params, lr=lr, [betas=betas,] **hyperparameters)``."""
    return cls(params, **hyperparameters_for(cls, hyperparameters, lr, betas))


def has_modes(opt: torch.optim.Optimizer) -> bool:
    """Whether an optimizer has a train and an eval mode (``opt.train()``, ``opt.eval()``), as Schedule-Free's.

    Such an optimizer keeps the parameters at one point while training and moves them to
    another to be evaluated; the job switches it around every evaluation.
    """
    return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))


def has_modes_class(cls: type) -> bool:
    """`has_modes` of the optimizers ``cls`` builds, read off the class."""
    return callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))


def default_argument(cls: type, name: str) -> Any:
    """The default of ``cls``'s constructor parameter ``name`` (None where it has none)."""
    try:
        p = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is p.empty else p.default


def _field_error(field: str | None, message: str) -> ContenderError:
    err = ContenderError(message)
    err.field = field  # type: ignore[attr-defined]
    return err


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
