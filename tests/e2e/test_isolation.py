"""No desk sees or moves another (PROTOCOL sections 4 and 5).

A trader can never change, or learn more than the gateway-wide totals about,
an account its token does not list: not through a method, a channel, an
alert, a reference price or a reservation id. ``desk-1`` trades A1 and A2,
``desk-2`` trades B1; ``price-feed`` publishes reference prices.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any

from tests.conftest import (
    ADMIN,
    FEED,
    TRADER,
    TRADER_B,
    VIEWER,
    GatewayFactory,
    RunningGateway,
)
from tests.wsclient import TestClient


def order(account: str, price: str, symbol: str = "X", **extra: Any) -> dict[str, Any]:
    return {"account": account, "symbol": symbol, "side": "buy", "qty": "1", "price": price} | extra


def codes(decision: dict[str, Any]) -> list[str]:
    return [reason["code"] for reason in decision["reasons"]]


async def drain(queue: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def alerts_until(client: TestClient, code: str) -> list[dict[str, Any]]:
    """The alerts pushed to ``client`` up to and including the first ``code``."""
    seen = []
    while True:
        alert = (await client.next_push("alerts", timeout=10))["data"]
        seen.append(alert)
        if alert["code"] == code:
            return seen


async def settle(*clients: TestClient) -> None:
    """Every push produced so far has reached these clients: each answers a
    ping, and answers go out behind the pushes queued before them."""
    for client in clients:
        await client.ok("ping")


# ----------------------------------------------------------- reference prices


async def test_price_update_when_trader_or_viewer_then_forbidden_and_feed_or_admin_may(
    gw: RunningGateway,
) -> None:
    params = {"symbol": "X", "price": "100"}
    for token in (TRADER, VIEWER):
        client = await gw.client(token)
        assert (await client.error("price.update", params))["code"] == "FORBIDDEN"
    for token in (FEED, ADMIN):
        client = await gw.client(token)
        assert await client.ok("price.update", params) == {"symbol": "X", "price": "100"}


async def test_feed_when_trading_then_forbidden_but_reads_like_a_viewer(
    gw: RunningGateway,
) -> None:
    trader = await gw.client(TRADER)
    await trader.ok("position.update", {"account": "A1", "symbol": "X", "qty": "1", "price": "5"})
    feed = await gw.client(FEED)
    update = {"account": "A1", "symbol": "X", "qty": "2", "price": "5"}
    assert (await feed.error("position.update", update))["code"] == "FORBIDDEN"
    assert (await feed.error("order.validate", order("A1", "5")))["code"] == "FORBIDDEN"
    assert "A1" in (await feed.ok("state.get"))["accounts"]
    hello = await feed.ok("session.hello")
    assert hello["role"] == "feed"


async def test_mark_price_of_one_desk_when_far_off_then_never_collars_another_desk(
    gw: RunningGateway,
) -> None:
    desk1 = await gw.client(TRADER)
    desk2 = await gw.client(TRADER_B)
    # desk-1 marks X at 100; desk-2 has no position and no reference exists.
    await desk1.ok("position.update", {"account": "A1", "symbol": "X", "qty": "1", "price": "100"})
    assert codes(await desk2.ok("order.validate", order("B1", "1000"))) == []
    # desk-1's own mark serves as its own reference while no feed price exists.
    assert codes(await desk1.ok("order.validate", order("A1", "1000"))) == ["PRICE_COLLAR"]
    # A feed price is every account's reference.
    feed = await gw.client(FEED)
    await feed.ok("price.update", {"symbol": "X", "price": "1000"})
    assert codes(await desk1.ok("order.validate", order("A1", "1000"))) == []
    assert codes(await desk2.ok("order.validate", order("B1", "100"))) == ["PRICE_COLLAR"]


async def test_reference_price_when_restarted_then_only_feed_prices_come_back(
    make_gateway: GatewayFactory, tmp_path: Any
) -> None:
    state_dir = tmp_path / "state"
    gw = await make_gateway(state_dir=state_dir)
    desk1 = await gw.client(TRADER)
    await desk1.ok("position.update", {"account": "A1", "symbol": "X", "qty": "1", "price": "100"})
    await gw.gateway.stop()
    again = await make_gateway(state_dir=state_dir)
    desk2 = await again.client(TRADER_B)
    assert codes(await desk2.ok("order.validate", order("B1", "1000"))) == []


# ------------------------------------------------------------- reservations


async def test_release_when_reservation_of_another_desk_then_answered_as_unknown(
    gw: RunningGateway,
) -> None:
    desk1 = await gw.client(TRADER)
    desk2 = await gw.client(TRADER_B)
    held = await desk1.ok("order.validate", order("A1", "100", reserve=True))
    rid = held["reservation_id"]
    unknown = await desk2.ok("reservation.release", {"reservation_id": "R-no-such"})
    other = await desk2.ok("reservation.release", {"reservation_id": rid})
    assert other == unknown == {"released": False}
    state = await desk1.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "100"
    assert await desk1.ok("reservation.release", {"reservation_id": rid}) == {"released": True}


async def test_fill_when_release_names_another_account_or_symbol_then_refused_alike(
    gw: RunningGateway,
) -> None:
    desk1 = await gw.client(TRADER)
    admin = await gw.client(ADMIN)
    on_x = (await desk1.ok("order.validate", order("A1", "100", reserve=True)))["reservation_id"]
    on_b1 = (await admin.ok("order.validate", order("B1", "100", reserve=True)))["reservation_id"]
    before = await admin.ok("state.get")
    fills = [
        ("A1", "Y", on_x),  # a fill on symbol Y naming a reservation on X
        ("A1", "X", on_b1),  # another account's reservation
        ("A1", "X", "R-no-such"),  # an unknown one
    ]
    messages = set()
    for account, symbol, rid in fills:
        update = {"account": account, "symbol": symbol, "qty": "1", "price": "100", "release": rid}
        error = await desk1.error("position.update", update)
        assert error["code"] == "BAD_REQUEST", error
        messages.add(error["message"].replace(rid, "ID").replace(symbol, "SYM"))
    assert len(messages) == 1, messages
    assert await admin.ok("state.get") == before


def _successor(rid: str) -> str:
    """``rid`` with its last run of digits plus one (R41 -> R42)."""
    runs = list(re.finditer(r"\d+", rid))
    if not runs:
        return rid + "1"
    last = runs[-1]
    return rid[: last.start()] + str(int(last.group()) + 1) + rid[last.end() :]


async def test_reservation_ids_when_desks_interleave_then_not_sequential(
    gw: RunningGateway,
) -> None:
    desk1 = await gw.client(TRADER)
    desk2 = await gw.client(TRADER_B)
    ids = []
    for i in range(10):
        client, account = (desk1, "A1") if i % 2 == 0 else (desk2, "B1")
        decision = await client.ok("order.validate", order(account, "10", reserve=True))
        ids.append(decision["reservation_id"])
    for before, after in itertools.pairwise(ids):
        assert _successor(before) != after, ids


# -------------------------------------------------------------------- alerts


async def test_alerts_when_about_another_desk_then_trader_never_sees_them(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(limits={"max_account_exposure": "1000", "max_exposure": "100000"})
    admin = await gw.client(ADMIN)
    desk2 = await gw.client(TRADER_B)
    viewer = await gw.client(VIEWER)
    for client in (desk2, viewer):
        await client.ok("subscribe", {"channels": ["alerts"]})
        await client.next_push("alerts")  # the snapshot
    desk1 = await gw.client(TRADER)
    await desk1.ok("session.hello", {"cancel_on_disconnect": True})
    # Alerts about A1: a seq gap, a breach of its limit, a mode change with an
    # admin's reason; and a connection of desk-1 closing.
    for seq in (1, 5):
        await desk1.ok(
            "position.update",
            {"account": "A1", "symbol": "X", "qty": "20", "price": "100", "seq": seq},
        )
    await admin.ok(
        "emergency.set", {"mode": "halted", "reason": "suspected spoofing", "account": "A1"}
    )
    await desk1.close()
    seen_by_viewer = {a["code"] for a in await alerts_until(viewer, "CLIENT_DISCONNECTED")}
    await admin.ok("limits.set", {"version": 1, "limits": {"max_order_qty": "5"}})
    seen_by_viewer |= {a["code"] for a in await alerts_until(viewer, "LIMITS_CHANGED")}
    await settle(desk2)
    seen_by_desk2 = [a["data"] for a in await drain(desk2.channel("alerts"))]
    assert {
        "POSITION_SEQ_GAP",
        "EXPOSURE_BREACH",
        "EMERGENCY_CHANGED",
        "CLIENT_DISCONNECTED",
        "LIMITS_CHANGED",
    } <= seen_by_viewer
    assert [a["code"] for a in seen_by_desk2] == ["LIMITS_CHANGED"], seen_by_desk2
    # A new subscription's snapshot is filtered the same way.
    await desk2.ok("subscribe", {"channels": ["alerts"]})
    snapshot = await desk2.next_push("alerts")
    assert [a["code"] for a in snapshot["data"]["alerts"]] == ["LIMITS_CHANGED"]


# ----------------------------------------------------------- EMERGENCY document


async def test_emergency_document_when_another_account_has_a_mode_then_trader_sees_only_own(
    gw: RunningGateway,
) -> None:
    admin = await gw.client(ADMIN)
    desk1 = await gw.client(TRADER)
    desk2 = await gw.client(TRADER_B)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "spoofing", "account": "A1"})
    await admin.ok("emergency.set", {"mode": "reducing", "reason": "review", "account": "B1"})
    pushes2 = [p["data"] for p in await drain(desk2.channel("emergency"))]
    pushes1 = [p["data"] for p in await drain(desk1.channel("emergency"))]
    assert pushes2 and all(set(p["accounts"]) <= {"B1"} for p in pushes2), pushes2
    assert set(pushes1[-1]["accounts"]) == {"A1"}
    assert set((await desk2.ok("emergency.get"))["accounts"]) == {"B1"}
    assert set((await desk2.ok("session.hello"))["emergency"]["accounts"]) == {"B1"}
    assert set((await desk2.ok("state.get"))["emergency"]["accounts"]) == {"B1"}
    assert set((await admin.ok("emergency.get"))["accounts"]) == {"A1", "B1"}
    # A connection opened now gets the filtered snapshot first.
    late = await TestClient.open(gw.url, TRADER_B)
    first = await late.next_push("emergency")
    assert set(first["data"]["accounts"]) == {"B1"}
    await late.close()
