"""``gateway/core`` stays pure: it imports ``protocol``, itself and pure parts
of the standard library, never a clock, a file, a socket, a thread, the event
loop or the rest of the gateway. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "gateway" / "core"

#: What the brief of the core names as forbidden, checked by name.
FORBIDDEN = ("asyncio", "time", "os", "socket", "threading", "websockets")
#: Everything the core may import besides ``protocol`` and ``gateway.core``.
PURE_STDLIB = frozenset(
    {
        "__future__",
        "collections",
        "dataclasses",
        "datetime",
        "decimal",
        "enum",
        "functools",
        "heapq",
        "json",
        "re",
        "secrets",
        "types",
        "typing",
    }
)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``path``; relative ones resolved."""
    package = "gateway.core"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                assert node.module is not None
                found.append((node.lineno, node.module))
    return found


def _allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top == "protocol" or module == "gateway.core" or module.startswith("gateway.core."):
        return True
    return top in PURE_STDLIB


MODULES = sorted(CORE.glob("*.py"))


def test_core_when_listed_then_holds_the_engine_modules() -> None:
    names = {path.stem for path in MODULES}
    assert {"engine", "book", "reservations", "modes", "limits", "rules", "records"} <= names
    assert {"events", "views"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_core_module_when_parsed_then_imports_nothing_impure(path: Path) -> None:
    imports = _imports(path)
    forbidden = [
        (line, module)
        for line, module in imports
        if module.split(".")[0] in FORBIDDEN
        or (module.startswith("gateway") and not module.startswith("gateway.core"))
    ]
    assert forbidden == [], f"{path.name} imports {forbidden}"
    impure = [(line, module) for line, module in imports if not _allowed(module)]
    assert impure == [], f"{path.name} imports modules outside the core's allowed set: {impure}"


def test_purity_check_when_a_module_imports_the_clock_then_it_fails(tmp_path: Path) -> None:
    # The check itself can fail: a module importing time inside a function.
    sample = tmp_path / "sample.py"
    sample.write_text("def now():\n    import time\n    from gateway import store\n")
    modules = [module for _line, module in _imports(sample)]
    assert modules == ["time", "gateway"]
    assert not _allowed("time") and not _allowed("gateway")
    assert _allowed("gateway.core.book") and _allowed("protocol.values")
