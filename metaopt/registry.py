"""Finding families: by registered name, by module, or by file.

A package registers a family with, in its ``pyproject.toml``::

    [project.entry-points."metaopt.families"]
    myfamily = "mypackage.module:MyFamily"

where ``MyFamily(**options)`` returns a `metaopt.Family`. Without registering anything, a family
is also named by where it lives: ``mypackage.module:MyFamily`` (an importable module) or
``path/to/my_family.py:MyFamily`` (a file); `load_family_spec` resolves all three.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from .family import Family

GROUP = "metaopt.families"

#: how a family spec names a family, for messages
SPEC_FORMS = "a registered name, `package.module:Class` or `path/to/file.py:Class`"


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


# -- family specs: a registered name, package.module:Class, path/to/file.py:Class --------------


class FamilySpecError(ValueError):
    """A family spec that leads to no family; the message names the spec, the cause and the fix."""


@dataclass(frozen=True)
class FamilySource:
    """Where a family spec led: the factory and the code that defines it.

    Attributes:
        spec: the spec as given.
        origin: ``"entry point"`` (a registered name), ``"module"`` (``package.module:Class``)
            or ``"file"`` (``path/to/file.py:Class``).
        target: the spec resolved: the registered name, ``package.module:Class``, or the file's
            absolute path and the class, ``/abs/path/file.py:Class``. It names the same family
            from any working directory.
        factory: the class (or function) that builds the family from its options.
        path: the file that defines the factory (None where it has none, e.g. a built-in).
        sha256: the hex SHA-256 of that file's bytes when it was loaded (for a ``file`` spec:
            of exactly the bytes that were run).
        entry_point: the entry point's value (``module:attr``) for a registered name, else None.
    """

    spec: str
    origin: Literal["entry point", "module", "file"]
    target: str
    factory: Callable[..., Family]
    path: Path | None = None
    sha256: str | None = None
    entry_point: str | None = None

    def build(self, **options: Any) -> Family:
        """The family, built with ``options``.

        Args:
            **options: the family's options, passed to its factory.

        Returns:
            The family.

        Raises:
            FamilySpecError: where the factory returns something that is not a `metaopt.Family`.
            pydantic.ValidationError, TypeError, ValueError: what the factory raises for a bad
                option.
        """
        family = self.factory(**options)
        if not isinstance(family, Family):
            raise FamilySpecError(
                f"family {self.spec!r}: {_qualname(self.factory)}(...) returned {type(family).__name__} "
                f"{_short(family)}, not a metaopt.Family; make it return an instance of a metaopt.Family subclass"
            )
        return family

    def accepts(self, option: str, family: Family | None = None) -> bool:
        """Whether the family takes an option named ``option``.

        A field of its pydantic options model (``family.options``), or a named parameter of its
        constructor (a plain ``__init__``).

        Args:
            option: the option's name (e.g. ``"betas"``).
            family: the family built from this source, whose options model is read; None builds
                none and reads the constructor only.

        Returns:
            True where the option exists.
        """
        options = getattr(family, "options", None)
        fields = getattr(type(options), "model_fields", None)
        if isinstance(fields, dict) and option in fields:
            return True
        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):  # a builtin or C callable without a signature
            return False
        p = params.get(option)
        return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)

    def describe(self) -> str:
        """One line: where the family comes from (and its file's SHA-256)."""
        if self.origin == "entry point":
            text = f"entry point {self.target} = {self.entry_point}"
        elif self.origin == "module":
            text = f"module {self.target}"
        else:
            text = f"file {self.target}"
        if self.path is not None and self.origin != "file":
            text += f" ({self.path})"
        if self.sha256:
            text += f", sha256 {self.sha256[:16]}"
        return text

    def record(self) -> dict[str, Any]:
        """Plain data (JSON-safe): spec, origin, target, entry point, file and its SHA-256."""
        return {
            "spec": self.spec, "origin": self.origin, "target": self.target, "entry_point": self.entry_point,
            "path": None if self.path is None else str(self.path), "sha256": self.sha256,
        }


def parse_family_spec(spec: str) -> tuple[Literal["entry point", "module", "file"], str, str]:
    """``(origin, where, attribute)`` of a family spec, without importing anything.

    ``"mada"`` → ``("entry point", "mada", "")``; ``"pkg.mod:Cls"`` → ``("module", "pkg.mod",
    "Cls")``; ``"dir/f.py:Cls"`` → ``("file", "dir/f.py", "Cls")``. The last ``:`` splits, so a
    Windows drive letter stays with the path. A part before ``:`` that ends in ``.py`` or holds a
    path separator is a file.

    Args:
        spec: the family spec.

    Returns:
        The origin, the name / module / path, and the attribute (empty for a registered name).

    Raises:
        FamilySpecError: an empty part, or a module name that is not a dotted Python name.
    """
    spec = spec.strip()
    if ":" not in spec:
        if not spec:
            raise FamilySpecError(f"empty family spec; give {SPEC_FORMS}")
        return "entry point", spec, ""
    where, attr = spec.rsplit(":", 1)
    if not where or not attr:
        raise FamilySpecError(f"family spec {spec!r}: {'the class after' if not attr else 'the module or file before'} "
                              f"':' is missing; give {SPEC_FORMS}")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise FamilySpecError(f"family spec {spec!r}: {attr!r} is not a Python name; after ':' name the class "
                              "(or the function) that builds the family")
    if where.lower().endswith(".py") or "/" in where or "\\" in where:
        return "file", where, attr
    if not all(part.isidentifier() for part in where.split(".")):
        raise FamilySpecError(f"family spec {spec!r}: {where!r} is neither a module name (package.module) nor a "
                              "Python file (a path ending in .py)")
    return "module", where, attr


def is_file_spec(spec: Any) -> bool:
    """Whether ``spec`` names a family by a file (``path/to/file.py:Class``)."""
    if not isinstance(spec, str):
        return False
    try:
        return parse_family_spec(spec)[0] == "file"
    except FamilySpecError:
        return False


def absolute_file_spec(spec: str, base_dir: str | Path) -> str:
    """A file spec whose relative path is made absolute against ``base_dir``; other specs as given."""
    if not is_file_spec(spec):
        return spec
    _, where, attr = parse_family_spec(spec)
    path = Path(where).expanduser()
    if not path.is_absolute():
        path = Path(base_dir).expanduser().absolute() / path
    return f"{_normal(path)}:{attr}"


def load_family_spec(spec: str, base_dir: str | Path | None = None) -> FamilySource:
    """Resolve a family spec to its factory and the code it comes from.

    Three forms:

    * ``mada``: a family registered under the entry-point group ``metaopt.families``;
    * ``package.module:Class``: a class (or function) of an importable module;
    * ``path/to/file.py:Class``: a class of a Python file, relative to ``base_dir`` (default:
      the current directory). The file is imported as a module of its own, named after its
      absolute path (``_metaopt_family_<stem>_<hash>``), so that two files with one stem do not
      clash and the same file is the same module on every call; it is run again only when its
      bytes change. It can import installed packages, not the files beside it.

    The class must subclass `metaopt.Family`; a function must return a family when called with
    the options (checked by [`FamilySource.build`][metaopt.registry.FamilySource.build]).

    Args:
        spec: the spec.
        base_dir: the directory a relative file path is relative to (None: the current one).

    Returns:
        (FamilySource): the factory, the resolved spec (``target``), the defining file and its
            SHA-256.

    Raises:
        FamilySpecError: no family registered under the name; the module or file not found; the
            module or file raising on import (its exception's type and message, and the line
            of the file); no such class in it (the message lists the `metaopt.Family`
            subclasses it defines); an object that is neither a Family subclass nor a callable.
    """
    origin, where, attr = parse_family_spec(spec)
    if origin == "entry point":
        return _from_entry_point(spec, where)
    module = import_spec_module(spec, base_dir)
    target = f"{where}:{attr}" if origin == "module" else f"{_normal(Path(module.__file__))}:{attr}"
    factory = _attribute(spec, module, attr)
    if origin == "file":
        return FamilySource(spec, origin, target, factory, Path(module.__file__), module.__metaopt_sha256__)
    # a module's family: the file that defines the class (a package may re-export it from elsewhere)
    path = _defining_file(factory) or (Path(module.__file__) if getattr(module, "__file__", None) else None)
    return FamilySource(spec, origin, target, factory, path, _sha256(path) if path is not None else None)


def import_spec_module(spec: str, base_dir: str | Path | None = None) -> ModuleType:
    """The module or file of a ``package.module:Class`` or ``path/to/file.py:Class`` spec, imported.

    A file is imported as `load_family_spec` describes (a module of its own, run once per
    content). The attribute after ``:`` is not looked up: the caller decides what it may be (a
    family here, a ``torch.optim.Optimizer`` too in a job's ``kind``).

    Args:
        spec: the spec (not a registered name).
        base_dir: the directory a relative file path is relative to (None: the current one).

    Returns:
        The module.

    Raises:
        FamilySpecError: a registered name; the module or file not found; the module or file
            raising on import (its exception and line).
    """
    origin, where, _ = parse_family_spec(spec)
    if origin == "entry point":
        raise FamilySpecError(f"{spec!r} is a registered name, not `package.module:Class` or `path/to/file.py:Class`")
    if origin == "module":
        return _import_module(spec, where)
    path = Path(where).expanduser()
    base = Path(base_dir).expanduser().absolute() if base_dir is not None else Path.cwd()
    full = _normal(path if path.is_absolute() else base / path)
    if not full.is_file():
        rel = "" if path.is_absolute() else f" ({where!r} taken relative to {base})"
        what = "is a directory" if full.is_dir() else "does not exist"
        raise FamilySpecError(
            f"family file of {spec!r} not found: {full} {what}{rel}; give the path of the Python file that "
            "defines the family, relative to the config file's directory (on the command line: to the current "
            "directory) or absolute"
        )
    return _import_file(spec, full)


def _from_entry_point(spec: str, name: str) -> FamilySource:
    eps = registered()
    if name not in eps:
        close = difflib.get_close_matches(name, list(eps), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FamilySpecError(
            f"no family registered as {name!r}{hint} (registered: {', '.join(eps) or 'none'}); a family that is not "
            "registered is named by `package.module:Class` or `path/to/file.py:Class`"
        )
    ep = eps[name]
    try:
        factory = ep.load()
    except Exception as e:  # noqa: BLE001 - a broken plugin: say which, and why
        raise FamilySpecError(
            f"registered family {name!r} (entry point {ep.value}) failed to load: {_exception(e)}; fix or "
            "reinstall the package that registers it"
        ) from None
    _check_factory(spec, factory, ep.value)
    path = _defining_file(factory)
    return FamilySource(spec, "entry point", name, factory, path, _sha256(path) if path else None, ep.value)


def _import_module(spec: str, name: str) -> ModuleType:
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that is missing or fails to import
        found = None
    if found is None:
        raise FamilySpecError(
            f"family spec {spec!r}: no module named {name!r} can be imported; install the package that provides it "
            "or check the spelling (a Python file is named by its path, ending in .py: `path/to/file.py:Class`)"
        )
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - whatever the module raises, reported with its line
        raise FamilySpecError(
            f"module {name!r} of family spec {spec!r} raised on import: {_exception(e, found.origin)}; fix the module"
        ) from None


#: file path -> (sha256, module): each file is run once per content
_FILE_MODULES: dict[Path, tuple[str, ModuleType]] = {}


def _import_file(spec: str, path: Path) -> ModuleType:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FamilySpecError(f"family file {path} of {spec!r} cannot be read: {e}") from None
    sha = hashlib.sha256(data).hexdigest()
    cached = _FILE_MODULES.get(path)
    if cached is not None and cached[0] == sha:
        return cached[1]
    # one stable name per absolute path: the same file is one module, two files never clash
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_metaopt_family_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
    module.__metaopt_sha256__ = sha  # type: ignore[attr-defined]
    previous = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses and pydantic look the module up while it runs
    try:
        # run exactly the bytes that were hashed (the loader would read the file a second time)
        exec(compile(data, str(path), "exec"), module.__dict__)  # noqa: S102
    except (Exception, SystemExit) as e:  # noqa: BLE001 - whatever the user's file raises
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise FamilySpecError(f"family file {path} of {spec!r} raised on import: {_exception(e, str(path))}; "
                              "fix the file") from None
    _FILE_MODULES[path] = (sha, module)
    return module


def _attribute(spec: str, module: ModuleType, attr: str) -> Callable[..., Family]:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = f"file {module.__file__}" if hasattr(module, "__metaopt_sha256__") else f"module {module.__name__!r}"
            defined = family_classes(module)
            close = difflib.get_close_matches(attr, defined, n=1)
            if defined:
                listed = (f"did you mean {close[0]!r}? " if close else "") + \
                    f"the metaopt.Family subclasses it defines: {', '.join(defined)}"
            else:
                listed = "it defines no metaopt.Family subclass (a family is a class that subclasses metaopt.Family)"
            raise FamilySpecError(f"family spec {spec!r}: {where} has no {attr!r}; {listed}")
        obj = getattr(obj, part)
    _check_factory(spec, obj, attr)
    return obj


def _check_factory(spec: str, obj: Any, name: str) -> None:
    if isinstance(obj, type):
        if not issubclass(obj, Family):
            raise FamilySpecError(f"family spec {spec!r}: {name} is a class but not a metaopt.Family subclass; "
                                  f"declare it as `class {obj.__name__}(metaopt.Family)`")
        return
    if isinstance(obj, Family):
        raise FamilySpecError(f"family spec {spec!r}: {name} is a family instance, not a class; name its class "
                              f"({type(obj).__name__}) and give its options in `options:` (or -o NAME=VALUE)")
    if not callable(obj):
        raise FamilySpecError(f"family spec {spec!r}: {name} is a {type(obj).__name__}, not a metaopt.Family "
                              "subclass or a function that returns a family; name the class")


def family_classes(module: ModuleType) -> list[str]:
    """Names of the `metaopt.Family` subclasses a module defines (not those it imports)."""
    return [n for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, Family) and v is not Family and v.__module__ == module.__name__]


def _exception(e: BaseException, file: str | None = None) -> str:
    """``Type: message (at FILE:LINE: code)``: where in ``file`` (else the innermost frame) it arose."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, SyntaxError) and e.filename and e.lineno:
        code = (e.text or "").strip()
        return f"{type(e).__name__}: {e.msg} (at {e.filename}:{e.lineno}" + (f": {code})" if code else ")")
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
    mine = [f for f in frames if file is not None and f.filename == file]
    frame = (mine or frames or [None])[-1]
    if frame is None:
        return text
    code = (frame.line or "").strip()
    return f"{text} (at {frame.filename}:{frame.lineno}" + (f": {code})" if code else ")")


def _defining_file(obj: Any) -> Path | None:
    try:
        f = inspect.getsourcefile(obj)
    except TypeError:  # a builtin
        return None
    return Path(f) if f else None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def file_sha256(path: str | Path) -> str | None:
    """The hex SHA-256 of a file's bytes; None where it cannot be read."""
    return _sha256(Path(path))


def _normal(path: Path) -> Path:
    """An absolute path without ``..``, symbolic links kept (the path the user gave, made absolute)."""
    return Path(os.path.normpath(path.absolute()))


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."
