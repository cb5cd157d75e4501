"""Push channels over real sockets: broadcast, slow consumers, heartbeats."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol.codes import Channel
from tests.conftest import ADMIN, VIEWER, GatewayFactory
from tests.wsclient import TestClient

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
QUIET = {"heartbeat_s": 60}
ORDER = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "1", "price": "100"}


async def test_emergency_changes_when_200_subscribers_then_each_gets_all_once_in_order(
    make_gateway: GatewayFactory,
) -> None:
    async with asyncio.timeout(60):
        gw = await make_gateway(server=QUIET)
        admin = await gw.client(ADMIN)
        subscribers = await asyncio.gather(*(gw.client(VIEWER) for _ in range(199)))
        clients = [admin, *subscribers]
        base = gw.gateway.fanout.seq(Channel.EMERGENCY)
        modes = ["halted", "normal", "reducing", "halted", "normal"]
        for mode in modes:
            await admin.ok("emergency.set", {"mode": mode, "reason": f"drill {mode}"})

        async def received(client: TestClient) -> list[tuple[int, str]]:
            pushes = [await client.next_push("emergency", timeout=20) for _ in modes]
            # Pushes queued before this answer are delivered before it, so
            # anything still to come would be a duplicate.
            await client.ok("ping")
            assert client.channel("emergency").empty()
            assert not any(p.get("snapshot") for p in pushes)
            return [(p["seq"], p["data"]["mode"]) for p in pushes]

        results = await asyncio.gather(*(received(client) for client in clients))
    expected = [(base + i, mode) for i, mode in enumerate(modes, start=1)]
    assert len(results) == 200
    assert all(result == expected for result in results)


async def _slow_client(url: str, token: str) -> ClientConnection:
    """A client that completes the handshake, subscribes, then never reads.

    Its small receive buffer and a one-frame websockets queue make the
    server's output pile up quickly instead of in large kernel buffers.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    ws = await connect(
        url,
        sock=sock,
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
        max_queue=1,
        ping_interval=None,
    )
    await ws.send(
        orjson.dumps({"id": 1, "method": "subscribe", "params": {"channels": ["decisions"]}}),
        text=True,
    )
    return ws


async def _flood_until_evicted(driver: TestClient, watcher: TestClient) -> dict[str, Any]:
    """Validate orders (each one a decision push) until SLOW_CONSUMER is raised.

    Every validation must keep being answered meanwhile.
    """
    alerts = watcher.channel("alerts")
    while True:
        # Spread over accounts so that no account hits its orders-per-second limit.
        orders = [{**ORDER, "account": f"F{n}"} for n in range(50)]
        decisions = await asyncio.gather(*(driver.ok("order.validate", o) for o in orders))
        assert all(d["decision"] == "accept" for d in decisions)
        while not alerts.empty():
            alert = alerts.get_nowait()
            if alert["data"].get("code") == "SLOW_CONSUMER":
                data: dict[str, Any] = alert["data"]
                return data


def _conn_id(alert: dict[str, Any]) -> int:
    found = re.search(r"connection (\d+)", alert["message"])
    assert found is not None, alert
    return int(found.group(1))


async def test_slow_consumer_when_client_stops_reading_then_4003_and_others_served(
    make_gateway: GatewayFactory,
) -> None:
    async with asyncio.timeout(60):
        gw = await make_gateway(
            server={**QUIET, "max_queued_bytes": 64 * 1024},
            persistence={"fsync": "never"},
        )
        watcher = await gw.client(VIEWER)
        await watcher.ok("subscribe", {"channels": ["alerts", "decisions"]})
        await watcher.next_push("alerts")
        await watcher.next_push("decisions")
        driver = await gw.client(ADMIN)
        slow = await _slow_client(gw.url, VIEWER)

        alert = await _flood_until_evicted(driver, watcher)
        assert alert["level"] == "warning"
        assert re.search(r"\d+ bytes queued", alert["message"])

        # Reading again, the client finds the close frame behind what was queued.
        closed: ConnectionClosed | None = None
        try:
            while True:
                await slow.recv()
        except ConnectionClosed as exc:
            closed = exc
        assert closed.rcvd is not None
        assert closed.rcvd.code == 4003
        assert closed.rcvd.reason == "slow consumer"
        assert gw.gateway.fanout.stats()["evictions"] == 1

        # The other subscriber is still served, in order, with no gap.
        decisions = watcher.channel("decisions")
        last = None
        while not decisions.empty():
            push = decisions.get_nowait()
            assert last is None or push["seq"] == last + 1
            last = push["seq"]
        await driver.ok("order.validate", ORDER)
        push = await watcher.next_push("decisions")
        assert last is not None and push["seq"] > last


async def test_slow_consumer_when_client_never_reads_then_server_drops_connection(
    make_gateway: GatewayFactory,
) -> None:
    async with asyncio.timeout(60):
        gw = await make_gateway(
            server={**QUIET, "max_queued_bytes": 64 * 1024},
            persistence={"fsync": "never"},
        )
        watcher = await gw.client(VIEWER)
        await watcher.ok("subscribe", {"channels": ["alerts"]})
        await watcher.next_push("alerts")
        driver = await gw.client(ADMIN)
        slow = await _slow_client(gw.url, VIEWER)

        alert = await _flood_until_evicted(driver, watcher)
        # Eviction gives the client about a second to complete the closing
        # handshake, so its session is normally still there to watch.
        session = gw.gateway.sessions.get(_conn_id(alert))
        if session is not None:
            # The client never completes the closing handshake: the server
            # must drop the TCP connection itself, long before any keepalive.
            async with asyncio.timeout(10):
                await session.ws.wait_closed()
            assert session.ws.protocol.close_sent is not None
            assert session.ws.protocol.close_sent.code == 4003
        assert _conn_id(alert) not in gw.gateway.sessions
        assert await driver.ok("ping")
        slow.transport.abort()


async def test_heartbeat_when_configured_then_they_keep_coming_with_current_seqs(
    make_gateway: GatewayFactory,
) -> None:
    # The period itself is a timing figure: riskctl bench measures it
    # (section 5, "heartbeat interval at the subscribers").
    period = 0.2
    beats = 10
    async with asyncio.timeout(30):
        gw = await make_gateway(server={"heartbeat_s": period})
        admin = await gw.client(ADMIN)
        assert (await admin.ok("session.hello"))["heartbeat_s"] == period
        await admin.ok("emergency.set", {"mode": "halted", "reason": "heartbeat test"})
        change = await admin.next_push("emergency")
        heartbeats = admin.channel("heartbeat")
        while not heartbeats.empty():  # beats sent before the change
            heartbeats.get_nowait()
        received = [await admin.next_push("heartbeat") for _ in range(beats + 1)]
    for beat in received:
        assert "seq" not in beat
        assert ISO_MS.fullmatch(beat["data"]["ts"])
        seqs = beat["data"]["seqs"]
        assert set(seqs) == {"emergency", "alerts", "exposure", "decisions"}
        assert seqs["emergency"] == change["seq"]
