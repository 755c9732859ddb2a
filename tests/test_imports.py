"""The package's import graph: no module imports itself back, and the CLI keeps its layers.

Every import counts, at module level, inside a function or under TYPE_CHECKING: each is a
dependency a reader has to follow, and a circle of them means two modules that cannot be read
(or moved) one without the other. The CLI's layers: `daemon/commands/shared.py` imports no
command module, a command module imports `shared` and no other command nor the dispatcher
(`daemon/cli.py`), which imports the command modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import daemon

PACKAGE = Path(daemon.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (a.b.c imports a and a.b as well)."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{path}:{node.lineno}: relative import"
                targets += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        graph[name] = set()
        for target in targets:
            parts = target.split(".")
            graph[name] |= {m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in files} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles, each as a path that ends where it starts (a depth-first search)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "daemon.commands.shared" in graph["daemon.commands.sync"]  # module level
    assert "daemon.scan" in graph["daemon.commands.sync"]  # inside a function
    assert "daemon.index" in graph["daemon.commands.shared"]  # under TYPE_CHECKING, and in a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(import_graph()) == []


def test_cli_layers() -> None:
    graph = import_graph()
    commands = {m for m in graph if m.startswith("daemon.commands.")} - {"daemon.commands.shared"}
    assert commands, "no command modules found"
    assert graph["daemon.commands.shared"] & (commands | {"daemon.cli"}) == set()
    for module in sorted(commands):
        assert graph[module] & (commands | {"daemon.cli"}) == set(), module
        assert "daemon.commands.shared" in graph[module], module
    assert commands <= graph["daemon.cli"], "a command module the dispatcher does not import"


def test_every_module_says_its_job() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: no docstring"
