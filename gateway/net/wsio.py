"""The gateway's one adapter over websockets' connection internals.

The fan-out writes pre-framed bytes straight to a connection's transport and
the read loop watches websockets' flow control: both go around the public API
of ``websockets.asyncio.server.ServerConnection`` because the measured gain is
large (one framing per broadcast instead of one per subscriber, one write
system call per burst of answers). Every such access lives here, so an upgrade
of websockets that renames an internal breaks this module and its test
(tests/net/test_wsio.py, against a real connection) and nothing else.

Every function takes a connection whose ``connection_made`` has run, which
is true of every connection a handler or ``process_request`` is given.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

__all__ = [
    "AcceptReportingConnection",
    "abort",
    "buffered",
    "drain",
    "frames_waiting",
    "is_write_paused",
    "takes_frames",
    "write",
    "write_and_close",
]


def frames_waiting(ws: ServerConnection) -> int:
    """Frames received and not yet returned by ``ws.recv``."""
    return len(ws.recv_messages.frames)


def is_write_paused(ws: ServerConnection) -> bool:
    """True while the transport's write buffer is over its high-water mark."""
    return ws.paused


async def drain(ws: ServerConnection) -> None:
    """Return once the transport's write buffer is under its low-water mark
    (at once when it is not paused), or the connection is lost."""
    if ws.paused:
        await ws.drain()


def takes_frames(ws: ServerConnection) -> bool:
    """True when bytes framed by the caller may go straight to ``write``.

    The connection is open, its transport is under the high-water mark, no
    fragmented ``send`` of websockets' own is in progress (a frame written
    now would land between its fragments), and no extension is negotiated
    (the caller's frames carry none).
    """
    protocol = ws.protocol
    return (
        not ws.paused
        and protocol.state is State.OPEN
        and ws.send_in_progress is None
        and not protocol.extensions
    )


def write(ws: ServerConnection, data: bytes) -> None:
    """Hand ``data`` (whole WebSocket frames) to the transport, bypassing the
    protocol: check ``takes_frames`` first. Never waits; what the socket does
    not take stays in the transport's buffer (see ``buffered``). Raises what
    the transport raises for a socket already gone."""
    ws.transport.write(data)


def buffered(ws: ServerConnection) -> int:
    """Bytes in the transport's write buffer, not yet taken by the socket."""
    return ws.transport.get_write_buffer_size()


def abort(ws: ServerConnection) -> None:
    """Drop the TCP connection at once, without a closing handshake.

    Idempotent; the connection's ``recv`` and ``wait_closed`` then end as
    for a lost connection.
    """
    ws.transport.abort()


def write_and_close(ws: ServerConnection, data: bytes) -> None:
    """Write ``data`` (for instance an HTTP refusal before the handshake) and
    close the socket once it is sent."""
    transport = ws.transport
    transport.write(data)
    transport.close()


class AcceptReportingConnection(ServerConnection):
    """A ``ServerConnection`` that reports its socket's accept and its close.

    ``on_accept`` runs when the TCP connection is accepted, before any byte
    of the handshake is read; ``on_lost`` when the socket is gone, whatever
    became of the handshake. Subclass and override both; give the subclass
    to ``serve(create_connection=...)``.
    """

    def on_accept(self) -> None:
        """Called once the socket is accepted (the transport is set)."""

    def on_lost(self) -> None:
        """Called once the socket is closed, before websockets' own cleanup."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.on_accept()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()
        super().connection_lost(exc)
