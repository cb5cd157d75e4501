"""GatewayClient against a real in-process gateway, and against a scripted fake
server for what a real gateway does not do on demand (seq gaps, silence, 4001)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from clients.client import (
    AuthenticationError,
    GatewayClient,
    GatewayError,
    Push,
    PushStream,
    backoff_delay,
    decimal_text,
)
from protocol.codes import AlertCode, AlertLevel, Channel
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, GatewayFactory, RunningGateway

ORDER = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "2", "price": "50000"}


async def next_push(stream: PushStream) -> Push:
    async with asyncio.timeout(5):
        return await stream.get()


def raise_alert(gw: RunningGateway, message: str) -> None:
    """Publish one alert at once, without awaiting (so no reconnect can interleave)."""
    gw.manager.raise_alert(
        AlertLevel.INFO, AlertCode.LIMITS_CHANGED, message, now_ms=gw.gateway.clock()
    )
    gw.gateway.fanout.publish(gw.manager.drain_events())


async def close_server_side(gw: RunningGateway, name: str, code: int = 1012) -> None:
    sessions = [
        s
        for s in gw.gateway.sessions.values()
        if s.principal is not None and s.principal.name == name
    ]
    assert len(sessions) == 1
    await sessions[0].ws.close(code, "test closes the connection")


# ------------------------------------------------------------ pure helpers


def test_decimal_text_when_decimal_int_or_str_then_plain_string() -> None:
    assert decimal_text(Decimal("1E+3")) == "1000"
    assert decimal_text(Decimal("0.10")) == "0.10"
    assert decimal_text(7) == "7"
    assert decimal_text("12.5") == "12.5"
    with pytest.raises(TypeError):
        decimal_text(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decimal_text(Decimal("NaN"))


def test_backoff_delay_when_attempts_grow_then_full_jitter_under_capped_exponential() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(5.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jitter spans the range, not a fixed delay
    assert max(backoff_delay(100, rng=rng) for _ in range(200)) <= 5.0


# ------------------------------------------------------ against a gateway


async def test_request_when_ok_then_result_and_decimals_go_as_strings(gw: RunningGateway) -> None:
    client = GatewayClient(gw.url, TRADER)
    assert not client.connected
    async with asyncio.timeout(10), client:
        assert client.connected
        assert client.session is not None
        assert client.session["role"] == "trader"
        update = await client.update_position("A1", "BTC-USD", Decimal("1.50"), 50000)
        assert update["qty"] == "1.5"
        assert update["exposure"] == "75000"
        decision = await client.validate("A1", "BTC-USD", "buy", Decimal("2"), "50000")
        assert decision["decision"] == "accept"
        decision = await client.validate("A1", "BTC-USD", "buy", 1, "70000")
        assert decision["decision"] == "reject"
        assert [r["code"] for r in decision["reasons"]] == ["PRICE_COLLAR"]
        state = await client.state("A1")
        assert state["accounts"]["A1"]["positions"]["BTC-USD"] == {"qty": "1.5", "price": "50000"}
    assert not client.connected
    with pytest.raises(ConnectionError):
        await client.ping()


async def test_request_when_error_response_then_gateway_error_with_code(
    gw: RunningGateway,
) -> None:
    async with asyncio.timeout(10):
        async with GatewayClient(gw.url, ADMIN) as admin:
            with pytest.raises(GatewayError) as info:
                await admin.emergency_set("halted", "")
            assert info.value.code == "BAD_REQUEST"
            assert "params.reason" in info.value.message
            with pytest.raises(GatewayError) as info:
                await admin.request("order.validate", {**ORDER, "quantity": "2"})
            assert info.value.code == "BAD_REQUEST"
            with pytest.raises(GatewayError) as info:
                await admin.limits_set(99, {"max_exposure": "5"})
            assert info.value.code == "CONFLICT"
            assert admin.connected  # a refused request never closes the connection
        async with GatewayClient(gw.url, TRADER_B) as trader:
            with pytest.raises(GatewayError) as info:
                await trader.validate("A1", "BTC-USD", "buy", 1, 50000)
            assert info.value.code == "FORBIDDEN"


async def test_history_when_asked_then_the_charts_last_minutes_scoped_to_the_caller(
    gw: RunningGateway,
) -> None:
    async with asyncio.timeout(10), GatewayClient(gw.url, TRADER) as trader:
        await trader.update_position("A1", "BTC-USD", 1, 50000)
        await trader.validate("A1", "BTC-USD", "sell", 1, 50000)
        async with GatewayClient(gw.url, ADMIN) as admin:
            seen = await admin.history()
        assert seen["window_s"] == 900 and sum(p[1] for p in seen["decisions"]) == 1
        mine = await trader.history()
        assert set(mine["accounts"]) <= {"A1", "A2"} and "decisions" not in mine


async def test_emergency_property_when_admin_changes_mode_then_follows_pushes(
    gw: RunningGateway,
) -> None:
    async with asyncio.timeout(10), GatewayClient(gw.url, TRADER) as trader:
        assert trader.emergency is not None
        assert trader.emergency["mode"] == "normal"
        seen: list[str] = []
        trader.on("emergency", lambda push: seen.append(push.data["mode"]))
        stream = trader.pushes("emergency")
        async with GatewayClient(gw.url, ADMIN) as admin:
            await admin.emergency_set("halted", "exchange outage")
            push = await next_push(stream)
            assert push.data["mode"] == "halted"
            assert trader.emergency["mode"] == "halted"
            assert trader.emergency["reason"] == "exchange outage"
            assert trader.emergency["actor"] == "admin"
            await admin.emergency_set("normal")
            assert (await next_push(stream)).data["mode"] == "normal"
        assert trader.emergency["mode"] == "normal"
        assert seen == ["halted", "normal"]


async def test_connect_when_token_wrong_then_authentication_error(gw: RunningGateway) -> None:
    async with asyncio.timeout(10):
        with pytest.raises(AuthenticationError) as info:
            async with GatewayClient(gw.url, "wrong-token"):
                pass
    assert "HTTP 401" in str(info.value)


async def test_connect_when_nothing_listens_then_connection_error(gw: RunningGateway) -> None:
    port = gw.gateway.port
    await gw.gateway.stop()
    async with asyncio.timeout(10):
        with pytest.raises(ConnectionError) as info:
            async with GatewayClient(f"ws://127.0.0.1:{port}/v1/ws", ADMIN):
                pass
    assert "connection refused" in str(info.value)


async def test_reconnect_when_server_closes_then_resume_delivers_missed_events(
    gw: RunningGateway,
) -> None:
    client = GatewayClient(gw.url, VIEWER, subscribe=["alerts"])
    alerts = client.pushes("alerts")

    def on_connection(connected: bool) -> None:
        if not connected:
            # Runs as the drop is noticed, before any reconnect attempt.
            raise_alert(gw, "missed while away 1")
            raise_alert(gw, "missed while away 2")

    client.on_connection_change(on_connection)
    async with asyncio.timeout(10), client:
        snapshot = await next_push(alerts)
        assert snapshot.snapshot
        raise_alert(gw, "before the drop")
        before = await next_push(alerts)
        assert before.data["message"] == "before the drop"
        await close_server_side(gw, "viewer")
        first, second = await next_push(alerts), await next_push(alerts)
        assert not first.snapshot and not second.snapshot
        assert first.seq == before.seq + 1 and second.seq == before.seq + 2  # type: ignore[operator]
        assert [first.data["message"], second.data["message"]] == [
            "missed while away 1",
            "missed while away 2",
        ]
        await client.wait_connected()
        assert client.reconnects == 1
        assert (await client.emergency_get())["mode"] == "normal"


async def test_reconnect_when_gateway_restarts_then_new_epoch_takes_snapshot(
    make_gateway: GatewayFactory, tmp_path: Any
) -> None:
    gw = await make_gateway(state_dir=tmp_path / "state")
    port = gw.gateway.port
    client = GatewayClient(gw.url, ADMIN, subscribe=["alerts"])
    alerts = client.pushes("alerts")
    async with asyncio.timeout(20), client:
        assert (await next_push(alerts)).snapshot
        for n in range(3):
            raise_alert(gw, f"old {n}")
            await next_push(alerts)
        old_epoch = client.session["epoch"]  # type: ignore[index]
        await gw.gateway.stop()
        restarted = await make_gateway(state_dir=tmp_path / "state", server={"port": port})
        for n in range(5):  # before the client is back: the new run's seqs 1..5
            raise_alert(restarted, f"new {n}")
        # Resuming from seq 3 of the old run would deliver only the new run's 4 and 5.
        snapshot = await next_push(alerts)
        assert snapshot.snapshot
        assert snapshot.seq == restarted.gateway.fanout.seq(Channel.ALERTS)
        messages = [alert["message"] for alert in snapshot.data["alerts"]]
        assert [f"new {n}" for n in range(5)] == [m for m in messages if m.startswith("new")]
        assert client.session["epoch"] != old_epoch  # type: ignore[index]
        raise_alert(restarted, "new 5")
        push = await next_push(alerts)
        assert push.data["message"] == "new 5"
        assert push.seq == snapshot.seq + 1


async def test_cancel_on_disconnect_when_connection_closes_then_reservations_released(
    gw: RunningGateway,
) -> None:
    async with asyncio.timeout(10), GatewayClient(gw.url, ADMIN, subscribe=["alerts"]) as admin:
        alerts = admin.pushes("alerts")
        async with GatewayClient(gw.url, TRADER, cancel_on_disconnect=True) as trader:
            decision = await trader.validate("A1", "BTC-USD", "buy", 1, 50000, reserve=True)
            assert decision["reservation_id"] is not None
            state = await admin.state("A1")
            assert state["accounts"]["A1"]["reserved_exposure"] == "50000"
        while (await next_push(alerts)).data.get("code") != "CLIENT_DISCONNECTED":
            pass
        state = await admin.state("A1")
        assert state["accounts"]["A1"]["reserved_exposure"] == "0"


# --------------------------------------------------- against a fake server

Handler = Callable[["FakeGateway", ServerConnection, dict[str, Any]], Awaitable[None]]

HELLO = {
    "protocol": 1,
    "server": "fake",
    "epoch": 1,
    "role": "admin",
    "accounts": [],
    "name": "admin",
    "heartbeat_s": 1,
}
EMERGENCY = {"mode": "normal", "reason": "", "actor": "gateway", "since": "-", "version": 0}


class FakeGateway:
    """Speaks just enough of the protocol; ``on_request`` scripts the rest."""

    def __init__(self, on_request: Handler, *, role: str = "admin") -> None:
        self.on_request = on_request
        self.hello = {**HELLO, "role": role, "emergency": EMERGENCY}
        self.requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.connections = 0
        self.subscribes = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        await push(ws, "emergency", 1, EMERGENCY, snapshot=True)
        with contextlib.suppress(Exception):
            async for raw in ws:
                request = orjson.loads(raw)
                self.requests.put_nowait(request)
                if request["method"] == "session.hello":
                    await reply(ws, request, self.hello)
                else:
                    await self.on_request(self, ws, request)

    async def next_request(self, method: str) -> dict[str, Any]:
        async with asyncio.timeout(5):
            while True:
                request = await self.requests.get()
                if request["method"] == method:
                    return request


async def reply(ws: ServerConnection, request: dict[str, Any], result: dict[str, Any]) -> None:
    await ws.send(orjson.dumps({"id": request["id"], "status": "ok", "result": result}))


async def push(
    ws: ServerConnection, channel: str, seq: int, data: dict[str, Any], *, snapshot: bool = False
) -> None:
    frame: dict[str, Any] = {"channel": channel, "seq": seq, "data": data}
    if snapshot:
        frame["snapshot"] = True
    await ws.send(orjson.dumps(frame))


@contextlib.asynccontextmanager
async def fake_gateway(on_request: Handler, **kwargs: Any) -> AsyncIterator[FakeGateway]:
    fake = FakeGateway(on_request, **kwargs)
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        fake.port = next(iter(server.sockets)).getsockname()[1]
        yield fake


async def silent(_fake: FakeGateway, _ws: ServerConnection, _request: dict[str, Any]) -> None:
    """Answers nothing."""


async def test_request_when_no_answer_then_timeout_error() -> None:
    async with (
        asyncio.timeout(10),
        fake_gateway(silent) as fake,
        GatewayClient(fake.url, "t") as client,
    ):
        # Shorten only the request under test: the handshake keeps its own time.
        client.request_timeout = 0.2
        with pytest.raises(TimeoutError):
            await client.request("ping")
        assert client.connected  # a slow answer is not a broken connection


async def test_request_when_connection_drops_while_waiting_then_connection_error() -> None:
    async def close_on_ping(_f: FakeGateway, ws: ServerConnection, req: dict[str, Any]) -> None:
        if req["method"] == "ping":
            await ws.close(1011, "boom")

    async with (
        asyncio.timeout(10),
        fake_gateway(close_on_ping) as fake,
        GatewayClient(fake.url, "t", reconnect=False) as client,
    ):
        with pytest.raises(ConnectionError) as info:
            await client.request("ping")
        assert "1011" in str(info.value)
        with pytest.raises(ConnectionError):
            await client.request("ping")


async def test_close_when_code_4001_then_no_reconnect_and_authentication_error() -> None:
    async def close_4001(_f: FakeGateway, ws: ServerConnection, _req: dict[str, Any]) -> None:
        await ws.close(4001, "authentication failed")

    async with asyncio.timeout(10), fake_gateway(close_4001) as fake:
        client = GatewayClient(fake.url, "t")
        async with client:
            stream = client.pushes("alerts")
            with pytest.raises(ConnectionError):
                await client.request("ping")
            async for _ in stream:  # ends once the client has stopped
                pass
            assert isinstance(client.failure, AuthenticationError)
            with pytest.raises(AuthenticationError):
                await client.request("ping")
        assert fake.connections == 1


async def gap_script(fake: FakeGateway, ws: ServerConnection, request: dict[str, Any]) -> None:
    """alerts: snapshot 1, then 2, then 5 (a gap); the re-subscribe gets snapshot 5, then 6."""
    if request["method"] != "subscribe":
        await reply(ws, request, {})
        return
    fake.subscribes += 1
    channel = request["params"]["channels"][0]
    await reply(ws, request, {"channels": {channel: {"seq": 1}}})
    if fake.subscribes == 1:
        await push(ws, channel, 1, {"n": 1}, snapshot=True)
        await push(ws, channel, 2, {"n": 2})
        await push(ws, channel, 5, {"n": 5})
    else:
        await push(ws, channel, 5, {"n": 5}, snapshot=True)
        await push(ws, channel, 6, {"n": 6})


async def test_push_when_seq_gap_then_resubscribes_without_resume_for_a_snapshot() -> None:
    async with asyncio.timeout(10), fake_gateway(gap_script) as fake:
        client = GatewayClient(fake.url, "t", subscribe=["alerts"])
        stream = client.pushes("alerts")
        async with client:
            first = await fake.next_request("subscribe")
            assert "resume" not in first["params"]
            got = [await next_push(stream) for _ in range(4)]
            assert [(p.seq, p.snapshot) for p in got] == [
                (1, True),
                (2, False),
                (5, True),
                (6, False),
            ]
            again = await fake.next_request("subscribe")
            assert again["params"] == {"channels": ["alerts"]}
            assert client.last_seqs["alerts"] == 6


async def test_push_when_trader_exposure_seq_jumps_then_no_resubscribe() -> None:
    async def script(fake: FakeGateway, ws: ServerConnection, request: dict[str, Any]) -> None:
        await reply(ws, request, {"channels": {"exposure": {"seq": 1}}})
        await push(ws, "exposure", 1, {"accounts": {}}, snapshot=True)
        await push(ws, "exposure", 4, {"account": "A1"})
        await push(ws, "exposure", 9, {"account": "A1"})

    async with asyncio.timeout(10), fake_gateway(script, role="trader") as fake:
        client = GatewayClient(fake.url, "t", subscribe=["exposure"])
        stream = client.pushes("exposure")
        async with client:
            got = [await next_push(stream) for _ in range(3)]
            assert [p.seq for p in got] == [1, 4, 9]
            await client.request("ping")  # answered after any re-subscribe would be sent
            methods = []
            while not fake.requests.empty():
                methods.append(fake.requests.get_nowait()["method"])
            assert methods.count("subscribe") == 1  # the initial one only
