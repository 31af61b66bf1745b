"""Family discovery through the entry-point group ``metaopt.families``.

A package registers a family with, in its ``pyproject.toml``::

    [project.entry-points."metaopt.families"]
    myfamily = "mypackage.module:MyFamily"

where ``MyFamily(**options)`` returns a :class:`metaopt.Family`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .family import Family

GROUP = "metaopt.families"


def families() -> dict[str, Callable[..., Family]]:
    """Registered family factories, name -> callable, sorted by name."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    return {name: found[name].load() for name in sorted(found)}


def get_family(name: str, **options: Any) -> Family:
    """Build the registered family ``name`` with ``options``."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in found:
        raise KeyError(
            f"no metaopt family named {name!r}; registered: {sorted(found)} "
            f"(entry-point group {GROUP!r})"
        )
    return found[name].load()(**options)
