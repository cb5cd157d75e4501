"""The desk-rule example in docs/rules.md works as the doc says, loaded as the config would."""

from __future__ import annotations

import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.core.engine import RiskEngine
from gateway.core.events import Decision
from gateway.core.limits import Limits
from gateway.rules import load_rules
from protocol.messages import OrderValidate

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


@pytest.fixture
def desk_rules_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    blocks = re.findall(r"```python\n(# desk_rules\.py\n.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/rules.md lost its desk_rules.py example"
    (tmp_path / "desk_rules.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "desk_rules:whole_lots"
    sys.modules.pop("desk_rules", None)


def test_doc_rule_when_named_like_in_config_then_odd_lots_rejected(desk_rules_module: str) -> None:
    rules = load_rules([desk_rules_module])
    manager = RiskEngine(limits=Limits(), rules=rules, now_ms=0)

    def decide(qty: str) -> Decision:
        order = OrderValidate(
            account="A1", symbol="X", side="buy", qty=Decimal(qty), price=Decimal(10)
        )
        return manager.validate(order, 0)

    assert decide("0.002").decision == "accept"
    odd = decide("0.0015")
    assert odd.decision == "reject"
    assert odd.to_wire()["reasons"] == [
        {"code": "ODD_LOT", "message": "quantity 0.0015 is not a multiple of 0.001"}
    ]


def test_load_rules_when_spec_is_wrong_then_error_names_it() -> None:
    with pytest.raises(ValueError, match="nope_module"):
        load_rules(["nope_module:rule"])
    with pytest.raises(ValueError, match=r"package\.module:callable"):
        load_rules(["no_colon"])
