"""Which sockets the gateway keeps: counted from accept, not from the handshake.

Every TCP connection holds a file descriptor from the moment it is accepted,
long before the WebSocket handshake completes (a client may send its request
slowly, or never). So the count starts in the connection's ``connection_made``
and ends in its ``connection_lost``, and three rules hold (docs/protocol.md,
section 1):

- Connections that have not authenticated are bounded by
  ``max_unauthenticated`` twice over, so that neither kind can crowd out the
  other: at most that many sockets in their handshake (a new one beyond it
  closes the oldest, whose request has not been processed yet), and at most
  that many WebSockets waiting for ``session.auth`` (a handshake without a
  token beyond it is refused with HTTP 503). Sockets waiting for
  ``session.auth`` therefore never take the handshake places a client with a
  valid Bearer token needs; it is authenticated when its request is read.
- The gateway never accepts so many sockets that the journal and its
  snapshots could not open a file: at start it raises its soft descriptor
  limit to the hard one, and keeps ``FD_RESERVE`` descriptors beyond those
  open at start. A socket past that budget first pushes out the oldest
  connection still in its handshake; if there is none, it is answered HTTP 503
  at once and closed.
- The connection's principal, when its handshake carried a valid token, lives
  on the connection object itself, so a request that never becomes a
  WebSocket (HTTP 426, a closed socket) leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import Any

from websockets.asyncio.server import ServerConnection

from gateway import metrics
from gateway.auth import Principal
from gateway.net import wsio

log = logging.getLogger("gateway.net.admission")

#: Descriptors kept free for the journal, snapshots, the manifest, the
#: dashboard's files and the process's own needs, beyond those open at start.
FD_RESERVE = 128

#: Written to a socket refused before its request was read.
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 21\r\n"
    b"Connection: close\r\n\r\n"
    b"too many connections\n"
)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def open_fds() -> int:
    """File descriptors this process has open now (best effort)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


class Admission:
    """The gateway's sockets, from accept to close, and who may take one more."""

    def __init__(self, *, max_unauthenticated: int, fd_budget: int) -> None:
        self.max_unauthenticated = max_unauthenticated
        #: Sockets the gateway may hold at once.
        self.fd_budget = fd_budget
        #: Sockets open now, from accept to close.
        self.open = 0
        # Insertion-ordered, oldest first: sockets whose request has not been read.
        self._handshaking: dict[ServerConnection, None] = {}
        # WebSockets open without a token, waiting for session.auth.
        self._waiting: dict[ServerConnection, None] = {}

    @property
    def unauthenticated(self) -> int:
        return len(self._handshaking) + len(self._waiting)

    def connection_class(self) -> type[ServerConnection]:
        """A ``ServerConnection`` that reports its accept and close here."""
        admission = self

        class Connection(GatewayConnection):
            def on_accept(self) -> None:
                admission.accepted(self)

            def on_lost(self) -> None:
                admission.lost(self)

        return Connection

    def accepted(self, conn: ServerConnection) -> None:
        self.open += 1
        self._handshaking[conn] = None
        if len(self._handshaking) > self.max_unauthenticated:
            self._push_out_oldest(conn, "unauthenticated")
        if self.open > self.fd_budget and not self._push_out_oldest(conn, "fd_budget"):
            metrics.CONNECTIONS_REFUSED.labels(reason="fd_budget").inc()
            self._handshaking.pop(conn, None)
            wsio.write_and_close(conn, _REFUSED)

    def lost(self, conn: ServerConnection) -> None:
        self.open -= 1
        self._handshaking.pop(conn, None)
        self._waiting.pop(conn, None)
        if isinstance(conn, GatewayConnection):
            # websockets may still run process_request for a request it had
            # read before the socket went: nothing may be counted after this.
            conn.gone = True

    def request_read(self, conn: ServerConnection) -> None:
        """The handshake's request was read: no longer a socket to push out."""
        self._handshaking.pop(conn, None)

    def wait_for_auth(self, conn: ServerConnection) -> bool:
        """A handshake without a token: its WebSocket will wait for
        ``session.auth``. False when it must be refused (HTTP 503): the
        sockets already waiting fill ``max_unauthenticated``."""
        if isinstance(conn, GatewayConnection) and conn.gone:
            return True  # closed already: its handshake cannot complete
        if len(self._waiting) >= self.max_unauthenticated:
            metrics.CONNECTIONS_REFUSED.labels(reason="unauthenticated").inc()
            return False
        self._waiting[conn] = None
        return True

    def abort_handshakes(self) -> None:
        """Close every socket still in its handshake (the gateway is stopping)."""
        for conn in list(self._handshaking):
            wsio.abort(conn)

    def authenticated(self, conn: ServerConnection) -> None:
        self._waiting.pop(conn, None)

    def _push_out_oldest(self, newcomer: ServerConnection, reason: str) -> bool:
        """Abort the oldest socket still in its handshake (not ``newcomer``)."""
        for conn in self._handshaking:
            if conn is not newcomer:
                break
        else:
            return False
        del self._handshaking[conn]
        metrics.CONNECTIONS_REFUSED.labels(reason=reason).inc()
        wsio.abort(conn)
        return True


class GatewayConnection(wsio.AcceptReportingConnection):
    """A server connection that carries the principal its handshake proved."""

    principal: Principal | None = None
    #: True once the socket closed.
    gone: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.principal = None
        self.gone = False
