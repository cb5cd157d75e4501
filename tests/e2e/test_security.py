"""Security rules, each observed from outside: a real socket, real handshakes.

Tokens and roles, the Origin allowlist, connection limits, frame rate and size
limits, both forms of configured token, and logs that never hold a token or a
message body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import TokenStore, hash_token
from gateway.config import load_config, with_overrides
from gateway.net.server import Gateway, running_gateway
from tests.conftest import ADMIN, TRADER, TRADER_B, VIEWER, GatewayFactory, RunningGateway
from tests.wsclient import TestClient

ORDER = {"account": "A1", "symbol": "BTC-USD", "side": "buy", "qty": "2", "price": "50000"}
UPDATE = {"account": "A1", "symbol": "BTC-USD", "qty": "3", "price": "50000"}


async def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status of a refused handshake (fails if the handshake succeeds)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await connect(url, compression=None, **kwargs)
        await ws.close()
    return info.value.response.status_code


async def closed_with(client: TestClient, timeout: float = 5) -> int | None:
    await asyncio.wait_for(client.ws.wait_closed(), timeout)
    return client.ws.close_code


# ------------------------------------------------------------------ tokens


async def test_handshake_when_token_is_wrong_then_http_401_and_no_websocket(
    gw: RunningGateway,
) -> None:
    assert await refused_status(gw.url, additional_headers={"Authorization": "Bearer nope"}) == 401
    # A scheme other than Bearer is no better, even with a good token.
    basic = {"Authorization": f"Basic {TRADER}"}
    assert await refused_status(gw.url, additional_headers=basic) == 401
    assert gw.gateway.sessions == {}


async def test_connection_when_never_authenticated_then_unauthenticated_then_4001_at_timeout(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"auth_timeout_s": 0.6})
    client = await gw.client(token=None)
    for method, params in (
        ("state.get", None),
        ("order.validate", ORDER),
        ("position.update", UPDATE),
        ("ping", None),
    ):
        error = await client.error(method, params)
        assert error["code"] == "UNAUTHENTICATED", (method, error)
    assert client.ws.close_code is None, "a request before auth must not close the connection"
    assert await closed_with(client) == 4001
    # Closed by the auth_timeout_s timer, not by any of the requests above.
    assert client.ws.close_reason == "authentication timeout"
    assert "A1" not in gw.manager.accounts


async def test_session_auth_when_token_is_wrong_then_unauthenticated_and_4001(
    gw: RunningGateway,
) -> None:
    client = await gw.client(token=None)
    error = await client.error("session.auth", {"token": "not-a-token"})
    assert error["code"] == "UNAUTHENTICATED"
    assert await closed_with(client) == 4001


async def test_tokens_when_configured_plain_and_as_sha256_then_both_authenticate(
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0

[persistence]
state_dir = "{tmp_path / "state"}"

[[tokens]]
name = "plain-desk"
role = "trader"
accounts = ["A1"]
token = "plain-secret-token"

[[tokens]]
name = "hashed-ops"
role = "admin"
token_sha256 = "{hash_token("hashed-secret-token")}"
"""
    )
    async with config_gateway(config_file) as gateway:
        url = gateway.url
        plain = await TestClient.open(url, "plain-secret-token")
        hashed = await TestClient.open(url, "hashed-secret-token")
        try:
            hello = await plain.ok("session.hello")
            assert (hello["name"], hello["role"], hello["accounts"]) == (
                "plain-desk",
                "trader",
                ["A1"],
            )
            assert (await hashed.ok("session.hello"))["name"] == "hashed-ops"
        finally:
            await plain.close()
            await hashed.close()
        # The digest itself is not a token.
        digest = hash_token("hashed-secret-token")
        auth = {"Authorization": f"Bearer {digest}"}
        assert await refused_status(url, additional_headers=auth) == 401
        # First-message auth takes both forms too.
        browser = await TestClient.open(url)
        try:
            result = await browser.ok("session.auth", {"token": "plain-secret-token"})
            assert result["name"] == "plain-desk"
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def config_gateway(config_file: Path) -> AsyncIterator[Gateway]:
    """An in-process gateway built from a config file, as ``serve`` builds it."""
    config = with_overrides(load_config(config_file), port=0)
    async with running_gateway(config, TokenStore(config.tokens)) as gateway:
        yield gateway


# ------------------------------------------------------------------ origin


async def test_origin_when_not_allowed_then_http_403(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(server={"allowed_origins": ("https://risk.example.com",)})
    for origin in ("http://evil.example", "https://risk.example.com.evil.example", "null"):
        status = await refused_status(
            gw.url,
            origin=origin,
            additional_headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert status == 403, origin
    # The configured public origin and the gateway's own origin are allowed.
    for origin in ("https://risk.example.com", f"http://127.0.0.1:{gw.gateway.port}"):
        client = await gw.client(ADMIN, origin=origin)
        assert (await client.ok("ping"))["ts"].endswith("Z")
    # Programs send no Origin at all.
    client = await gw.client(ADMIN)
    assert (await client.ok("ping"))["ts"].endswith("Z")


# ------------------------------------------------------------------- roles


async def test_trader_when_acting_on_another_account_then_forbidden_and_nothing_changes(
    gw: RunningGateway,
) -> None:
    owner = await gw.client(TRADER)  # desk-1: A1, A2
    intruder = await gw.client(TRADER_B)  # desk-2: B1
    await owner.ok("position.update", UPDATE)
    reserved = await owner.ok("order.validate", {**ORDER, "reserve": True})
    rid = reserved["reservation_id"]
    assert rid is not None
    before = await owner.ok("state.get")

    assert (await intruder.error("order.validate", ORDER))["code"] == "FORBIDDEN"
    reserve = {**ORDER, "reserve": True}
    assert (await intruder.error("order.validate", reserve))["code"] == "FORBIDDEN"
    update = {**UPDATE, "qty": "999"}
    assert (await intruder.error("position.update", update))["code"] == "FORBIDDEN"
    snapshot = {"account": "A1", "positions": []}
    assert (await intruder.error("position.snapshot", snapshot))["code"] == "FORBIDDEN"
    assert (await intruder.error("state.get", {"account": "A1"}))["code"] == "FORBIDDEN"
    # Another desk's reservation is answered as an unknown id would be.
    assert await intruder.ok("reservation.release", {"reservation_id": rid}) == {"released": False}
    release = {**UPDATE, "account": "B1", "release": rid}
    assert (await intruder.error("position.update", release))["code"] in (
        "FORBIDDEN",
        "BAD_REQUEST",
    )
    # The intruder's own view never shows A1.
    assert "A1" not in (await intruder.ok("state.get"))["accounts"]

    after = await owner.ok("state.get")
    assert after == before
    assert rid in gw.manager.reservations, "the reservation was released by another desk"
    assert await owner.ok("reservation.release", {"reservation_id": rid}) == {"released": True}


async def test_viewer_when_writing_then_forbidden_and_nothing_changes(
    gw: RunningGateway,
) -> None:
    admin = await gw.client(ADMIN)
    await admin.ok("position.update", UPDATE)
    reserved = await admin.ok("order.validate", {**ORDER, "reserve": True})
    viewer = await gw.client(VIEWER)
    before = await viewer.ok("state.get")
    limits_before = await viewer.ok("limits.get")
    writes: list[tuple[str, dict[str, Any]]] = [
        ("position.update", {**UPDATE, "qty": "7"}),
        ("position.snapshot", {"account": "A1", "positions": []}),
        ("price.update", {"symbol": "BTC-USD", "price": "1"}),
        ("order.validate", ORDER),
        ("reservation.release", {"reservation_id": reserved["reservation_id"]}),
        ("emergency.set", {"mode": "halted", "reason": "viewer"}),
        ("emergency.set", {"mode": "halted", "reason": "viewer", "account": "A1"}),
        ("limits.set", {"version": limits_before["version"], "limits": {"max_exposure": "1"}}),
    ]
    for method, params in writes:
        error = await viewer.error(method, params)
        assert error["code"] == "FORBIDDEN", (method, error)
    assert await viewer.ok("state.get") == before
    assert await viewer.ok("limits.get") == limits_before
    assert (await viewer.ok("emergency.get"))["version"] == before["emergency"]["version"]


async def test_trader_when_calling_admin_methods_then_forbidden(gw: RunningGateway) -> None:
    trader = await gw.client(TRADER)
    version = (await trader.ok("limits.get"))["version"]
    for method, params in (
        ("emergency.set", {"mode": "halted", "reason": "x"}),
        ("emergency.set", {"mode": "normal", "reason": "", "account": "A1"}),
        ("limits.set", {"version": version, "limits": {"max_exposure": "1"}}),
    ):
        assert (await trader.error(method, params))["code"] == "FORBIDDEN", method
    assert (await trader.ok("emergency.get"))["mode"] == "normal"
    assert (await trader.ok("limits.get"))["version"] == version


# ------------------------------------------------------- connection limits


async def test_connections_when_over_total_or_per_ip_limit_then_http_503(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_connections": 3, "max_connections_per_ip": 2})

    async def open_from(address: str) -> TestClient:
        client = await gw.client(TRADER, local_addr=(address, 0))
        await client.ok("ping")  # the server has registered it
        return client

    async def status_from(address: str) -> int:
        auth = {"Authorization": f"Bearer {TRADER}"}
        return await refused_status(gw.url, additional_headers=auth, local_addr=(address, 0))

    first = await open_from("127.0.0.1")
    await open_from("127.0.0.1")
    assert await status_from("127.0.0.1") == 503  # a third from one address
    await open_from("127.0.0.2")  # another address: 3 in total
    assert await status_from("127.0.0.3") == 503  # a fourth in total
    assert await status_from("127.0.0.2") == 503
    # Closing one frees its place, for its address and in total.
    await first.close()
    async with asyncio.timeout(5):
        while len(gw.gateway.sessions) > 2:
            await asyncio.sleep(0.01)
    again = await open_from("127.0.0.1")
    assert (await again.ok("ping"))["ts"]
    assert await status_from("127.0.0.3") == 503


# ------------------------------------------------------------ frame limits


async def test_frames_when_over_rate_then_rate_limited_with_id_and_4008_when_sustained(
    make_gateway: GatewayFactory,
) -> None:
    limit = 20
    gw = await make_gateway(server={"max_messages_per_second": limit})
    client = await gw.client(TRADER)
    # A burst: the first `limit` frames of the window are served, the rest refused by id.
    burst = [
        client.call("order.validate", {**ORDER, "client_order_id": f"b{i}"}) for i in range(60)
    ]
    responses = await asyncio.gather(*burst)
    limited = [r for r in responses if r["status"] == "error"]
    served = [r for r in responses if r["status"] == "ok"]
    assert 0 < len(served) <= limit
    assert len(limited) >= 60 - limit
    for response in limited:
        assert response["error"]["code"] == "RATE_LIMITED"
        assert isinstance(response["id"], int), "RATE_LIMITED must carry the request's id"
    assert client.ws.close_code is None
    # Sustained for 2 s: closed with 4008 (a flood that is never closed ends
    # the loop with TimeoutError).
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await client.ws.send(orjson.dumps({"id": "f", "method": "ping"}))
                await asyncio.sleep(0.005)
    assert await closed_with(client) == 4008
    # The gateway still serves others.
    other = await gw.client(TRADER)
    assert (await other.ok("ping"))["ts"]


async def test_frames_when_under_rate_then_never_limited(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(server={"max_messages_per_second": 20})
    client = await gw.client(TRADER)
    for _ in range(25):  # ~12 per second for 2 s
        assert (await client.ok("ping"))["ts"]
        await asyncio.sleep(0.08)
    assert client.ws.close_code is None


async def test_frame_when_over_max_message_bytes_then_1009_and_nothing_processed(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(server={"max_message_bytes": 1024})
    watcher = await gw.client(ADMIN)
    before = await watcher.ok("state.get")
    client = await gw.client(TRADER)
    # A valid request padded with JSON whitespace past the limit.
    frame = orjson.dumps({"id": 1, "method": "position.update", "params": UPDATE})
    await client.ws.send(frame + b" " * 2048, text=True)
    assert await closed_with(client) == 1009
    assert client.unmatched.empty(), "an oversized frame was answered"
    assert await watcher.ok("state.get") == before
    assert "A1" not in gw.manager.accounts
    # Just under the limit is served.
    small = await gw.client(TRADER)
    padded = frame + b" " * (1024 - len(frame))
    response = await small.send_raw(padded)
    assert response["status"] == "ok", response


# -------------------------------------------------------------------- logs

SECRET_TOKEN = "very-secret-wrong-token-4f1b"
BODY_MARKER = "BODYMARKER7c1e9a"


async def test_logs_when_auth_fails_bad_frames_and_halt_then_no_token_and_no_body(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(server={"auth_timeout_s": 0.3})
    # Wrong tokens, at the handshake and by session.auth.
    auth = {"Authorization": f"Bearer {SECRET_TOKEN}"}
    assert await refused_status(gw.url, additional_headers=auth) == 401
    browser = await gw.client(token=None)
    await browser.error("session.auth", {"token": SECRET_TOKEN + "-2"})
    await closed_with(browser)
    silent = await gw.client(token=None)
    await closed_with(silent)  # auth timeout
    # Good tokens, both ways.
    trader = await gw.client(TRADER)
    browser = await gw.client(token=None)
    await browser.ok("session.auth", {"token": VIEWER})
    # Bad frames and rejected requests carrying a distinctive marker.
    for frame in (
        f'{{"id": 1, "method": "{BODY_MARKER}"}}',
        f'{{"id": 2, "method": "order.validate", "params": {{"{BODY_MARKER}": 1}}}}',
        f'{{"id": 3, "method": "order.validate", "params": {{"qty": "{BODY_MARKER}"}}}}',
        f'{{"id": 4, "{BODY_MARKER}": 1}}',
        f'{{"id": 5, "method": "ping", "method": "{BODY_MARKER}"}}',
        f"not json {BODY_MARKER}",
    ):
        response = await trader.send_raw(frame)
        assert response["status"] == "error"
    await trader.ws.send(f"\xff{BODY_MARKER}".encode("latin-1"))  # invalid UTF-8
    await trader.unmatched.get()
    decision = await trader.ok(
        "order.validate", {**ORDER, "client_order_id": BODY_MARKER, "qty": "1000000000"}
    )
    assert decision["decision"] == "reject"
    forbidden = {**UPDATE, "account": "B1", "symbol": "M"}
    assert (await trader.error("position.update", forbidden))["code"] == "FORBIDDEN"
    # A halt, logged with who and why.
    admin = await gw.client(ADMIN)
    await admin.ok("emergency.set", {"mode": "halted", "reason": "drill for the log test"})
    await admin.ok("emergency.set", {"mode": "normal", "reason": ""})
    await admin.ok("limits.set", {"version": 1, "limits": {"max_order_qty": "500"}})
    for client in (trader, browser, admin):
        await client.close()

    # The test's own client logs what it sends; everything else is the gateway's.
    records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert len(records) > 10
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    text = "\n".join(formatter.format(record) for record in records)
    for secret in (SECRET_TOKEN, ADMIN, TRADER, VIEWER, BODY_MARKER):
        assert secret not in text, f"{secret!r} was written to the log"
    # What must be there: who and why, for auth failures and changes.
    messages = [record.getMessage() for record in records]
    assert any("wrong token" in m for m in messages)
    assert any("timeout" in m.lower() and "auth" in m.lower() for m in messages)
    assert any("admin" in m and "drill for the log test" in m for m in messages)
    assert any("limits" in m and "admin" in m and "max_order_qty" in m for m in messages)
