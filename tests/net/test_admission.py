"""Admission's bookkeeping, on connections that never open a socket.

The rules seen from outside, over real sockets, are in tests/e2e/test_connections.py
and tests/e2e/test_fd_limit.py; these tests pin the orderings a real socket can
only produce by chance.
"""

from __future__ import annotations

import pytest

from gateway.net import wsio
from gateway.net.admission import Admission, GatewayConnection


@pytest.fixture
def aborted(monkeypatch: pytest.MonkeyPatch) -> list[GatewayConnection]:
    """The connections admission aborts (none of them has a socket here)."""
    dropped: list[GatewayConnection] = []
    monkeypatch.setattr(wsio, "abort", dropped.append)
    return dropped


def connection() -> GatewayConnection:
    conn = GatewayConnection.__new__(GatewayConnection)
    conn.gone = False
    return conn


def test_admission_when_pushed_out_socket_is_processed_after_its_close_then_not_counted(
    aborted: list[GatewayConnection],
) -> None:
    """websockets runs process_request for a request it read even after the
    socket closed; a socket pushed out in that window must not stay counted
    as waiting for session.auth (it would lock browsers out for good)."""
    admission = Admission(max_unauthenticated=1, fd_budget=100)
    first, second = connection(), connection()
    admission.accepted(first)  # its whole request is read; not processed yet
    admission.accepted(second)  # pushes the first out
    assert aborted == [first]
    admission.lost(first)
    admission.request_read(first)  # websockets' process_request, run late
    assert admission.wait_for_auth(first)
    assert admission.unauthenticated == 1  # the second only
    admission.lost(second)
    assert admission.unauthenticated == 0
    assert admission.open == 0


def test_admission_when_over_fd_budget_then_oldest_handshake_pushed_out_else_refused_503(
    monkeypatch: pytest.MonkeyPatch, aborted: list[GatewayConnection]
) -> None:
    refused: list[tuple[GatewayConnection, bytes]] = []
    monkeypatch.setattr(wsio, "write_and_close", lambda conn, data: refused.append((conn, data)))
    admission = Admission(max_unauthenticated=10, fd_budget=2)
    websocket, handshaking, newcomer, late = (connection() for _ in range(4))
    admission.accepted(websocket)
    admission.request_read(websocket)  # a WebSocket now: never pushed out
    admission.accepted(handshaking)
    admission.accepted(newcomer)  # over the budget: the oldest handshake goes
    assert aborted == [handshaking]
    admission.lost(handshaking)
    admission.request_read(newcomer)
    admission.accepted(late)  # over the budget, no handshake left to push out
    assert aborted == [handshaking]
    assert [conn for conn, _ in refused] == [late]
    assert refused[0][1].startswith(b"HTTP/1.1 503 ")
    admission.lost(late)
    assert admission.open == 2
    assert admission.unauthenticated == 0
    admission.abort_handshakes()
    assert aborted == [handshaking]
