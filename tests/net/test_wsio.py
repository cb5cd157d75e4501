"""``gateway.net.wsio`` held to a real websockets ``ServerConnection``.

The gateway reaches into websockets' connection internals only through
``wsio``; every test fake fakes ``wsio`` itself. These tests run each of its
functions against a real server on port 0 and a real client, so an upgrade of
websockets that renames or changes an internal fails here.
"""

from __future__ import annotations

import ast
import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from gateway.net import wsio

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
#: websockets' connection internals and transport calls: wsio's alone.
INTERNALS = frozenset(
    {
        "transport",
        "paused",
        "send_in_progress",
        "recv_messages",
        "drain",
        "drain_waiters",
        "get_write_buffer_size",
        "pause_writing",
        "resume_writing",
    }
)


def framed(payload: bytes) -> bytes:
    """``payload`` as a server's text frame, framed by websockets itself."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


@dataclass
class Served:
    """A real server whose handler hands over each connection and holds it open."""

    server: Server
    accepted: asyncio.Queue[ServerConnection] = field(default_factory=asyncio.Queue)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        host, port = next(iter(self.server.sockets)).getsockname()[:2]
        return f"ws://{host}:{port}/"

    async def client(self) -> tuple[ClientConnection, ServerConnection]:
        client = await connect(self.url, compression=None)
        async with asyncio.timeout(5):
            return client, await self.accepted.get()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    holder: list[Served] = []

    async def handler(ws: ServerConnection) -> None:
        await holder[0].accepted.put(ws)
        await holder[0].release.wait()

    server = await serve(handler, "127.0.0.1", 0, compression=None)
    holder.append(Served(server))
    yield holder[0]
    holder[0].release.set()
    server.close()
    await server.wait_closed()


async def test_frames_waiting_when_frames_arrive_unread_then_counted_until_recv(
    served: Served,
) -> None:
    client, ws = await served.client()
    assert wsio.frames_waiting(ws) == 0
    for text in ("a", "b", "c"):
        await client.send(text)
    # The pong comes after the server handled every frame sent before the ping.
    await (await client.ping())
    assert wsio.frames_waiting(ws) == 3
    assert await ws.recv() == "a"
    assert wsio.frames_waiting(ws) == 2
    await client.close()


async def test_write_when_framed_text_then_client_reads_it_in_order_with_send(
    served: Served,
) -> None:
    client, ws = await served.client()
    assert wsio.takes_frames(ws)
    assert not wsio.is_write_paused(ws)
    assert wsio.buffered(ws) == 0
    await ws.send("first")
    wsio.write(ws, framed(b'{"a":1}') + framed(b"x" * 70_000))
    await ws.send("last")
    async with asyncio.timeout(5):
        assert await client.recv() == "first"
        assert await client.recv() == '{"a":1}'
        assert await client.recv() == "x" * 70_000
        assert await client.recv() == "last"
    await client.close()


async def test_takes_frames_when_fragmented_send_in_progress_then_false_until_done(
    served: Served,
) -> None:
    client, ws = await served.client()
    between = asyncio.Event()
    go_on = asyncio.Event()

    async def fragments() -> AsyncIterator[str]:
        yield "part one, "
        between.set()
        await go_on.wait()
        yield "part two"

    async with asyncio.TaskGroup() as tasks:
        sending = tasks.create_task(ws.send(fragments()))
        await between.wait()
        # Open and not paused: only the fragmented send forbids a frame now.
        assert ws.state is State.OPEN and not wsio.is_write_paused(ws)
        assert not wsio.takes_frames(ws)
        go_on.set()
        await sending
    assert wsio.takes_frames(ws)
    assert await client.recv() == "part one, part two"
    await client.close()
    await ws.wait_closed()
    assert not wsio.takes_frames(ws)


async def test_takes_frames_when_closing_then_false(served: Served) -> None:
    client, ws = await served.client()
    async with asyncio.TaskGroup() as tasks:
        closing = tasks.create_task(ws.close(4003, "slow consumer"))
        async with asyncio.timeout(5):
            while ws.state is State.OPEN:
                await asyncio.sleep(0)
        assert not wsio.takes_frames(ws)
        with pytest.raises(ConnectionClosedError):
            await client.recv()
        await closing
    assert client.close_code == 4003


async def test_abort_when_called_then_connection_dropped_without_closing_handshake(
    served: Served,
) -> None:
    client, ws = await served.client()
    wsio.abort(ws)
    wsio.abort(ws)  # idempotent
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionClosedError):
            await client.recv()
        await ws.wait_closed()
    assert client.protocol.close_rcvd is None  # no close frame: dropped
    assert not wsio.takes_frames(ws)


class StalledClient:
    """A WebSocket client over a raw socket with a small receive buffer,
    reading only when told to (websockets' sans-I/O client parses)."""

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.url = url
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.texts: list[bytes] = []

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        uri = parse_uri(self.url)
        await loop.sock_connect(self.sock, (uri.host, uri.port))
        self.protocol.send_request(self.protocol.connect())
        for data in self.protocol.data_to_send():
            await loop.sock_sendall(self.sock, data)
        async with asyncio.timeout(10):
            while self.protocol.state is State.CONNECTING:
                await self.read_some()

    async def read_some(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        assert data, "the server closed the connection"
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.texts.append(event.data)

    async def read_until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not done():
                await self.read_some()


async def test_flow_control_when_client_stops_reading_then_paused_buffered_and_drain_waits(
    served: Served,
) -> None:
    client = StalledClient(served.url)
    await client.open()
    async with asyncio.timeout(5):
        ws = await served.accepted.get()
    payload = b"p" * 65536
    frame = framed(payload)
    written = 0
    # The kernel's socket buffers fill first; then the transport's own buffer
    # goes over its high-water mark.
    while not wsio.is_write_paused(ws):
        assert written < 4096, "never paused"
        assert wsio.takes_frames(ws)
        wsio.write(ws, frame)
        written += 1
    assert not wsio.takes_frames(ws)
    assert wsio.buffered(ws) > ws.write_limit_high  # the high-water mark
    async with asyncio.TaskGroup() as tasks:
        draining = tasks.create_task(wsio.drain(ws))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not draining.done()  # the client reads nothing: drain waits
        await client.read_until(draining.done)
    assert not wsio.is_write_paused(ws)
    assert wsio.takes_frames(ws)
    await client.read_until(lambda: len(client.texts) == written)
    assert client.texts == [payload] * written
    assert wsio.buffered(ws) == 0
    await wsio.drain(ws)  # not paused: returns at once
    client.sock.close()


@dataclass
class Report:
    events: list[str] = field(default_factory=list)
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)


async def test_accept_reporting_connection_when_socket_opens_then_reported_before_handshake() -> (
    None
):
    report = Report()

    class Reporting(wsio.AcceptReportingConnection):
        def on_accept(self) -> None:
            report.events.append("accept")
            report.accepted.set()

        def on_lost(self) -> None:
            report.events.append("lost")
            report.lost.set()

    async def handler(ws: ServerConnection) -> None:
        report.events.append("handler")

    async def process_request(conn: ServerConnection, request: object) -> None:
        report.events.append("request")

    server = await serve(
        handler, "127.0.0.1", 0, create_connection=Reporting, process_request=process_request
    )
    try:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        _reader, writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(5):
            await report.accepted.wait()  # no byte of the handshake sent yet
            assert report.events == ["accept"]
            writer.close()
            await report.lost.wait()
        assert report.events == ["accept", "lost"]
        report.events.clear()
        report.lost.clear()
        async with connect(f"ws://{host}:{port}/", compression=None) as client:
            await client.wait_closed()  # the handler returns at once
        async with asyncio.timeout(5):
            await report.lost.wait()
        assert report.events == ["accept", "request", "handler", "lost"]
    finally:
        server.close()
        await server.wait_closed()


async def test_write_and_close_when_refusing_before_handshake_then_client_reads_it_then_eof() -> (
    None
):
    refusal = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    class Refusing(wsio.AcceptReportingConnection):
        def on_accept(self) -> None:
            wsio.write_and_close(self, refusal)

    async def handler(ws: ServerConnection) -> None:
        raise AssertionError("a refused socket never reaches the handler")

    server = await serve(handler, "127.0.0.1", 0, create_connection=Refusing)
    try:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(5):
            assert await reader.read() == refusal  # then EOF
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def internals_used(path: Path) -> list[str]:
    """``line: name`` for each attribute of ``INTERNALS`` read outside ``wsio``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in INTERNALS
            and not (isinstance(node.value, ast.Name) and node.value.id == "wsio")
        ):
            found.append(f"{node.lineno}: {node.attr}")
    return found


@pytest.mark.parametrize(
    "path",
    sorted(p for p in GATEWAY.rglob("*.py") if p.name != "wsio.py"),
    ids=lambda p: p.relative_to(GATEWAY.parent).as_posix(),
)
def test_gateway_module_when_parsed_then_reaches_no_websockets_internal(path: Path) -> None:
    assert internals_used(path) == []
