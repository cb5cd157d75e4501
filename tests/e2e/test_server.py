"""The gateway over a real socket: auth, roles, validation, emergency pushes, errors."""

from __future__ import annotations

import asyncio
import http.client
from decimal import Decimal
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.net import session as net_session
from gateway.net import wsio
from protocol.messages import PositionEntry, PositionSnapshot
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, GatewayFactory, RunningGateway
from tests.wsclient import TestClient

ORDER = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "2", "price": "50000"}


def http_get(gw: RunningGateway, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.gateway.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_handshake_when_token_is_wrong_then_http_401(gw: RunningGateway) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(gw.url, additional_headers={"Authorization": "Bearer nope"})
    assert info.value.response.status_code == 401


async def test_connect_when_token_is_right_then_emergency_snapshot_is_pushed_first(
    gw: RunningGateway,
) -> None:
    client = await TestClient.open(gw.url, TRADER)
    push = await client.next_push("emergency")
    assert push["snapshot"] is True
    assert push["data"]["mode"] == "normal"
    assert push["seq"] >= 0
    await client.close()


async def test_session_auth_when_token_is_right_then_role_and_snapshot(gw: RunningGateway) -> None:
    client = await gw.client(token=None)
    assert (await client.error("state.get"))["code"] == "UNAUTHENTICATED"
    result = await client.ok("session.auth", {"token": TRADER})
    assert result == {"role": "trader", "accounts": ["A1", "A2"], "name": "desk-1"}
    push = await client.next_push("emergency")
    assert push["data"]["mode"] == "normal"
    assert (await client.ok("order.validate", ORDER))["decision"] == "accept"


async def test_session_auth_when_token_is_wrong_then_unauthenticated_and_4001(
    gw: RunningGateway,
) -> None:
    client = await gw.client(token=None)
    error = await client.error("session.auth", {"token": "wrong"})
    assert error["code"] == "UNAUTHENTICATED"
    await asyncio.wait_for(client.ws.wait_closed(), 5)
    assert client.ws.close_code == 4001


async def test_connection_when_no_auth_before_deadline_then_closed_4001(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"auth_timeout_s": 0.2})
    client = await gw.client(token=None)
    await asyncio.wait_for(client.ws.wait_closed(), 5)
    assert client.ws.close_code == 4001


async def test_validate_when_within_limits_then_accept_with_exposure(gw: RunningGateway) -> None:
    client = await gw.client(TRADER)
    decision = await client.ok("order.validate", ORDER)
    assert decision["decision"] == "accept"
    assert decision["reasons"] == []
    assert decision["reservation_id"] is None
    assert decision["exposure"] == {
        "account": "0",
        "account_limit": "1000000",
        "global": "0",
        "global_limit": "1000000",
    }


@pytest.mark.parametrize("paused", [False, True], ids=["idle", "transport-paused"])
async def test_validate_when_subscribed_to_decisions_then_answer_before_its_push(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, paused: bool
) -> None:
    if paused:
        # The transport goes over its high-water mark just as the answer is
        # about to be written, and drains on the next turn of the loop.
        answer = net_session.Session.answer

        def answer_while_paused(session: net_session.Session, frame: bytes) -> None:
            if b'"decision"' in frame and not wsio.is_write_paused(session.ws):
                session.ws.pause_writing()
                asyncio.get_running_loop().call_soon(session.ws.resume_writing)
            answer(session, frame)

        monkeypatch.setattr(net_session.Session, "answer", answer_while_paused)
    async with connect(
        gw.url, additional_headers={"Authorization": f"Bearer {ADMIN}"}, compression=None
    ) as ws:

        async def frames_until_push() -> list[tuple[str, Any]]:
            """Frames in the order they arrived, up to a validation's push."""
            seen: list[tuple[str, Any]] = []
            while True:
                msg = orjson.loads(await ws.recv())
                if msg.get("channel") != "emergency":
                    seen.append((msg.get("channel", "answer"), msg.get("id", msg.get("seq"))))
                if msg.get("channel") == "decisions" and not msg.get("snapshot"):
                    return seen

        subscribe = {"id": 1, "method": "subscribe", "params": {"channels": ["decisions"]}}
        await ws.send(orjson.dumps(subscribe), text=True)
        for request_id in (2, 3, 4):
            order = {"id": request_id, "method": "order.validate", "params": ORDER}
            await ws.send(orjson.dumps(order), text=True)
            seen = await frames_until_push()
            # The subscribe's answer and snapshot come before the first validation's.
            assert seen[-2:] == [("answer", request_id), ("decisions", seen[-1][1])], seen
        # Each answered once: the next answer is the ping's.
        await ws.send(orjson.dumps({"id": 5, "method": "ping"}), text=True)
        msg = orjson.loads(await ws.recv())
        while msg.get("channel") == "emergency":
            msg = orjson.loads(await ws.recv())
        assert msg["id"] == 5, msg


async def test_validate_when_over_limits_then_every_reason_listed(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(limits={"max_exposure": "1000", "max_account_exposure": "800"})
    client = await gw.client(TRADER)
    decision = await client.ok(
        "order.validate",
        {"account": "A1", "symbol": "X", "side": "buy", "qty": "11", "price": "100"},
    )
    assert decision["decision"] == "reject"
    codes = [r["code"] for r in decision["reasons"]]
    assert codes == ["MAX_EXPOSURE", "MAX_ACCOUNT_EXPOSURE"]
    assert decision["reasons"][0]["message"] == "gross exposure would be 1100, limit 1000"


async def test_trader_when_other_account_then_forbidden(gw: RunningGateway) -> None:
    client = await gw.client(TRADER_B)
    error = await client.error("order.validate", ORDER)
    assert error["code"] == "FORBIDDEN"
    error = await client.error(
        "position.update", {"account": "A1", "symbol": "X", "qty": "1", "price": "1"}
    )
    assert error["code"] == "FORBIDDEN"
    assert (await client.error("state.get", {"account": "A1"}))["code"] == "FORBIDDEN"


async def test_trader_when_emergency_set_then_forbidden_and_mode_unchanged(
    gw: RunningGateway,
) -> None:
    client = await gw.client(TRADER)
    error = await client.error("emergency.set", {"mode": "halted", "reason": "x"})
    assert error["code"] == "FORBIDDEN"
    assert (await client.ok("emergency.get"))["mode"] == "normal"


async def test_viewer_when_writing_then_forbidden(gw: RunningGateway) -> None:
    client = await gw.client(VIEWER)
    update = {"account": "A1", "symbol": "X", "qty": "1", "price": "1"}
    assert (await client.error("position.update", update))["code"] == "FORBIDDEN"
    assert (await client.error("order.validate", ORDER))["code"] == "FORBIDDEN"
    assert (await client.error("limits.set", {"version": 1, "limits": {}}))["code"] == "FORBIDDEN"
    state = await client.ok("state.get")
    assert state["accounts"] == {}


async def test_emergency_set_when_halted_then_every_client_gets_push_and_orders_rejected(
    gw: RunningGateway,
) -> None:
    admin = await gw.client(ADMIN)
    watchers = [await gw.client(t) for t in (TRADER, TRADER_B, VIEWER)]
    result = await admin.ok("emergency.set", {"mode": "halted", "reason": "exchange outage"})
    assert result["mode"] == "halted"
    assert result["actor"] == "admin"
    assert result["version"] == 1
    for client in [admin, *watchers]:
        push = await client.next_push("emergency")
        assert push["data"]["mode"] == "halted"
        assert push["data"]["reason"] == "exchange outage"
        assert "snapshot" not in push
    decision = await watchers[0].ok("order.validate", ORDER)
    assert decision["decision"] == "reject"
    assert [r["code"] for r in decision["reasons"]] == ["EMERGENCY_HALTED"]
    assert decision["emergency_version"] == 1


async def test_emergency_set_when_same_mode_then_nothing_changes(gw: RunningGateway) -> None:
    admin = await gw.client(ADMIN)
    first = await admin.ok("emergency.set", {"mode": "reducing", "reason": "review"})
    again = await admin.ok("emergency.set", {"mode": "reducing", "reason": "other words"})
    assert again == first
    # Pushes queued before an answer are delivered before it: after this
    # ping, any push of the second change would already be here.
    await admin.ok("ping")
    assert (await admin.next_push("emergency"))["data"]["version"] == 1
    assert admin.channel("emergency").empty()


async def test_emergency_set_when_account_scoped_then_only_that_account_is_blocked(
    gw: RunningGateway,
) -> None:
    admin = await gw.client(ADMIN)
    trader = await gw.client(TRADER)
    view = await admin.ok(
        "emergency.set", {"mode": "halted", "reason": "desk review", "account": "A1"}
    )
    assert view["mode"] == "normal"
    assert view["accounts"]["A1"]["mode"] == "halted"
    a1 = await trader.ok("order.validate", ORDER)
    a2 = await trader.ok("order.validate", {**ORDER, "account": "A2"})
    assert [r["code"] for r in a1["reasons"]] == ["ACCOUNT_HALTED"]
    assert a2["decision"] == "accept"


async def test_emergency_set_when_reason_missing_then_bad_request(gw: RunningGateway) -> None:
    admin = await gw.client(ADMIN)
    error = await admin.error("emergency.set", {"mode": "halted"})
    assert error["code"] == "BAD_REQUEST"
    assert "params.reason" in error["message"]


async def test_frame_when_not_json_then_id_null_and_connection_still_usable(
    gw: RunningGateway,
) -> None:
    client = await gw.client(TRADER)
    response = await client.send_raw(b"{not json")
    assert response["id"] is None
    assert response["error"]["code"] == "BAD_JSON"
    response = await client.send_raw(orjson.dumps({"id": 5, "method": "nope"}))
    assert response == {
        "id": 5,
        "status": "error",
        "error": {"code": "UNKNOWN_METHOD", "message": 'unknown method "nope"'},
    }
    assert (await client.ok("order.validate", ORDER))["decision"] == "accept"


async def test_params_when_key_misspelt_then_bad_request_naming_it(gw: RunningGateway) -> None:
    client = await gw.client(TRADER)
    params = {**ORDER, "quantity": "2"}
    error = await client.error("order.validate", params)
    assert error["code"] == "BAD_REQUEST"
    assert "params.quantity" in error["message"]


async def test_binary_frame_when_utf8_json_then_answered(gw: RunningGateway) -> None:
    client = await gw.client(TRADER)
    await client.ws.send(orjson.dumps({"id": "b1", "method": "ping"}), text=False)
    response = await asyncio.wait_for(client.unmatched.get(), 5)
    assert response["id"] == "b1"
    assert response["status"] == "ok"


async def test_position_update_then_state_and_exposure_reflect_it(gw: RunningGateway) -> None:
    client = await gw.client(TRADER)
    result = await client.ok(
        "position.update", {"account": "A1", "symbol": "BTC-USD", "qty": "-2", "price": "50000"}
    )
    assert result == {
        "account": "A1",
        "symbol": "BTC-USD",
        "qty": "-2",
        "price": "50000",
        "exposure": "100000",
    }
    state = await client.ok("state.get")
    assert state["accounts"]["A1"]["positions"] == {"BTC-USD": {"qty": "-2", "price": "50000"}}
    assert state["accounts"]["A1"]["gross_exposure"] == "100000"
    assert state["gross_exposure"] == "100000"
    other = await gw.client(TRADER_B)
    assert (await other.ok("state.get"))["accounts"] == {}


async def test_limits_get_then_version_and_wire_limits(gw: RunningGateway) -> None:
    client = await gw.client(VIEWER)
    result = await client.ok("limits.get")
    assert result["version"] == 1
    assert result["limits"]["max_exposure"] == "1000000"
    assert result["limits"]["price_collar"] == "0.1"


async def test_session_hello_then_protocol_epoch_and_emergency(gw: RunningGateway) -> None:
    client = await gw.client(TRADER)
    hello = await client.ok("session.hello", {"cancel_on_disconnect": True})
    assert hello["protocol"] == 1
    assert hello["role"] == "trader"
    assert hello["accounts"] == ["A1", "A2"]
    assert isinstance(hello["epoch"], int)
    assert hello["emergency"]["mode"] == "normal"


async def test_healthz_then_json_with_mode(gw: RunningGateway) -> None:
    status, body = await asyncio.to_thread(http_get, gw, "/healthz")
    assert status == 200
    assert orjson.loads(body) == {"status": "ok", "mode": "normal"}
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "drill"})
    status, body = await asyncio.to_thread(http_get, gw, "/healthz")
    assert orjson.loads(body)["mode"] == "halted"


async def test_origin_when_not_allowed_then_http_403(gw: RunningGateway) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(gw.url, origin="http://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    own = f"http://127.0.0.1:{gw.gateway.port}"
    client = await gw.client(ADMIN, origin=own)
    assert (await client.ok("ping"))["ts"].endswith("Z")


async def test_frame_when_too_large_then_closed_1009(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(server={"max_message_bytes": 1024})
    client = await gw.client(TRADER)
    await client.ws.send("x" * 2048)
    await asyncio.wait_for(client.ws.wait_closed(), 5)
    assert client.ws.close_code == 1009


async def test_emergency_change_when_restarted_then_still_halted(
    make_gateway: GatewayFactory, tmp_path
) -> None:
    state_dir = tmp_path / "durable"
    gw = await make_gateway(state_dir=state_dir)
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "exchange outage"})
    await gw.close_clients()
    await gw.gateway.stop()
    again = await make_gateway(state_dir=state_dir)
    client = await again.client(VIEWER)
    view = await client.ok("emergency.get")
    assert (view["mode"], view["reason"], view["actor"]) == ("halted", "exchange outage", "admin")


async def test_connection_when_closed_by_server_then_client_sees_it(gw: RunningGateway) -> None:
    client = await gw.client(TRADER)
    await gw.gateway.stop()
    with pytest.raises(ConnectionClosed):
        await client.call("ping", timeout=2)
    assert client.ws.close_code == 1001


async def test_state_when_account_only_validated_then_absent_until_it_holds_something(
    gw: RunningGateway,
) -> None:
    trader = await gw.client(TRADER)
    await trader.ok("order.validate", {**ORDER, "account": "A2"})
    assert "A2" not in (await trader.ok("state.get"))["accounts"]
    decision = await trader.ok("order.validate", {**ORDER, "account": "A2", "reserve": True})
    await trader.ok("reservation.release", {"reservation_id": decision["reservation_id"]})
    shown = (await trader.ok("state.get"))["accounts"]["A2"]
    assert shown["gross_exposure"] == "0"


# ------------------------------------------------------- pipelined bursts


async def test_pipelined_burst_when_client_reads_then_every_answer_and_no_eviction(
    gw: RunningGateway,
) -> None:
    # Eight state.get in one write, each answer about 150 KB: 1.2 MB in all,
    # more than max_queued_bytes (1 MiB). Answers held for one write must not
    # count the client as a slow consumer while it reads.
    manager = gw.gateway.engine
    for a in range(4):
        entries = tuple(
            PositionEntry(symbol=f"SYMBOL-{i:05d}", qty=Decimal(1), price=Decimal(1))
            for i in range(1000)
        )
        manager.snapshot_positions(
            PositionSnapshot(account=f"ACC{a}", positions=entries), gw.gateway.clock()
        )
    gw.gateway.service.commit_and_publish()
    ws = await connect(
        gw.url, additional_headers={"Authorization": f"Bearer {ADMIN}"}, max_size=None
    )
    await ws.recv()  # the emergency snapshot
    for i in range(8):
        ws.protocol.send_text(orjson.dumps({"id": i, "method": "state.get"}))
    ws.send_data()
    answers: list[dict[str, Any]] = []
    while len(answers) < 8:
        message = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
        if "id" in message:
            answers.append(message)
    assert [m["id"] for m in answers] == list(range(8))
    assert all(len(m["result"]["accounts"]) == 4 for m in answers)
    assert gw.gateway.fanout.evictions == 0
    await ws.close()


async def test_session_auth_when_wrong_and_more_frames_behind_then_answer_before_4001(
    gw: RunningGateway,
) -> None:
    ws = await connect(gw.url)
    # Two frames in one write: the answer to the first is held for the burst
    # and must still go out before the close.
    ws.protocol.send_text(
        orjson.dumps({"id": 1, "method": "session.auth", "params": {"token": "no"}})
    )
    ws.protocol.send_text(orjson.dumps({"id": 2, "method": "ping"}))
    ws.send_data()
    received = []
    with pytest.raises(ConnectionClosed):
        while True:
            received.append(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert [m["id"] for m in received] == [1]
    assert received[0]["error"]["code"] == "UNAUTHENTICATED"
    assert ws.close_code == 4001
