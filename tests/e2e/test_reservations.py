"""Reservations, limits changes and the one-step check over a real socket."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import orjson
import pytest

from gateway.config import Limits
from gateway.core.engine import RiskEngine
from gateway.persistence import FileOps, Store
from tests.conftest import ADMIN, TRADER, VIEWER, GatewayFactory, RunningGateway
from tests.statedir import wall_clock_ms

BUY = {"account": "A1", "symbol": "X", "side": "buy", "qty": "1", "price": "100"}


async def test_reserve_when_50_concurrent_and_room_for_one_then_exactly_one_accept(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(limits={"max_exposure": "150", "max_account_exposure": "150"})
    clients = [await gw.client(TRADER) for _ in range(5)]
    calls = [clients[i % 5].call("order.validate", {**BUY, "reserve": True}) for i in range(50)]
    responses = await asyncio.gather(*calls)
    decisions = [r["result"]["decision"] for r in responses]
    assert decisions.count("accept") == 1
    rejected = [r["result"] for r in responses if r["result"]["decision"] == "reject"]
    assert all(
        [c["code"] for c in d["reasons"]] == ["MAX_EXPOSURE", "MAX_ACCOUNT_EXPOSURE"]
        for d in rejected
    )
    state = await clients[0].ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "100"


async def test_reserve_then_release_then_exposure_freed(gw: RunningGateway) -> None:
    trader = await gw.client(TRADER)
    decision = await trader.ok("order.validate", {**BUY, "qty": "3", "reserve": True})
    assert decision["decision"] == "accept"
    rid = decision["reservation_id"]
    assert rid is not None
    assert decision["expires_at"].endswith("Z")
    assert decision["exposure"]["account"] == "300"
    assert (await trader.ok("reservation.release", {"reservation_id": rid})) == {"released": True}
    assert (await trader.ok("reservation.release", {"reservation_id": rid})) == {"released": False}
    state = await trader.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["gross_exposure"] == "0"


async def test_reserve_when_client_order_id_repeated_then_same_reservation(
    gw: RunningGateway,
) -> None:
    trader = await gw.client(TRADER)
    params = {**BUY, "qty": "2", "reserve": True, "client_order_id": "c-1"}
    first = await trader.ok("order.validate", params)
    again = await trader.ok("order.validate", params)
    assert again["reservation_id"] == first["reservation_id"]
    assert again["expires_at"] == first["expires_at"]
    state = await trader.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "200"


@pytest.mark.parametrize(
    ("field", "value"),
    [("qty", "50"), ("price", "101"), ("side", "sell"), ("symbol", "Y"), ("reserve", False)],
)
async def test_reserve_when_live_client_order_id_reused_for_another_order_then_conflict(
    make_gateway: GatewayFactory, field: str, value: object
) -> None:
    # Reusing a live client_order_id for any other order must never answer the
    # first order's accept: that order was not checked (here qty 50 is over
    # max_order_qty 10). Nothing is reserved either.
    gw = await make_gateway(limits={"max_order_qty": "10"})
    trader = await gw.client(TRADER)
    params = {**BUY, "qty": "2", "reserve": True, "client_order_id": "X"}
    first = await trader.ok("order.validate", params)
    assert first["decision"] == "accept"
    before = await trader.ok("state.get", {"account": "A1"})
    error = await trader.error("order.validate", {**params, field: value})
    assert error["code"] == "CONFLICT", error
    assert "client_order_id X" in error["message"] and f"params.{field}" in error["message"]
    assert await trader.ok("state.get", {"account": "A1"}) == before
    # The identical repeat still returns the first decision.
    again = await trader.ok("order.validate", params)
    assert again["reservation_id"] == first["reservation_id"]


async def test_reserve_when_client_order_id_reused_with_equal_decimal_then_same_reservation(
    gw: RunningGateway,
) -> None:
    # "2" and "2.00" are the same quantity: the same order, not another one.
    trader = await gw.client(TRADER)
    params = {**BUY, "qty": "2", "reserve": True, "client_order_id": "X"}
    first = await trader.ok("order.validate", params)
    again = await trader.ok("order.validate", {**params, "qty": "2.00", "price": 100})
    assert again["reservation_id"] == first["reservation_id"]


async def test_position_update_when_naming_reservation_then_fill_replaces_hold(
    gw: RunningGateway,
) -> None:
    trader = await gw.client(TRADER)
    decision = await trader.ok("order.validate", {**BUY, "qty": "2", "reserve": True})
    result = await trader.ok(
        "position.update",
        {
            "account": "A1",
            "symbol": "X",
            "qty": "2",
            "price": "100",
            "release": decision["reservation_id"],
        },
    )
    assert result["released"] is True
    assert result["exposure"] == "200"  # the position, no longer the position plus the hold
    state = await trader.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "0"


async def test_reservation_when_ttl_passes_then_released(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"reservation_ttl_ms": 100})
    trader = await gw.client(TRADER)
    await trader.ok("subscribe", {"channels": ["exposure"]})
    await trader.next_push("exposure")  # snapshot
    decision = await trader.ok("order.validate", {**BUY, "qty": "2", "reserve": True})
    assert decision["exposure"]["account"] == "200"
    async with asyncio.timeout(5):
        while True:
            push = await trader.next_push("exposure")
            if push["data"].get("account") == "A1" and push["data"]["gross"] == "0":
                break
    state = await trader.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["gross_exposure"] == "0"


async def test_cancel_on_disconnect_when_socket_drops_then_exposure_freed_and_alerted(
    gw: RunningGateway,
) -> None:
    viewer = await gw.client(VIEWER)
    await viewer.ok("subscribe", {"channels": ["alerts"]})
    await viewer.next_push("alerts")  # snapshot
    trader = await gw.client(TRADER)
    await trader.ok("session.hello", {"cancel_on_disconnect": True})
    await trader.ok("order.validate", {**BUY, "qty": "4", "reserve": True})
    state = await viewer.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "400"
    trader.ws.transport.abort()  # the socket drops, no closing handshake
    alert = await viewer.next_push("alerts")
    assert alert["data"]["code"] == "CLIENT_DISCONNECTED"
    assert alert["data"]["level"] == "warning"
    state = await viewer.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "0"


async def test_limits_set_when_version_current_then_applied_pushed_and_durable(
    make_gateway: GatewayFactory, tmp_path
) -> None:
    state_dir = tmp_path / "limits"
    gw = await make_gateway(state_dir=state_dir)
    admin = await gw.client(ADMIN)
    await admin.ok("subscribe", {"channels": ["alerts"]})
    await admin.next_push("alerts")
    result = await admin.ok(
        "limits.set",
        {
            "version": 1,
            "limits": {"max_position": "10", "symbols": {"BTC-USD": {"max_order_qty": "2"}}},
        },
    )
    assert result["version"] == 2
    assert result["limits"]["max_position"] == "10"
    assert result["limits"]["symbols"] == {"BTC-USD": {"max_order_qty": "2"}}
    alert = await admin.next_push("alerts")
    assert alert["data"]["code"] == "LIMITS_CHANGED"
    stale = await admin.error("limits.set", {"version": 1, "limits": {"max_position": "5"}})
    assert stale["code"] == "CONFLICT"
    bad = await admin.error("limits.set", {"version": 2, "limits": {"max_positon": "5"}})
    assert bad["code"] == "BAD_REQUEST"
    assert "max_positon" in bad["message"]
    await gw.close_clients()
    await gw.gateway.stop()
    again = await make_gateway(state_dir=state_dir)
    viewer = await again.client(VIEWER)
    after = await viewer.ok("limits.get")
    assert after["version"] == 2
    assert after["limits"]["max_position"] == "10"


async def test_limits_set_when_gateway_halted_then_stays_halted(gw: RunningGateway) -> None:
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "outage"})
    await admin.ok("limits.set", {"version": 1, "limits": {"max_exposure": "5000000"}})
    assert (await admin.ok("emergency.get"))["mode"] == "halted"


async def test_position_update_when_over_max_exposure_then_gateway_reducing(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(limits={"max_exposure": "1000"})
    trader = await gw.client(TRADER)
    await trader.ok(
        "position.update", {"account": "A1", "symbol": "X", "qty": "11", "price": "100"}
    )
    push = await trader.next_push("emergency")
    assert push["data"]["mode"] == "reducing"
    assert push["data"]["actor"] == "gateway"
    buy = await trader.ok("order.validate", BUY)
    assert [r["code"] for r in buy["reasons"]] == ["REDUCE_ONLY", "MAX_EXPOSURE"]
    sell = await trader.ok("order.validate", {**BUY, "side": "sell"})
    assert sell["decision"] == "accept"


async def test_position_seq_gap_then_stale_until_snapshot(gw: RunningGateway) -> None:
    trader = await gw.client(TRADER)
    update = {"account": "A1", "symbol": "X", "qty": "1", "price": "100"}
    await trader.ok("position.update", {**update, "seq": 41})
    await trader.ok("position.update", {**update, "seq": 43})
    stale = await trader.ok("order.validate", BUY)
    assert [r["code"] for r in stale["reasons"]] == ["STALE_POSITIONS"]
    snap = await trader.ok(
        "position.snapshot",
        {"account": "A1", "positions": [{"symbol": "X", "qty": "1", "price": "100"}], "seq": 44},
    )
    assert snap["exposure"] == "100"
    assert (await trader.ok("order.validate", BUY))["decision"] == "accept"


def hold_fsyncs(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """From now on every journal fdatasync waits until the returned event is set."""
    gate = threading.Event()
    real_fdatasync = FileOps.fdatasync

    def gated_fdatasync(self: FileOps, fd: int) -> None:
        gate.wait(10)
        real_fdatasync(self, fd)

    monkeypatch.setattr(FileOps, "fdatasync", gated_fdatasync)
    return gate


async def test_repeat_of_client_order_id_when_first_not_yet_fsynced_then_answered_after_it(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A repeat writes no record of its own, but its answer names the first
    # reservation: it must not go out before that reservation is durable.
    client = await gw.client(ADMIN)
    gate = hold_fsyncs(monkeypatch)
    params = {
        "account": "A1",
        "symbol": "BTC-USD",
        "side": "buy",
        "qty": "1",
        "price": "100",
        "reserve": True,
        "client_order_id": "X1",
    }
    frames = [
        {"id": 101, "method": "order.validate", "params": params},
        {"id": 102, "method": "order.validate", "params": params},  # the repeat
        {"id": 103, "method": "ping"},
    ]
    for frame in frames:
        await client.ws.send(orjson.dumps(frame), text=True)
    # Answers to a connection go out in order: with the fsync held, the ping
    # is answered, the repeat is not.
    assert (await asyncio.wait_for(client.unmatched.get(), 10))["id"] == 103
    assert client.unmatched.empty()
    gate.set()
    answers = [await asyncio.wait_for(client.unmatched.get(), 10) for _ in range(2)]
    assert sorted(a["id"] for a in answers) == [101, 102]
    assert len({a["result"]["reservation_id"] for a in answers}) == 1


async def test_gateway_own_emergency_change_when_not_yet_fsynced_then_not_pushed(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A position update over max_exposure switches the gateway to reducing by
    # itself; like an admin's change, the push must wait for its fsync.
    gw = await make_gateway(limits={"max_exposure": "1000", "auto_reduce_on_breach": True})
    client = await gw.client(ADMIN)  # has taken the emergency snapshot
    gate = hold_fsyncs(monkeypatch)
    update = {"account": "A1", "symbol": "BTC-USD", "qty": "1", "price": "5000"}
    frames = [
        {"id": 201, "method": "position.update", "params": update},
        {"id": 202, "method": "ping"},
    ]
    for frame in frames:
        await client.ws.send(orjson.dumps(frame), text=True)
    # Pushes and answers go out in order: once the ping is answered, a push
    # made at the update would already be here.
    assert (await asyncio.wait_for(client.unmatched.get(), 10))["id"] == 202
    assert client.channel("emergency").empty()
    # In effect for validations already, though not published.
    buy = {"account": "A2", "symbol": "X", "side": "buy", "qty": "1", "price": "1"}
    decision = await client.ok("order.validate", buy)
    assert "REDUCE_ONLY" in [r["code"] for r in decision["reasons"]]
    assert (await client.ok("emergency.get"))["mode"] == "normal"
    gate.set()
    push = await client.next_push("emergency", timeout=10)
    assert push["data"]["mode"] == "reducing"
    assert push["data"]["actor"] == "gateway"
    assert (await asyncio.wait_for(client.unmatched.get(), 10))["id"] == 201


async def test_cancel_on_disconnect_when_reserved_before_hello_then_released_at_close(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # Every reservation the connection made counts, before the hello too, and
    # it stays so across a crash (recovery releases them like a disconnect).
    state_dir = tmp_path / "state"
    gw = await make_gateway(state_dir=state_dir)
    viewer = await gw.client(VIEWER)
    await viewer.ok("subscribe", {"channels": ["alerts"]})
    await viewer.next_push("alerts")
    trader = await gw.client(TRADER)
    early = await trader.ok("order.validate", {**BUY, "reserve": True})
    await trader.ok("session.hello", {"cancel_on_disconnect": True})
    late = await trader.ok("order.validate", {**BUY, "reserve": True})
    assert early["decision"] == late["decision"] == "accept"
    state = await viewer.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "200"
    # A crash now: both are released at recovery.
    copy = tmp_path / "copy"
    shutil.copytree(state_dir, copy)
    (copy / "LOCK").unlink()
    recovered = RiskEngine(limits=Limits(), now_ms=0)
    Store(recovered, copy, clock=wall_clock_ms).open()
    assert recovered.reservations == {}
    # A close: both are released, with an alert.
    await trader.close()
    while True:
        alert = (await viewer.next_push("alerts", timeout=10))["data"]
        if alert["code"] == "CLIENT_DISCONNECTED":
            break
    assert "released 2 reservation(s)" in alert["message"]
    state = await viewer.ok("state.get", {"account": "A1"})
    assert state["accounts"]["A1"]["reserved_exposure"] == "0"
