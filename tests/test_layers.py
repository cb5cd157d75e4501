"""Layering: the clients speak the wire protocol and never import the gateway.

Every module under ``clients/`` is parsed (not imported), so an import inside
a function, or one only reached on some path, counts as much as one at the
top. ``importlib.import_module("gateway...")`` with a literal name counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT_MODULES = sorted((ROOT / "clients").rglob("*.py"))


def _is_gateway(name: str) -> bool:
    return name == "gateway" or name.startswith("gateway.")


def gateway_imports(source: str, filename: str = "<source>") -> list[str]:
    """``line: name`` for every import of ``gateway`` (or a submodule) in ``source``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found.extend(f"{node.lineno}: {name}" for name in names if _is_gateway(name))
    return found


def test_clients_package_when_listed_then_holds_the_modules_checked() -> None:
    names = {path.relative_to(ROOT / "clients").as_posix() for path in CLIENT_MODULES}
    assert {"__init__.py", "client.py", "bench.py", "riskctl.py"} <= names, names


@pytest.mark.parametrize(
    "path", CLIENT_MODULES, ids=[p.relative_to(ROOT).as_posix() for p in CLIENT_MODULES]
)
def test_client_module_when_parsed_then_imports_no_gateway(path: Path) -> None:
    assert gateway_imports(path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import gateway",
        "import gateway.journal as j",
        "import os, gateway.store",
        "from gateway import manager",
        "from gateway.journal import Journal",
        "def helper():\n    from gateway.store import Store\n",
        "class C:\n    def m(self):\n        import gateway.manager\n",
        "if False:\n    import gateway\n",
        "try:\n    import gateway\nexcept ImportError:\n    pass\n",
        "import importlib\nimportlib.import_module('gateway.store')\n",
        "__import__('gateway')\n",
    ],
)
def test_gateway_imports_when_any_form_then_found(source: str) -> None:
    assert len(gateway_imports(source)) == 1, source


@pytest.mark.parametrize(
    "source",
    [
        "import protocol.codec",
        "from protocol import messages",
        "import gateways_elsewhere",
        "from . import gateway",
        "argv = ['-m', 'gateway.benchtools', 'recover']",
        "'''from gateway import manager'''",
    ],
)
def test_gateway_imports_when_not_an_import_of_gateway_then_not_found(source: str) -> None:
    assert gateway_imports(source) == []
