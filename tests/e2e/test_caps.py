"""Bounded state per trader (PROTOCOL section 8).

``server.max_symbols_per_account`` and ``server.max_reservations_per_account``
bound what one account may hold: a request past them answers ``BAD_REQUEST``
naming the cap and changes nothing.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import ADMIN, TRADER, GatewayFactory


def update(symbol: str, qty: str = "1") -> dict[str, Any]:
    return {"account": "A1", "symbol": symbol, "qty": qty, "price": "10"}


def reserve(symbol: str) -> dict[str, Any]:
    return {
        "account": "A1",
        "symbol": symbol,
        "side": "buy",
        "qty": "1",
        "price": "10",
        "reserve": True,
    }


async def test_symbols_when_account_at_cap_then_one_more_refused_naming_the_cap(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_symbols_per_account": 3})
    trader = await gw.client(TRADER)
    for symbol in ("S1", "S2", "S3"):
        await trader.ok("position.update", update(symbol))
    before = await trader.ok("state.get")
    for method, params in [
        ("position.update", update("S4")),
        ("order.validate", reserve("S4")),
        (
            "position.snapshot",
            {
                "account": "A1",
                "positions": [{"symbol": f"T{i}", "qty": "1", "price": "1"} for i in range(4)],
            },
        ),
    ]:
        error = await trader.error(method, params)
        assert error["code"] == "BAD_REQUEST", (method, error)
        assert "server.max_symbols_per_account" in error["message"] and "3" in error["message"]
        assert await trader.ok("state.get") == before, method
    # Known symbols still update; a snapshot of as many others replaces them.
    await trader.ok("position.update", update("S1", "5"))
    snapshot = {
        "account": "A1",
        "positions": [{"symbol": f"T{i}", "qty": "1", "price": "1"} for i in range(3)],
    }
    await trader.ok("position.snapshot", snapshot)
    assert set((await trader.ok("state.get"))["accounts"]["A1"]["positions"]) == {"T0", "T1", "T2"}
    # Other accounts have their own room.
    admin = await gw.client(ADMIN)
    await admin.ok("position.update", {**update("S4"), "account": "A2"})


async def test_reservations_when_account_at_cap_then_one_more_refused_until_one_is_freed(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_reservations_per_account": 2})
    trader = await gw.client(TRADER)
    first = await trader.ok("order.validate", reserve("X"))
    await trader.ok("order.validate", reserve("X"))
    before = await trader.ok("state.get")
    error = await trader.error("order.validate", reserve("X"))
    assert error["code"] == "BAD_REQUEST"
    assert "server.max_reservations_per_account" in error["message"]
    assert await trader.ok("state.get") == before
    # A validation without reserve holds nothing and is still answered.
    plain = {**reserve("X"), "reserve": False}
    assert (await trader.ok("order.validate", plain))["decision"] == "accept"
    await trader.ok("reservation.release", {"reservation_id": first["reservation_id"]})
    assert (await trader.ok("order.validate", reserve("X")))["decision"] == "accept"
