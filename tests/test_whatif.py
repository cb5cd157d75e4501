"""Offline tools on a real journal: what-if replay against other limits, record."""

from __future__ import annotations

from pathlib import Path

import orjson

from gateway.cli import main as gateway_main
from gateway.config import Limits
from gateway.whatif import record, what_if
from tests.conftest import FEED, TRADER, GatewayFactory


async def _trade(make_gateway: GatewayFactory, state_dir: Path) -> list[str]:
    """Positions, a price and six validations of growing size; returns the decisions."""
    gw = await make_gateway(state_dir=state_dir, limits={"max_position": "10"})
    trader = await gw.client(TRADER)
    await trader.ok("position.update", {"account": "A1", "symbol": "X", "qty": "2", "price": "100"})
    feed = await gw.client(FEED)
    await feed.ok("price.update", {"symbol": "X", "price": "100"})
    seen = []
    for qty in ("1", "3", "5", "7", "9", "11"):
        decision = await trader.ok(
            "order.validate",
            {"account": "A1", "symbol": "X", "side": "buy", "qty": qty, "price": "100"},
        )
        seen.append(decision["decision"])
    await gw.close_clients()
    await gw.gateway.stop()
    return seen


async def test_what_if_when_limit_tightened_then_exactly_the_orders_over_it_change(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    recorded = await _trade(make_gateway, state_dir)
    # Without reserve the position stays 2: worst cases 3, 5, 7, 9 pass
    # max_position 10; 11 and 13 do not.
    assert recorded == ["accept"] * 4 + ["reject"] * 2
    result = what_if(state_dir, Limits.from_mapping({"max_position": "6"}))
    assert result.validations == 6
    # With a limit of 6, the orders making 7 and 9 would now be rejected.
    assert [(c.qty, c.recorded, c.now) for c in result.changed] == [
        ("5", "accept", "reject"),
        ("7", "accept", "reject"),
    ]
    assert all(c.reasons == ["MAX_POSITION"] for c in result.changed)
    same = what_if(state_dir, Limits.from_mapping({"max_position": "10"}))
    assert same.changed == []


async def test_replay_command_when_other_config_then_prints_the_changes(
    make_gateway: GatewayFactory, tmp_path: Path, capsys
) -> None:
    state_dir = tmp_path / "state"
    await _trade(make_gateway, state_dir)
    other = tmp_path / "other.toml"
    other.write_text('[limits]\nmax_position = "100"\n')
    assert gateway_main(["replay", str(state_dir), "--config", str(other), "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["validations"] == 6
    assert report["changed"] == 2
    assert [c["qty"] for c in report["changes"]] == ["9", "11"]
    assert {c["now"] for c in report["changes"]} == {"accept"}


async def test_record_when_journal_has_flow_then_replayable_requests_in_order(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    await _trade(make_gateway, state_dir)
    out = tmp_path / "flow.ndjson"
    assert record(state_dir, out) == 8
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["method"] for line in lines] == [
        "position.update",
        "price.update",
        *["order.validate"] * 6,
    ]
    assert lines[0]["t"] == 0
    assert all(line["t"] >= 0 for line in lines)
    assert lines[-1]["params"] == {
        "account": "A1",
        "symbol": "X",
        "side": "buy",
        "qty": "11",
        "price": "100",
    }
