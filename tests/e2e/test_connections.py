"""Connections before authentication: what they may hold and what they leave behind.

Each rule is observed from outside, over real sockets: unauthenticated
connections are capped by ``server.max_unauthenticated`` and never take the
place of a client with a valid Bearer token; a handshake that never becomes a
WebSocket leaves nothing behind; any method before authentication answers
``UNAUTHENTICATED``, known or not.
"""

from __future__ import annotations

import asyncio
import gc

import orjson
from websockets.asyncio.server import ServerConnection

from tests.conftest import TRADER, GatewayFactory, RunningGateway
from tests.e2e.test_security import refused_status
from tests.wsclient import TestClient

Raw = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def raw_socket(gw: RunningGateway, first_bytes: bytes) -> Raw:
    """A TCP connection that sends ``first_bytes`` of a handshake and then nothing."""
    reader, writer = await asyncio.open_connection(gw.gateway.host, gw.gateway.port)
    if first_bytes:
        writer.write(first_bytes)
        await writer.drain()
    return reader, writer


async def waiting_for_auth(gw: RunningGateway, count: int) -> list[TestClient]:
    """``count`` open WebSockets that have not authenticated, each known to the gateway."""
    clients = [await gw.client(token=None) for _ in range(count)]
    for client in clients:
        assert (await client.error("ping"))["code"] == "UNAUTHENTICATED"
    return clients


async def closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(5):
            return await reader.read() == b""
    except ConnectionError:
        return True  # aborted: a reset
    except TimeoutError:
        return False


async def test_method_before_auth_when_unknown_then_unauthenticated_not_unknown_method(
    gw: RunningGateway,
) -> None:
    client = await gw.client(token=None)
    for frame in (
        {"id": 1, "method": "no.such.method"},
        {"id": 2, "method": "state.get"},
        {"id": 3, "method": "position.update", "params": {"bogus": 1}},
    ):
        answer = await client.send_raw(orjson.dumps(frame))
        assert answer["id"] == frame["id"]
        assert answer["error"]["code"] == "UNAUTHENTICATED", answer
    # A frame that is not JSON is still BAD_JSON: it names no method.
    assert (await client.send_raw(b"{nope"))["error"]["code"] == "BAD_JSON"
    assert client.ws.close_code is None


async def test_unauthenticated_when_over_max_unauthenticated_then_503_and_bearer_still_connects(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_unauthenticated": 5, "max_connections": 8})
    waiting = await waiting_for_auth(gw, 5)
    # A sixth socket waiting for session.auth would pass the cap.
    assert await refused_status(gw.url) == 503
    # However many half-open handshakes are added, a client with a valid
    # Bearer token still gets in while max_connections allows.
    stalled = [await raw_socket(gw, b"GET /v1/ws HTTP/1.1\r\n") for _ in range(100)]
    trader = await gw.client(TRADER)
    assert (await trader.ok("ping"))["ts"]
    # A browser that authenticates frees its place for the next one.
    first = waiting[0]
    assert (await first.ok("session.auth", {"token": TRADER}))["name"] == "desk-1"
    late = await TestClient.open(gw.url)
    assert (await late.error("ping"))["code"] == "UNAUTHENTICATED"
    await late.close()
    for _reader, writer in stalled:
        writer.close()


async def test_half_open_handshakes_when_over_cap_then_oldest_dropped_not_the_gateway(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_unauthenticated": 20})
    stalled = [await raw_socket(gw, b"") for _ in range(200)]
    # The oldest are closed by the gateway, which holds at most the cap of
    # them (and the newest) at once.
    for reader, _writer in stalled[:150]:
        assert await closed_by_gateway(reader)
    trader = await gw.client(TRADER)
    assert (await trader.ok("ping"))["ts"]
    for _reader, writer in stalled:
        writer.close()


async def test_handshake_with_token_but_no_upgrade_when_repeated_then_nothing_retained(
    gw: RunningGateway,
) -> None:
    def live_connections() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, ServerConnection))

    before = live_connections()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: {gw.gateway.host}\r\nAuthorization: Bearer {TRADER}\r\n\r\n"
    ).encode()
    for _ in range(300):
        reader, writer = await asyncio.open_connection(gw.gateway.host, gw.gateway.port)
        writer.write(request)
        status = await reader.readline()
        assert b" 426 " in status, status
        writer.close()
        await reader.read()  # the gateway closed its side too
    # Every connection object is collected once its socket is gone.
    async with asyncio.timeout(10):
        while live_connections() - before > 10:
            await asyncio.sleep(0.05)


async def test_waiting_sockets_when_they_fill_max_connections_then_bearer_still_connects(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_unauthenticated": 10, "max_connections": 3})
    await waiting_for_auth(gw, 3)  # kept open by the fixture
    # No authenticated connection yet: programs still get in, up to the limit.
    traders = [await gw.client(TRADER) for _ in range(3)]
    assert (await traders[-1].ok("ping"))["ts"]
    auth = {"Authorization": f"Bearer {TRADER}"}
    assert await refused_status(gw.url, additional_headers=auth) == 503
    # And a fourth socket waiting for session.auth is refused too.
    assert await refused_status(gw.url) == 503


async def test_bearer_handshake_when_waiting_sockets_fill_the_cap_then_not_pushed_out(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_unauthenticated": 2})
    await waiting_for_auth(gw, 2)  # kept open by the fixture
    # A program has connected; its request is still on the way.
    reader, writer = await raw_socket(gw, b"")
    # One more socket from someone else must not close it.
    _other_reader, other = await raw_socket(gw, b"")
    writer.write(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: {gw.gateway.host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TRADER}\r\n\r\n"
        ).encode()
    )
    async with asyncio.timeout(5):
        assert b" 101 " in await reader.readline()
    writer.close()
    other.close()
