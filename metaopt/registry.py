"""Family discovery through the entry-point group ``metaopt.families``.

A package registers a family with, in its ``pyproject.toml``::

    [project.entry-points."metaopt.families"]
    myfamily = "mypackage.module:MyFamily"

where ``MyFamily(**options)`` returns a `metaopt.Family`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .family import Family

GROUP = "metaopt.families"


def registered() -> dict[str, EntryPoint]:
    """Registered family entry points, name -> entry point, sorted by name; nothing is imported."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    return {name: found[name] for name in sorted(found)}


def families() -> dict[str, Callable[..., Family]]:
    """Registered family factories, name -> callable, sorted by name.

    The families registered under the entry-point group ``metaopt.families``, each imported. A
    plugin that fails to import is left out with a warning naming it, so that one broken package
    hides no other.

    Returns:
        Family name -> its factory (a [`Family`][metaopt.Family] subclass or any callable that
            returns a family), sorted by name.

    Warns:
        UserWarning: for each plugin that fails to import, naming it and the error.
    """
    out = {}
    for name, ep in registered().items():
        try:
            out[name] = ep.load()
        except Exception as err:  # noqa: BLE001 - any import error of a third-party plugin
            warnings.warn(f"metaopt family {name!r} ({ep.value}) failed to load: {type(err).__name__}: {err}")
    return out


def load_family(name: str) -> Callable[..., Family]:
    """The factory of the registered family ``name`` (import errors propagate).

    Args:
        name: the family's entry-point name.

    Returns:
        The callable the entry point names.

    Raises:
        KeyError: where no family is registered under ``name`` (the message lists those that are).
        ImportError: where the family's module fails to import.
    """
    found = registered()
    if name not in found:
        raise KeyError(f"no metaopt family named {name!r}; registered: {list(found)} (entry-point group {GROUP!r})")
    return found[name].load()


def get_family(name: str, **options: Any) -> Family:
    """Build the registered family ``name`` with ``options``.

    Args:
        name: the family's entry-point name (``"mada"``, ``"sgd_hd"``, ``"adam_hd"``, ``"padam"``
            or a plugin's).
        **options: the family's options, passed to its factory (``MADA(lion=True)`` is
            ``get_family("mada", lion=True)``).

    Returns:
        The family, built.

    Raises:
        KeyError: where no family is registered under ``name`` (the message lists those that are).
        ImportError: where the family's module fails to import (import errors propagate).
        pydantic.ValidationError: (a ``ValueError``) where a shipped family refuses an option;
            a plugin's factory raises what it raises.
    """
    return load_family(name)(**options)
