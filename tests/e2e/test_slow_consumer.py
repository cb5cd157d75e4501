"""Close 4003 only for a client that stopped reading (docs/protocol.md, section 7).

The client here is a real socket with a 4 KiB receive buffer, driven through
websockets' sans-I/O ``ClientProtocol`` so the test decides exactly how fast
it reads. A client that keeps reading, however slowly and however large one
answer is, is never closed 4003; one that stops is closed once none of its
output was taken for ``server.slow_consumer_ms``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from gateway.fanout import Delivery, Flusher, Outbox
from gateway.net.ratelimit import FrameRateLimiter
from gateway.net.session import Session
from tests.conftest import ADMIN, VIEWER, GatewayFactory, RunningGateway
from tests.fanout.builders import FakeWs, patch_wsio

READ_CHUNK = 4096
#: 500 positions each: a state.get of about 5.6 MB, more than the kernel's
#: socket buffers hold (up to 4 MB on loopback), so the rest stays in the
#: gateway's own output, over max_queued_bytes.
ACCOUNTS = 220


class PacedClient:
    """A WebSocket client that reads only when told to."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READ_CHUNK)
        self.sock.setblocking(False)
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.received = 0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        uri = parse_uri(self.url)
        await loop.sock_connect(self.sock, (uri.host, uri.port))
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {self.token}"
        self.protocol.send_request(request)
        await self._flush()
        async with asyncio.timeout(10):
            while self.protocol.state is State.CONNECTING:
                await self.read_some()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.protocol.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def send(self, frame: dict[str, Any]) -> None:
        self.protocol.send_text(orjson.dumps(frame))
        await self._flush()

    async def read_some(self) -> bool:
        """Read one chunk; False once the connection is closed."""
        data = await asyncio.get_running_loop().sock_recv(self.sock, READ_CHUNK)
        if not data:
            self.protocol.receive_eof()
        else:
            self.received += len(data)
            self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if not isinstance(event, Frame):
                continue  # the handshake's response
            if event.opcode is Opcode.TEXT:
                self.messages.append(orjson.loads(event.data))
            elif event.opcode is Opcode.CLOSE and self.protocol.close_rcvd is not None:
                self.close_code = self.protocol.close_rcvd.code
        await self._flush()
        return bool(data) and self.close_code is None

    async def readable(self) -> None:
        """Wait until bytes are ready to read, without reading them."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.sock.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(self.sock.fileno())

    def answer(self, request_id: int) -> dict[str, Any] | None:
        return next((m for m in self.messages if m.get("id") == request_id), None)

    def close(self) -> None:
        self.sock.close()


#: Limits the test's positions never reach (no emergency noise).
LIMITS = {"max_exposure": "1" + "0" * 20, "max_account_exposure": "1" + "0" * 20}


async def fill_state(gw: RunningGateway, accounts: int) -> None:
    """500 positions in each of ``accounts`` accounts: about 27 KB of state.get each."""
    admin = await gw.client(ADMIN)
    positions = [
        {"symbol": f"SYM-{n:06d}", "qty": f"{n}.25", "price": "12345.6789"} for n in range(500)
    ]
    for a in range(accounts):
        await admin.ok("position.snapshot", {"account": f"ACC{a}", "positions": positions})


async def test_slow_reader_when_large_answer_and_pushes_then_never_closed_4003(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        limits=LIMITS,
        server={"max_queued_bytes": 65536, "slow_consumer_ms": 500, "heartbeat_s": 0.2},
    )
    await fill_state(gw, accounts=ACCOUNTS)
    viewer = PacedClient(gw.url, VIEWER)
    await viewer.open()
    await viewer.send({"id": 1, "method": "state.get"})
    await viewer.send({"id": 2, "method": "ping"})
    # Read 4 KiB every millisecond: far slower than the socket could go, so
    # the answer piles up in the gateway for seconds while heartbeats come due.
    async with asyncio.timeout(60):
        while viewer.answer(2) is None:
            assert await viewer.read_some(), f"closed {viewer.close_code}"
            await asyncio.sleep(0.001)
    assert viewer.received > 5_000_000, viewer.received
    state = viewer.answer(1)
    assert state is not None and state["status"] == "ok"
    assert len(state["result"]["accounts"]) == ACCOUNTS
    assert all(len(a["positions"]) == 500 for a in state["result"]["accounts"].values())
    # Caught up: the pushes flow again (the ones dropped meanwhile show as a
    # gap in seq, which heartbeats carry).
    async with asyncio.timeout(10):
        while not any(
            m.get("channel") == "heartbeat" for m in viewer.messages[viewer.messages.index(state) :]
        ):
            assert await viewer.read_some(), f"closed {viewer.close_code}"
    assert viewer.close_code is None
    viewer.close()


async def test_client_when_it_stops_reading_then_closed_4003_and_alert(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        limits=LIMITS,
        server={"max_queued_bytes": 65536, "slow_consumer_ms": 300, "heartbeat_s": 0.2},
    )
    await fill_state(gw, accounts=ACCOUNTS)
    admin = await gw.client(ADMIN)
    await admin.ok("subscribe", {"channels": ["alerts"]})
    viewer = PacedClient(gw.url, VIEWER)
    await viewer.open()
    await viewer.send({"id": 1, "method": "state.get"})
    # It never reads again: the gateway closes it.
    async with asyncio.timeout(20):
        while True:
            push = await admin.next_push("alerts", timeout=20)
            if push["data"].get("code") == "SLOW_CONSUMER":
                break
    assert "closed 4003" in push["data"]["message"]
    assert "none taken for 300 ms" in push["data"]["message"]
    viewer.close()


async def test_answer_written_while_transport_paused_then_counted_as_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer the session cannot write at once goes through the outbox,
    which counts it: a client that keeps taking bytes is not evicted."""
    patch_wsio(monkeypatch)
    ws = FakeWs(reading=False)
    evicted: list[Outbox] = []
    async with asyncio.TaskGroup() as tasks:
        outbox = Outbox(
            ws,  # type: ignore[arg-type]
            max_queued_bytes=1000,
            slow_consumer_ms=100,
            on_evict=evicted.append,
            flusher=Flusher(),
            tasks=tasks,
        )
        session = Session(
            conn_id=1,
            ws=ws,  # type: ignore[arg-type]
            outbox=outbox,
            peer="127.0.0.1",
            tasks=tasks,
            limiter=FrameRateLimiter(100),
        )
        assert outbox.push(b"x" * 2000, Delivery.ANSWER)  # over the bound at once: watched
        sending = tasks.create_task(session.send(b"y" * 5000))
        for _ in range(12):  # the client takes 500 bytes every 20 ms
            await asyncio.sleep(0.02)
            ws.take(500)
        assert not evicted
        sending.cancel()
        outbox.close()


async def test_stop_when_a_client_stopped_reading_under_the_bound_then_bounded(
    make_gateway: GatewayFactory,
) -> None:
    """websockets' close waits for the socket to drain before its own close
    timeout starts; the gateway bounds each close, so a stop finishes."""
    # No heartbeat during the test, so after the emergency snapshot every
    # connection gets, the next bytes this client is sent are the answer's.
    gw = await make_gateway(limits=LIMITS, server={"heartbeat_s": 60})
    await fill_state(gw, accounts=120)  # a 3 MB answer: the kernel's buffers hold most
    viewer = PacedClient(gw.url, VIEWER)
    await viewer.open()
    async with asyncio.timeout(10):
        while not any(m.get("channel") == "emergency" for m in viewer.messages):
            assert await viewer.read_some(), f"closed {viewer.close_code}"
    await viewer.send({"id": 1, "method": "state.get"})
    # The client stops reading. Once the answer's first bytes reach its
    # socket, the whole answer was handed to the gateway's transport (one
    # write), and it fills the socket buffers, under max_queued_bytes.
    async with asyncio.timeout(30):
        await viewer.readable()
    try:
        await asyncio.wait_for(gw.gateway.stop(), 8)  # unbounded before
    finally:
        viewer.close()
