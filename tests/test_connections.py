"""Connections before authentication: what they may hold and what they leave behind.

Each rule is observed from outside, over real sockets: unauthenticated
connections are capped by ``server.max_unauthenticated`` and never take the
place of a client with a valid Bearer token; a handshake that never becomes a
WebSocket leaves nothing behind; any method before authentication answers
``UNAUTHENTICATED``, known or not.
"""

from __future__ import annotations

import orjson

from tests.conftest import RunningGateway


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
