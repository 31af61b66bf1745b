"""Loading a job's config: YAML/TOML files, the packaged configs, ``--quick`` and ``--set``.

A config file is read into a raw mapping (`read_config_file`: a family file it names made
absolute against the file's directory), sized down to the quick job where asked
(`quick_sized`), changed by ``--set KEY=VALUE`` overrides (`parse_assignment`, `set_path`), and
validated against the schema (`build_config`, ``metaopt.jobs.schema``).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from metaopt.jobs.schema import JobConfig, default_label, default_optimizers, scaled_warmup
from metaopt.registry import absolute_file_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package, before Python 3.11
    import tomli as tomllib

PACKAGED_CONFIGS = ("default", "quick")


class ConfigFileError(Exception):
    """A config file that cannot be read (missing, bad syntax, wrong extension)."""


def packaged_config_path(name: str) -> Path:
    """The path of a config shipped in the package (``default``, ``quick``)."""
    return Path(str(resources.files("metaopt.jobs").joinpath(f"{name}.yaml")))


def resolve_config_path(spec: str) -> Path:
    """A path, or the name of a packaged config ('default', 'quick')."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if spec in PACKAGED_CONFIGS:
        return packaged_config_path(spec)
    raise ConfigFileError(f"no such config file: {spec} (packaged configs: {', '.join(PACKAGED_CONFIGS)})")


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML (.yaml/.yml) or TOML (.toml) file.

    A family named by a relative file path (``kind: my_family.py:MyFamily``) is made absolute
    here, against the file's directory: a config names its files relative to itself, wherever
    the command runs.
    """
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigFileError(f"cannot read {path}: {e}") from None
    try:
        if suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        elif suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigFileError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigFileError(f"{path}: cannot parse: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping of config fields, got {type(raw).__name__}")
    optimizers = raw.get("optimizers")
    if isinstance(optimizers, list):
        base = path.expanduser().absolute().parent
        for entry in optimizers:
            if isinstance(entry, dict) and isinstance(entry.get("kind"), str):
                entry["kind"] = absolute_file_spec(entry["kind"], base)
    return raw


#: the fields `--quick` takes from the packaged quick config: the job's size, not its contenders
QUICK_SIZE = ("model", "steps", "batch_size", "eval_interval", "eval_batches", "log_interval", "checkpoint_every", "seeds")


def quick_sized(raw: Mapping[str, Any], stem: str) -> dict[str, Any]:
    """A config at the quick job's size (``metaopt run CONFIG --quick``).

    The fields of `QUICK_SIZE` come from the packaged ``quick.yaml`` (its ``model`` fields
    replace the config's, which keeps the others, e.g. ``dropout``); everything else (optimizers,
    lr, betas, data, device, ...) stays the config's, and the name gets ``-quick``. A contender's
    schedule keeps its shape: its ``warmup`` is scaled by quick steps / the config's steps
    (rounded down), so that the warm-up takes the same share of the shorter run.

    Args:
        raw: the config's raw mapping.
        stem: the name of a config that sets none (its file's stem).

    Returns:
        A new raw mapping.
    """
    quick = read_config_file(packaged_config_path("quick"))
    out = dict(raw)
    for key in QUICK_SIZE:
        if key == "model" and isinstance(raw.get("model"), dict):
            out["model"] = {**raw["model"], **quick["model"]}
        else:
            out[key] = copy.deepcopy(quick[key])
    out["name"] = f"{raw.get('name') or stem}-quick"
    steps = raw.get("steps", JobConfig.model_fields["steps"].default)
    if isinstance(out.get("optimizers"), list) and isinstance(steps, int) and steps > 0:
        out["optimizers"] = [scaled_warmup(o, quick["steps"], steps) for o in out["optimizers"]]
    return out


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = "a.b.c"``.

    A list is indexed by position or by an optimizer's name. A missing top-level field is
    filled from the default job (so ``optimizers.mada.lr`` works on a config that does not list
    its optimizers: it gets the default job's list, then sets its mada's lr); a missing mapping
    below the top level starts empty, so that a contender never takes another contender's
    fields (``optimizers.x.options.lion=true`` on an ``x`` without options sets that one
    option, not the options of the default job's optimizer at x's position).

    A sweep's name (an entry with ``points:`` or ``grid:``) reaches the same contenders in a
    run directory's ``config.yaml``, where the sweep is expanded: ``optimizers.grid.lr=0.01``
    sets the lr of every contender it expanded into.
    """
    parts = _split_outside_brackets(dotted, ".")
    if not all(parts):
        raise ConfigFileError(f"--set {dotted}=...: empty key part")
    _set(raw, raw, parts, 0, dotted, value)


def _set(raw: dict[str, Any], node: Any, parts: list[str], i: int, dotted: str, value: Any) -> None:
    """`set_path` from ``parts[i]`` on, ``node`` being where ``parts[:i]`` led."""
    for i in range(i, len(parts)):
        part = parts[i]
        last = i == len(parts) - 1
        if isinstance(node, list):
            members = _sweep_members(node, part)
            if members:  # a sweep expanded in config.yaml: every contender it became
                if last:
                    raise ConfigFileError(f"--set {dotted}: {part!r} was expanded into {len(members)} contenders "
                                          "here; set a field of them (optimizers.<name>.<field>)")
                for item in members:
                    _set(raw, item, parts, i + 1, dotted, copy.deepcopy(value))
                return
            index = _list_index(node, part, dotted)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigFileError(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
            return
        if node.get(part) is None:
            fill = None if node is not raw else (
                default_optimizers(raw.get("steps")) if part == "optimizers" else JobConfig().dump().get(part))
            node[part] = copy.deepcopy(fill) if isinstance(fill, (dict, list)) else {}
        node = node[part]


def _entry_label(item: dict[str, Any]) -> str | None:
    kind = item.get("kind", "adam")
    return item.get("name") or (default_label(kind, item.get("point")) if isinstance(kind, str) else None)


def _sweep_members(items: list, part: str) -> list[dict[str, Any]]:
    """The entries expanded from the sweep named ``part`` (none where an entry itself is named so)."""
    if part.lstrip("-").isdigit() or any(isinstance(it, dict) and part in (_entry_label(it), it.get("name") or it.get("kind"))
                                         for it in items):
        return []
    return [it for it in items if isinstance(it, dict) and isinstance(it.get("sweep"), dict) and it["sweep"].get("entry") == part]


def _list_index(items: list, part: str, dotted: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigFileError(f"--set {dotted}: index {index} out of range (the list has {len(items)} entries)")
        return index % len(items)
    for j, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        if part in (_entry_label(item), item.get("name") or item.get("kind")):
            return j
    names = [item.get("name") or item.get("kind") for item in items if isinstance(item, dict)]
    for item in items:  # a contender of a sweep not yet expanded: its fields are the sweep's
        label = _entry_label(item) if isinstance(item, dict) else None
        if label and (item.get("points") is not None or item.get("grid") is not None) and part.startswith((f"{label}@", f"{label}[")):
            raise ConfigFileError(
                f"--set {dotted}: {part!r} is one of the contenders the sweep {label!r} expands into; its fields are "
                f"the sweep's (optimizers.{label}.<field> sets them for every contender of it), or write it out as "
                "an entry of its own"
            )
    raise ConfigFileError(f"--set {dotted}: no entry named {part!r} (the entries: {names})")


def _split_outside_brackets(text: str, sep: str, limit: int = -1) -> list[str]:
    """``text`` split at ``sep`` where it is not inside ``[...]``: a grid contender's label keeps its ``=`` and ``.``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0 and (limit < 0 or len(parts) < limit):
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"model.n_layer=2"`` → ``("model.n_layer", 2)``; the value is read as YAML.

    The key may name a grid's contender: ``optimizers.grid[beta3=0.5,rho=0.1].lr=0.01``.
    """
    key_value = _split_outside_brackets(text, "=", limit=1)
    if len(key_value) < 2:
        raise ConfigFileError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = key_value
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"--set {text}: cannot parse the value: {e}") from None


def build_config(raw: Mapping[str, Any], *, name: str | None = None) -> JobConfig:
    """Validate ``raw`` (raises :class:`pydantic.ValidationError`); ``name`` fills an unset name."""
    cfg = JobConfig.model_validate(dict(raw))
    if cfg.name is None:
        cfg.name = name or "job"
    return cfg
