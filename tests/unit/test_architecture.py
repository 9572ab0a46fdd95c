"""The import graph keeps DESIGN.md's shape: imports point toward the device, floor by floor
(firmware_profiles ← edge_agent ← converters ← fleet_server ← hil), with no cycle between
modules nor between parts (the first two levels of a name: ``edge_agent.lifecycle``,
``fleet_server.rollouts``). Read from the source; imports inside functions count, imports
under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["firmware_profiles", "edge_agent", "converters", "fleet_server", "hil"]
#: Imported only inside the module that uses them (a device carries only its own runtime).
HEAVY = {"tensorrt", "tensorflow", "torch", "onnx2tf", "cuda"}


def _modules() -> dict[str, Path]:
    found = {}
    for floor in FLOORS:
        for path in (ROOT / floor).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[tuple[str, bool]]:
    """(imported name, at module level?) for every import that runs."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    top = {id(n) for n in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in MODULES else base), id(node) in top


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _ in _imports(module, path):
            target = _resolve(name)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _is_package_and_own_module(component: list[str]) -> bool:
    """A package ``__init__`` re-exporting its own module is not a design cycle."""
    if len(component) != 2:
        return False
    a, b = component
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_module_imports_a_floor_above_its_own() -> None:
    upward = []
    for module, targets in _graph().items():
        own = FLOORS.index(module.split(".")[0])
        upward += [f"{module} -> {t}" for t in targets if FLOORS.index(t.split(".")[0]) > own]
    assert upward == []


def test_no_cycle_between_modules() -> None:
    cycles = [c for c in _cycles(_graph()) if not _is_package_and_own_module(c)]
    assert cycles == []


def test_no_cycle_between_parts() -> None:
    parts: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        part = ".".join(module.split(".")[:2])
        parts.setdefault(part, set()).update(
            ".".join(t.split(".")[:2]) for t in targets if ".".join(t.split(".")[:2]) != part
        )
    cycles = [c for c in _cycles(parts) if not _is_package_and_own_module(c)]
    assert cycles == []


def test_heavy_libraries_are_imported_lazily() -> None:
    eager = [
        f"{module}: {name}"
        for module, path in MODULES.items()
        for name, at_top in _imports(module, path)
        if at_top and name.split(".")[0] in HEAVY
    ]
    assert eager == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert _cycles(graph) == expected
