"""The code's shape, checked: the rules docs/architecture.md promises a reader.

Each rule is a property of the source that a change can break without any
behaviour changing at once: an import circle, a task started outside a
TaskGroup, a module or class grown past what a reader can hold. (The core's
purity is checked by tests/core/test_purity.py, websockets' internals by
tests/net/test_wsio.py, clients importing no gateway by tests/test_layers.py.)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"

MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 400


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


def imported(name: str, tree: ast.Module) -> Iterator[str]:
    """Every module ``name`` imports, wherever the import statement is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.rsplit(".", node.level)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield module
            for alias in node.names:
                yield f"{module}.{alias.name}"  # ``from gateway.net import wsio``


def test_gateway_has_no_import_circle() -> None:
    known = {name for name, _, _ in modules()}
    graph: dict[str, set[str]] = {}
    for name, _, tree in modules():
        graph[name] = {dep for dep in imported(name, tree) if dep in known and dep != name}
    # A package's __init__ importing its own modules is not a circle.
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not name.startswith(dep + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circle = [*path[path.index(dep) :], dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _starts_task_outside_a_group(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in {"create_task", "ensure_future"}
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr == "ensure_future":
        return True
    if func.attr != "create_task":
        return False
    owner = func.value
    if isinstance(owner, ast.Name):
        return owner.id == "asyncio" or owner.id.endswith("loop")
    if isinstance(owner, ast.Attribute):
        return owner.attr.endswith("loop")
    # asyncio.get_running_loop().create_task(...)
    return isinstance(owner, ast.Call)


def test_every_task_is_started_in_a_task_group() -> None:
    found = []
    for _, path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _starts_task_outside_a_group(node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_no_module_or_class_too_long_to_read() -> None:
    found = []
    for _, path, tree in modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    found.append(f"{path.relative_to(ROOT)}: class {node.name}, {length} lines")
    assert not found, found
