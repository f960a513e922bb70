"""The shape of the package: no import cycles, and the server's internals in one module only.

Read from the source with `ast`, imports inside functions included (a lazy import is still a
dependency, and a cycle through one is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "taskcast"
ADAPTER = "taskcast.server"
# Libraries whose private names (and, for uvicorn, any name) only the adapter may use.
GUARDED = ("uvicorn", "starlette", "sse_starlette")


def module_name(path: Path) -> str:
    return "taskcast" if path.stem == "__init__" else f"taskcast.{path.stem}"


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), filename=str(path))
            for path in sorted(PACKAGE.glob("*.py"))}


def imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement anywhere in the module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def internal_graph() -> dict[str, set[str]]:
    trees = modules()
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        for module, names in imports(tree):
            if module in trees and module != name:
                graph[name].add(module)
            for imported in names:  # `from taskcast import server`
                if f"{module}.{imported}" in trees:
                    graph[name].add(f"{module}.{imported}")
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycle(internal_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(set(modules()) - {ADAPTER}))
def test_only_the_adapter_touches_server_internals(name: str) -> None:
    for module, names in imports(modules()[name]):
        root = module.split(".")[0]
        assert root != "uvicorn", f"{name} imports {module}"
        if root in GUARDED:
            private = [part for part in module.split(".") + names if part.startswith("_")]
            assert not private, f"{name} imports private {module}: {private}"
    path = next(path for path in PACKAGE.glob("*.py") if module_name(path) == name)
    source = path.read_text()
    assert "_listen_for_exit_signal" not in source and "AppStatus" not in source
