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
    """Registered family factories, name -> callable, sorted by name. A plugin that fails to
    import is left out with a warning naming it, so that one broken package hides no other."""
    out = {}
    for name, ep in registered().items():
        try:
            out[name] = ep.load()
        except Exception as err:  # noqa: BLE001 - any import error of a third-party plugin
            warnings.warn(f"metaopt family {name!r} ({ep.value}) failed to load: {type(err).__name__}: {err}")
    return out


def load_family(name: str) -> Callable[..., Family]:
    """The factory of the registered family ``name`` (import errors propagate)."""
    found = registered()
    if name not in found:
        raise KeyError(f"no metaopt family named {name!r}; registered: {list(found)} (entry-point group {GROUP!r})")
    return found[name].load()


def get_family(name: str, **options: Any) -> Family:
    """Build the registered family ``name`` with ``options``."""
    return load_family(name)(**options)
