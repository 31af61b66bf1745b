"""The shape the Architecture page (docs/architecture.md) promises: modules that import each other without
a circle, and an engine that knows no particular family."""

from __future__ import annotations

import ast
from pathlib import Path

import metaopt

PACKAGE = Path(metaopt.__file__).resolve().parent
#: the application layer on top of the engine: the `metaopt` command and its default job
APPLICATION = ("metaopt.cli", "metaopt.jobs")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The metaopt modules ``name`` imports, at the top or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def test_no_import_circle_between_metaopt_modules():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ importing its own submodules is how packages are made, not a circle
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    assert graph["metaopt.optimizer"] >= {"metaopt.paths", "metaopt.hyper.update"}  # the graph is real
    done, path = set(), []

    def visit(n):
        if n in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
        if n in done:
            return
        path.append(n)
        for m in sorted(graph[n]):
            visit(m)
        path.pop()
        done.add(n)

    for n in sorted(graph):
        visit(n)


def test_the_engine_imports_no_family():
    for name, path in modules().items():
        if name.startswith(APPLICATION):
            continue
        bad = {m for m in imports(name, path, set(modules()) | {"metaopt.plugins"}) if m.startswith("metaopt.plugins")}
        source = path.read_text()
        assert not bad and "metaopt.plugins" not in source, name
