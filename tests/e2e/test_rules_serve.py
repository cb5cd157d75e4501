"""A desk rule module loaded by a real gateway process cannot change its math."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.gwprocess import GatewayProcess, write_config
from tests.wsclient import TestClient


async def test_serve_when_rule_module_changes_decimal_context_on_import_then_math_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "desk_sloppy.py").write_text(
        "import decimal\n"
        "decimal.getcontext().prec = 6\n"
        "decimal.getcontext().traps[decimal.Inexact] = False\n"
        "def check(order):\n"
        "    return None\n"
    )
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), path])))
    config = write_config(tmp_path / "gw.toml", tmp_path / "state")
    config.write_text('rules = ["desk_sloppy:check"]\n' + config.read_text())
    proc = await GatewayProcess.start(config)
    try:
        trader = await TestClient.open(proc.url, "trader-token")
        update = {"account": "A1", "symbol": "X", "qty": "1234.567", "price": "89.01"}
        # 109888.80867 has 11 digits: a 6-digit context would give 109889.
        assert (await trader.ok("position.update", update))["exposure"] == "109888.80867"
        order = {"account": "A1", "symbol": "X", "side": "buy", "qty": "0.001", "price": "89.01"}
        decision = await trader.ok("order.validate", order)
        assert decision["exposure"]["account"] == "109888.80867"
        await trader.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0
