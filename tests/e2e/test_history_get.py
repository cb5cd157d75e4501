"""``history.get``: the charts' last 15 minutes over the wire, each caller
shown what it may read (a trader: its own accounts, no decisions)."""

from __future__ import annotations

from typing import Any

from tests.conftest import TRADER, TRADER_B, VIEWER, GatewayFactory
from tests.wsclient import TestClient


async def exposure_shows(viewer: TestClient, expected: dict[str, str]) -> None:
    """Wait until the exposure pushes (coalesced) carry ``expected`` grosses:
    the history keeps what is pushed, as it is pushed."""
    seen: dict[str, str] = {}
    while any(seen.get(a) != g for a, g in expected.items()):
        push = await viewer.next_push("exposure")
        data: dict[str, Any] = push["data"]
        if push.get("snapshot"):
            seen.update({a: e["gross"] for a, e in data["accounts"].items()})
        else:
            seen[data["account"]] = data["gross"]


async def test_history_get_when_positions_and_decisions_then_what_was_pushed(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(limits={"max_order_qty": "10", "max_exposure": "1000000"})
    viewer = await gw.client(VIEWER)
    await viewer.ok("subscribe", {"channels": ["exposure"]})
    desk1 = await gw.client(TRADER)
    desk2 = await gw.client(TRADER_B)
    await desk1.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "2", "price": "50000"}
    )
    await desk2.ok(
        "position.update", {"account": "B1", "symbol": "ETH-USD", "qty": "-3", "price": "3000"}
    )
    order = {"account": "A1", "symbol": "BTC-USD", "side": "sell", "price": "50000"}
    for qty in ("1", "11", "2"):  # the 11 is over max_order_qty
        await desk1.ok("order.validate", {**order, "qty": qty})
    await exposure_shows(viewer, {"A1": "100000", "B1": "9000"})

    seen = await viewer.ok("history.get")
    assert seen["window_s"] == 900
    assert seen["accounts"]["A1"][-1][1] == "100000"
    assert seen["accounts"]["B1"][-1][1] == "9000"
    assert seen["gateway"][-1][1:] == ["109000", "1000000"]
    assert (sum(p[1] for p in seen["decisions"]), sum(p[2] for p in seen["decisions"])) == (2, 1)
    reasons: dict[str, int] = {}
    for point in seen["decisions"]:
        for code, n in point[3].items():
            reasons[code] = reasons.get(code, 0) + n
    assert reasons == {"MAX_ORDER_QTY": 1}

    # A trader: its own accounts only, the gateway's total, no decisions.
    mine = await desk1.ok("history.get")
    assert list(mine["accounts"]) == ["A1"]
    assert mine["gateway"] == seen["gateway"]
    assert "decisions" not in mine
    refused = await desk1.error("history.get", {"account": "A1"})
    assert refused["code"] == "BAD_REQUEST" and "account" in refused["message"]
